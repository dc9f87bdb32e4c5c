"""The checkpoint reader, the HF name table and the tiny-checkpoint generator."""

import functools

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import json
import math

import sentencepiece as spm
import torch

from owl2_edge import gguf_names
from owl2_edge.convert import hf_layout, tiny
from owl2_edge.convert.checkpoint import Checkpoint
from owl2_edge.convert.config import Owl2Config
from owl2_edge.errors import CheckpointError


def _expected_value(name, cfg, seed, dtype):
    """What the generator drew for `name`, rounded through the file's dtype."""
    shape = hf_layout.expected_shapes(cfg)[name]
    return tiny.random_tensor(name, shape, seed).to(tiny.DTYPES[dtype]).float()


# --- Reading what the generator writes ----------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("weights_format", ["bin", "safetensors"])
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_reader_returns_the_generated_tensors_as_float32(tmp_path, dtype, weights_format, sharded):
    path = tiny.make_tiny_checkpoint(tmp_path, seed=3, dtype=dtype,
                                     weights_format=weights_format, sharded=sharded)
    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    assert cfg == tiny.tiny_config()
    seen = {}
    for shard, tensors in ckpt.iter_shards():
        assert list(tensors) == ckpt.names_in(shard)
        seen.update(tensors)
    assert set(seen) == set(hf_layout.expected_shapes(cfg))
    for name, tensor in seen.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, _expected_value(name, cfg, 3, dtype)), name


def test_sharded_checkpoint_follows_the_release_plan(tiny_checkpoint, tiny_ckpt):
    cfg = tiny_ckpt.config
    plan = hf_layout.release_shard_plan(cfg)
    n = cfg.text.num_layers + 1
    assert tiny_ckpt.shards == [f"pytorch_model-{k}-of-{n}.bin" for k in range(1, n + 1)]
    assert [tiny_ckpt.names_in(s) for s in tiny_ckpt.shards] == plan
    index = json.loads((tiny_checkpoint / hf_layout.PICKLE_INDEX).read_text())
    # Like the release, each layer's file also carries the RoPE buffer; the reader ignores it.
    for i in range(cfg.text.num_layers):
        assert index["weight_map"][hf_layout.rotary_inv_freq_name(i)] == tiny_ckpt.shards[i]
    assert not any(hf_layout.is_optional_buffer(name)
                   for _, tensors in tiny_ckpt.iter_shards() for name in tensors)
    files = {f.name for f in tiny_checkpoint.iterdir()}
    assert {"config.json", "preprocessor_config.json", "generation_config.json",
            "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= files
    sizes = sum(t.numel() * 2 for s in tiny_ckpt.shards  # bf16
                for t in torch.load(tiny_checkpoint / s, weights_only=True).values())
    assert index["metadata"]["total_size"] == sizes


def test_load_reads_only_the_files_holding_the_names(tiny_ckpt, monkeypatch):
    from owl2_edge.convert import checkpoint as checkpoint_module
    opened = []
    real = checkpoint_module._read_pickle
    monkeypatch.setattr(checkpoint_module, "_read_pickle",
                        lambda file: opened.append(file.name) or real(file))
    names = [hf_layout.LM_HEAD, hf_layout.decoder_layer_name(1, "self_attn.k_proj", 1)]
    tensors = tiny_ckpt.load(names)
    assert list(tensors) == names
    assert sorted(opened) == sorted({tiny_ckpt.shard_of(n) for n in names})
    assert tensors[hf_layout.LM_HEAD].shape == (512, 64)


def test_unknown_extra_tensors_are_ignored(tmp_path):
    path = tiny.make_tiny_checkpoint(tmp_path, weights_format="bin", sharded=False)
    file = path / hf_layout.PICKLE_SINGLE
    data = torch.load(file, weights_only=True)
    data["model.some_future_buffer"] = torch.zeros(3, dtype=torch.int64)
    torch.save(data, file)
    tensors = Checkpoint.open(path).load_shard(hf_layout.PICKLE_SINGLE)
    assert set(tensors) == set(hf_layout.expected_shapes(tiny.tiny_config()))


# --- What the generator draws ---------------------------------------------------------------------

def test_visual_route_is_drawn_independently_of_the_text_route(tiny_ckpt):
    cfg = tiny_ckpt.config
    for i in range(cfg.text.num_layers):
        for part in gguf_names.ROUTED_LAYER_PARTS:
            text, visual = tiny_ckpt.load([hf_layout.multiway_name(i, part, 0),
                                           hf_layout.multiway_name(i, part, 1)]).values()
            if part.is_norm:  # 1 + noise: the noise parts are unrelated
                text, visual = text - 1, visual - 1
            corr = torch.corrcoef(torch.stack([text.flatten(), visual.flatten()]))[0, 1]
            assert abs(corr) < 0.3, (i, part)
            assert (text - visual).norm() > 0.5 * text.norm(), (i, part)


def test_generator_is_deterministic_by_seed(tmp_path):
    name = hf_layout.decoder_layer_name(0, "self_attn.v_proj", 1)
    a = Checkpoint.open(tiny.make_tiny_checkpoint(tmp_path / "a", seed=7)).load([name])[name]
    b = Checkpoint.open(tiny.make_tiny_checkpoint(tmp_path / "b", seed=7)).load([name])[name]
    c = Checkpoint.open(tiny.make_tiny_checkpoint(tmp_path / "c", seed=8)).load([name])[name]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generated_weights_keep_activations_of_order_one(tiny_ckpt):
    """A normalised hidden state through lm_head gives logits of order 1 (not 1e-3, not 1e3)."""
    cfg = tiny_ckpt.config
    lm_head = tiny_ckpt.load([hf_layout.LM_HEAD])[hf_layout.LM_HEAD]
    h = torch.randn(16, cfg.text.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = h @ lm_head.T
    assert 0.3 < logits.std().item() < 3


def test_tiny_rows_are_whole_ggml_quant_blocks():
    shapes = hf_layout.expected_shapes(tiny.tiny_config())
    for name, shape in shapes.items():
        if name.startswith("model.layers.") or name in (hf_layout.EMBED_TOKENS,
                                                         hf_layout.LM_HEAD):
            assert shape[-1] % 32 == 0, name


# --- The 7B table --------------------------------------------------------------------------------

def test_release_plan_for_7b_matches_the_spec():
    cfg = Owl2Config()
    plan = hf_layout.release_shard_plan(cfg)
    assert len(plan) == 33
    assert all(len(names) == 13 for names in plan[:32])
    assert plan[5][0].startswith("model.layers.5.")
    assert hf_layout.pickle_shard_file(33, 33) == "pytorch_model-33-of-33.bin"
    shapes = hf_layout.expected_shapes(cfg)
    assert shapes[hf_layout.EMBED_TOKENS] == (32000, 4096)
    assert shapes["model.vision_model.embeddings.position_embedding"] == (1, 1025, 1024)
    assert shapes["model.visual_abstractor.encoder.layers.5.crossattention.output.mlp.w2.weight"] \
        == (1024, 2816)
    # docs/architecture.md §1: vision 304.0 M, abstractor 81.5 M, ~8.2 B in all.
    count = lambda prefix: sum(math.prod(s) for n, s in shapes.items() if n.startswith(prefix))
    assert round(count(hf_layout.VISION_PREFIX) / 1e6, 1) == 304.0
    assert round(count(hf_layout.ABSTRACTOR_PREFIX) / 1e6, 1) == 81.5
    assert round(count("") / 1e9, 1) == 8.2


def test_7b_layer_shard_is_generated_with_the_release_shapes():
    cfg = Owl2Config()
    names = hf_layout.release_shard_plan(cfg)[0]
    tensors = tiny._shard_tensors(cfg, names, functools.partial(tiny.random_tensor, seed=0),
                                  dtype=torch.bfloat16)
    shapes = hf_layout.expected_shapes(cfg)
    assert all(tuple(tensors[n].shape) == shapes[n] for n in names)
    assert tensors[hf_layout.rotary_inv_freq_name(0)].shape == (64,)


def test_name_helpers_refuse_a_wrong_route():
    assert hf_layout.decoder_layer_name(3, "mlp.up_proj") == "model.layers.3.mlp.up_proj.weight"
    assert hf_layout.multiway_name(3, "self_attn.k_proj", 1) == \
        "model.layers.3.self_attn.k_proj.multiway.1.weight"
    with pytest.raises(ValueError):
        hf_layout.decoder_layer_name(0, "self_attn.k_proj")
    with pytest.raises(ValueError):
        hf_layout.decoder_layer_name(0, "self_attn.q_proj", 1)


# --- Tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_follows_llama_conventions(tiny_ckpt):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_ckpt.tokenizer_model))
    assert sp.vocab_size() == tiny_ckpt.config.text.vocab_size == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.is_byte(3)
    pieces = sp.encode("USER: 2024 café 你好🙂", out_type=str)
    assert pieces[0].startswith("▁")                       # dummy prefix
    assert ["2", "0", "2", "4"] == pieces[pieces.index("▁") + 1:][:4]  # split digits
    assert "<0xF0>" in pieces                               # byte fallback for the emoji
    assert sp.decode(sp.encode("  two  spaces\tkept")) == "  two  spaces\tkept"


def test_tokenizer_training_is_deterministic():
    first = tiny._trained_tokenizer(512)
    tiny._trained_tokenizer.cache_clear()
    assert tiny._trained_tokenizer(512) == first


def test_padded_32000_tokenizer_tokenizes_like_the_trained_one():
    small = spm.SentencePieceProcessor(model_proto=tiny.tokenizer_model_bytes(512))
    big = spm.SentencePieceProcessor(model_proto=tiny.tokenizer_model_bytes(32000))
    assert big.vocab_size() == 32000
    texts = tiny._corpus()[:300] + ["<unused5> and <unused31487>", "naïve 東京 🙂 \u00ff"]
    for text in texts:
        assert big.encode(text) == small.encode(text), text


# --- Bad checkpoints: one CheckpointError naming the file ----------------------------------------

@pytest.fixture
def fresh(tmp_path):
    return tiny.make_tiny_checkpoint(tmp_path / "ckpt")


def _shard_holding(path, name):
    index = json.loads((path / hf_layout.PICKLE_INDEX).read_text())
    return path / index["weight_map"][name]


def _rewrite(file, change):
    data = torch.load(file, weights_only=True)
    change(data)
    torch.save(data, file)


def test_missing_shard_is_named(fresh):
    (fresh / "pytorch_model-2-of-3.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-2-of-3\.bin: missing \(listed in "
                                              r"pytorch_model\.bin\.index\.json\)"):
        Checkpoint.open(fresh)


def test_wrong_shape_is_named(fresh):
    name = hf_layout.decoder_layer_name(1, "mlp.down_proj")
    file = _shard_holding(fresh, name)
    _rewrite(file, lambda d: d.__setitem__(name, torch.zeros(64, 64, dtype=torch.bfloat16)))
    ckpt = Checkpoint.open(fresh)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_shard(file.name)
    assert str(e.value) == (f"{file}: tensor {name} has shape [64, 64], expected [64, 128]")


def test_llama_config_is_not_an_owl2_config(fresh):
    config = json.loads((fresh / "config.json").read_text())
    config["model_type"] = "llama"
    (fresh / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: not an mPLUG-Owl2 config"):
        Checkpoint.open(fresh)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
def test_unsupported_dtype_is_named(fresh, dtype):
    name = hf_layout.LM_HEAD
    file = _shard_holding(fresh, name)
    _rewrite(file, lambda d: d.__setitem__(name, d[name].to(dtype)))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(fresh).load([name])
    assert str(e.value).startswith(f"{file}: tensor {name} has dtype "
                                   f"{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_shard_is_named(fresh, keep):
    file = fresh / "pytorch_model-1-of-3.bin"
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    ckpt = Checkpoint.open(fresh)
    with pytest.raises(CheckpointError, match=rf"^{file}: not a readable PyTorch checkpoint"):
        ckpt.load_shard(file.name)


def test_truncated_safetensors_shard_is_named(tmp_path):
    path = tiny.make_tiny_checkpoint(tmp_path, weights_format="safetensors")
    file = path / "model-3-of-3.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    ckpt = Checkpoint.open(path)
    with pytest.raises(CheckpointError, match=rf"^{file}: not a readable safetensors file"):
        ckpt.load_shard(file.name)


def test_missing_config_is_named(fresh):
    (fresh / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        Checkpoint.open(fresh)


def test_missing_tokenizer_model_is_named(tmp_path):
    path = tiny.make_tiny_checkpoint(tmp_path, tokenizer=False)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: missing"):
        Checkpoint.open(path)


def test_tensor_missing_from_the_index_is_named(fresh):
    index_file = fresh / hf_layout.PICKLE_INDEX
    index = json.loads(index_file.read_text())
    name = hf_layout.multiway_name(0, "post_attention_layernorm", 1)
    del index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(fresh)
    assert str(e.value) == f"{index_file}: tensor {name} is missing"


def test_tensor_missing_from_a_single_file_is_named(tmp_path):
    path = tiny.make_tiny_checkpoint(tmp_path, sharded=False)
    file = path / hf_layout.PICKLE_SINGLE
    _rewrite(file, lambda d: d.pop(hf_layout.FINAL_NORM))
    ckpt = Checkpoint.open(path)
    with pytest.raises(CheckpointError, match=rf"^{file}: tensor {hf_layout.FINAL_NORM} is missing"):
        ckpt.load_shard(file.name)


def test_folder_without_weights_is_named(fresh):
    for f in fresh.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=rf"^{fresh}: no weights found"):
        Checkpoint.open(fresh)


def test_legacy_pickle_format_is_read(tmp_path):
    """torch.save's pre-1.6 format cannot be memory-mapped; it is read into memory instead."""
    path = tiny.make_tiny_checkpoint(tmp_path, sharded=False)
    file = path / hf_layout.PICKLE_SINGLE
    torch.save(torch.load(file, weights_only=True), file, _use_new_zipfile_serialization=False)
    tensors = Checkpoint.open(path).load_shard(file.name)
    name = hf_layout.multiway_name(1, "self_attn.v_proj", 1)
    assert torch.equal(tensors[name], _expected_value(name, tiny.tiny_config(), 0, "bfloat16"))


@pytest.mark.slow
def test_7b_checkpoint_is_written_and_read_in_bounded_memory(tmp_path):
    """The real shape, end to end (about 2 min and 16 GB of disk to write, 30 s to read): both
    the generator and iter_shards stay well under 8 GB of peak RSS."""
    import subprocess
    import sys
    script = """
import resource, sys
from owl2_edge.convert import tiny
from owl2_edge.convert.checkpoint import Checkpoint
from owl2_edge.convert.config import Owl2Config
path = tiny.make_tiny_checkpoint(sys.argv[1], config=Owl2Config())
count = 0
for shard, tensors in Checkpoint.open(path).iter_shards():
    count += sum(t.numel() for t in tensors.values())
    del tensors
print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "7b")], check=True,
                         capture_output=True, text=True).stdout.split()
    count, peak_rss = int(out[0]), int(out[1])
    assert count == sum(math.prod(s) for s in hf_layout.expected_shapes(Owl2Config()).values())
    assert peak_rss < 8 * 2**30
