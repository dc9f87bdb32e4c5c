"""`owl2 quantize` and `owl2 imatrix` (docs/design.md §11) on the trained demo model, whose widths
(256) fill K-quant blocks and whose answers depend on the picture.

The source folders are converted here from the committed checkpoint (the converter needs torch);
quantizing itself must not need it, which one test checks with torch made unimportable.
"""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

pytest.importorskip("torch")

from owl2_edge import gguf_names, names, quant  # noqa: E402
from owl2_edge.tools import compare, evaluate, imatrix  # noqa: E402
from owl2_edge.convert import DEMO_CHECKPOINT  # noqa: E402
from owl2_edge.tools.demo_image import sample_image, sample_questions  # noqa: E402
from owl2_edge.errors import ArgumentError, Owl2Error  # noqa: E402
from owl2_edge.model_dir import Manifest  # noqa: E402
from owl2_edge.owl2 import Owl2  # noqa: E402
from owl2_edge.tools.quantize import quantize_folder  # noqa: E402

PAIR_ID = "0123456789abcdef"
# Mean KL (nats) of the answer positions against F32 on 60 held-out questions (generated_items(20,
# seed=3)). Measured: Q8_0 1.1e-8, Q6_K 2.7e-8, Q4_K_M 1.3e-7, Q2_K 0.17. The demo model (trained
# 4,000 steps) does not survive 2 bits whole: Q2_K changes 1 answer in 15 (docs/quantize.md,
# "The demo model's quality by type"), and its bound only tells that from a broken decoder
# (several nats). Bounds for the others are the
# ones set on earlier demo models, 20-100x above today's.
KL_BOUNDS = {"Q8_0": 3e-6, "Q6_K": 5e-6, "Q4_K_M": 2e-5, "Q2_K": 0.5}
# Types whose answer to the sample question must still be right (measured: all of them are; the
# 1-2 bit types answer, but are not held to it).
ANSWER_RIGHT = {q for q in quant.QUANT_TYPES if not q.startswith(("IQ1", "IQ2", "Q2"))}


def _convert(out, q, vision=("fp32",)):
    from owl2_edge.convert.converter import convert
    convert(DEMO_CHECKPOINT, out, quant=q, vision=vision, pair_id=PAIR_ID)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def f16_dir(root):
    return _convert(root / "F16", "F16")


@pytest.fixture(scope="module")
def f32_dir(root):
    return _convert(root / "F32", "F32")


def _load(folder):
    return Owl2.load(folder, device="cpu", n_ctx=256)


@pytest.fixture(scope="module")
def calibration(f16_dir):
    """An importance matrix from 64 built-in image prompts, and one from text only."""
    prompts = imatrix.calibration_prompts(64)
    text_only = [imatrix.Prompt(p.text.replace(names.IMAGE_PLACEHOLDER, "")) for p in prompts[:8]]
    with _load(f16_dir) as owl:
        return imatrix.collect(owl, prompts), imatrix.collect(owl, text_only)


# --- quantize: the same bytes as convert, every type -------------------------------------------------

def test_quantize_f16_to_q4_k_m_equals_convert_byte_for_byte(f16_dir, root):
    converted = _convert(root / "convert-Q4_K_M", "Q4_K_M")
    quantized = root / "quantize-Q4_K_M"
    quantize_folder(f16_dir, quantized, "Q4_K_M")
    for name in (names.base_gguf_file("Q4_K_M"), names.mam_gguf_file("Q4_K_M")):
        assert (quantized / name).read_bytes() == (converted / name).read_bytes(), name


def _mirrors(folder, q):
    base = quant.read_tensor_types(folder / names.base_gguf_file(q))
    mam = quant.read_tensor_types(folder / names.mam_gguf_file(q))
    return {n: (base[n], t) for n, t in mam.items()}


@pytest.mark.parametrize("q", list(quant.QUANT_TYPES))
def test_every_type_loads_answers_mirrors_and_loads_in_llama_cpp(q, f16_dir, calibration, root):
    from owl2_edge.tools import llama_stock

    out = root / f"every-{q}"
    importance = calibration[0] if quant.QUANT_TYPES[q].needs_imatrix else None
    manifest = quantize_folder(f16_dir, out, q, importance=importance)
    assert manifest.quant == q and Manifest.load(out).quant == q
    # The sidecar's K/V take the base's type of the same tensor; its norms stay float32.
    for name, (base_type, mam_type) in _mirrors(out, q).items():
        expected = gguf.GGMLQuantizationType.F32 if name.endswith("norm.weight") else base_type
        assert mam_type == expected, name
    question, answer = sample_questions(0)[0]
    with _load(out) as owl:
        said = owl.ask(sample_image(0), question, temperature=0, max_tokens=8)
    assert said
    if q in ANSWER_RIGHT:
        assert said == answer
    llm = llama_stock.Llama(model_path=str(out / names.base_gguf_file(q)), n_ctx=32, n_threads=2,
                          logits_all=True,
                          verbose=False)
    try:
        llm.eval([1, 100, 200])
        assert np.isfinite(np.array(llm.scores[:3])).all()
    finally:
        llm.close()


def test_kl_against_f32_orders_the_types_within_bounds(f32_dir, root):
    items = evaluate.generated_items(20, seed=3)
    with _load(f32_dir) as owl:
        refs = compare.reference_pass(owl, items)
    kl = {}
    for q in KL_BOUNDS:
        out = root / f"kl-{q}"
        quantize_folder(f32_dir, out, q)
        with _load(out) as owl:
            kl[q] = compare.candidate_pass(owl, items, refs).to_dict()["kl_mean"]
        assert kl[q] <= KL_BOUNDS[q], (q, kl[q])
    assert kl["Q8_0"] < kl["Q6_K"] < kl["Q4_K_M"] < kl["Q2_K"], kl


# --- refusals -----------------------------------------------------------------------------------------

def test_a_quantized_folder_is_requantized_only_when_allowed(f16_dir, root):
    q8 = root / "req-Q8_0"
    quantize_folder(f16_dir, q8, "Q8_0")
    with pytest.raises(ArgumentError, match="already Q8_0.*--allow-requantize"):
        quantize_folder(q8, root / "req-Q4_0", "Q4_0")
    assert not (root / "req-Q4_0").exists()
    quantize_folder(q8, root / "req-Q4_0", "Q4_0", allow_requantize=True)
    with _load(root / "req-Q4_0") as owl:
        assert owl.ask(sample_image(0), sample_questions(0)[0][0], temperature=0)


@pytest.mark.parametrize("q", [q for q, t in quant.QUANT_TYPES.items() if t.needs_imatrix])
def test_the_lowest_bit_types_are_refused_without_an_importance_matrix(q, f16_dir, root):
    with pytest.raises(ArgumentError, match=f"{q} needs an importance matrix.*owl2 imatrix"):
        quantize_folder(f16_dir, root / f"no-imatrix-{q}", q)
    assert not (root / f"no-imatrix-{q}").exists()


def test_a_failed_quantization_leaves_nothing_behind(f16_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise Owl2Error("llama.cpp could not quantize the decoder")

    monkeypatch.setattr(quant, "llama_quantize", fail)
    with pytest.raises(Owl2Error):
        quantize_folder(f16_dir, tmp_path / "out", "Q4_0")
    assert list(tmp_path.iterdir()) == []


def test_output_rules(f16_dir, tmp_path):
    with pytest.raises(ArgumentError, match="is the source folder"):
        quantize_folder(f16_dir, f16_dir, "Q4_0")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="--force"):
        quantize_folder(f16_dir, tmp_path / "taken", "Q4_0")
    assert (tmp_path / "taken" / "x").read_text() == "keep"
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_folder(f16_dir, tmp_path / "o", "Q4_9")


# --- imatrix ------------------------------------------------------------------------------------------

def test_importance_entries_are_the_squared_inputs_of_each_route(f16_dir):
    """Layer 0's Q/K/V multiply RMSNorm_route(embeddings): every position goes through Q, text
    positions through the base's K, image positions through the sidecar's K. Rebuild those
    inputs by hand from the GGUF weights and the vision model's output."""
    prompt = imatrix.calibration_prompts(1, seed=5)[0]
    with _load(f16_dir) as owl:
        got = imatrix.collect(owl, [prompt])
        ids = owl.tokenize(prompt.text)
        image = owl.encode_image(prompt.image)
    manifest = Manifest.load(f16_dir)
    base = {t.name: t for t in gguf.GGUFReader(f16_dir / manifest.decoder_file).tensors}
    mam = {t.name: t for t in gguf.GGUFReader(f16_dir / manifest.mam_file).tensors}
    eps = float(gguf.GGUFReader(f16_dir / manifest.decoder_file)
                .fields[gguf_names.KEY_RMS_EPS].contents())
    embd = quant.decode(base[gguf_names.TOKEN_EMBD])
    slot = ids.index(names.IMAGE_TOKEN_ID)
    text = embd[[i for i in ids if i != names.IMAGE_TOKEN_ID]]

    def normed(x, norm):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * quant.decode(norm)

    norm = gguf_names.blk(0, "attn_norm")
    text_in = normed(text, base[norm])
    image_in = normed(image, mam[norm])
    q, k = gguf_names.blk(0, "attn_q"), gguf_names.blk(0, "attn_k")
    assert got.base[q].count == len(ids) - 1 + len(image) and slot > 0
    assert got.base[k].count == len(text) and got.mam[k].count == len(image)
    np.testing.assert_allclose(got.base[k].sum_sq, (text_in ** 2).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.mam[k].sum_sq, (image_in ** 2).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.base[q].sum_sq, (text_in ** 2).sum(0) + (image_in ** 2).sum(0),
                               rtol=1e-4, atol=1e-4)


def test_a_text_only_calibration_leaves_the_visual_entries_empty(calibration, tmp_path):
    with_images, text_only = calibration
    assert len(with_images.mam) == 2 * 4 and all(e.count for e in with_images.mam.values())
    assert text_only.mam == {} and len(text_only.base) == len(with_images.base)
    path = text_only.write(tmp_path / "text.gguf")
    names_in_file = [t.name for t in gguf.GGUFReader(path).tensors]
    assert not [n for n in names_in_file if n.startswith(gguf_names.IMATRIX_MAM_PREFIX)]


def test_the_file_is_llama_cpp_s_imatrix_gguf_and_reads_back(calibration, tmp_path):
    im = calibration[0]
    path = im.write(tmp_path / "im.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields[gguf_names.KEY_GENERAL_TYPE].contents() == "imatrix"
    assert reader.fields[gguf_names.KEY_IMATRIX_CHUNK_COUNT].contents() == 64
    assert reader.fields[gguf_names.KEY_IMATRIX_DATASETS].contents()
    tensors = {t.name: t for t in reader.tensors}
    q = gguf_names.blk(0, "attn_q")
    assert tensors[q + ".in_sum2"].shape.tolist() == [256, 1]
    assert tensors[q + ".counts"].shape.tolist() == [1, 1]
    back = imatrix.ImportanceMatrix.read(path)
    assert set(back.base) == set(im.base) and set(back.mam) == set(im.mam)
    for name, e in im.mam.items():
        np.testing.assert_array_equal(back.mam[name].sum_sq, e.sum_sq)
        assert back.mam[name].count == e.count


def test_a_file_that_is_not_an_importance_matrix_is_refused(f16_dir, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ArgumentError, match="not a GGUF importance matrix"):
        imatrix.ImportanceMatrix.read(junk)
    manifest = Manifest.load(f16_dir)
    with pytest.raises(ArgumentError, match="not an importance matrix"):
        imatrix.ImportanceMatrix.read(f16_dir / manifest.mam_file)
    with pytest.raises(ArgumentError, match="no such"):
        imatrix.ImportanceMatrix.read(tmp_path / "missing.gguf")


def _weighted_error(src, out, held: imatrix.ImportanceMatrix) -> float:
    """Σ over matrices of Σ_ij E[x_j²] (W_ij - Ŵ_ij)²: the expected squared output error on the
    held-out prompts' inputs, what an importance matrix teaches the quantizer to lower."""
    total = 0.0
    a, b = Manifest.load(src), Manifest.load(out)
    for ref_file, out_file, entries in ((a.decoder_file, b.decoder_file, held.base),
                                        (a.mam_file, b.mam_file, held.mam)):
        ref = {t.name: t for t in gguf.GGUFReader(src / ref_file).tensors}
        got = {t.name: t for t in gguf.GGUFReader(out / out_file).tensors}
        for name, e in entries.items():
            if name in got and len(got[name].shape) == 2:
                diff = quant.decode(ref[name]) - quant.decode(got[name])
                total += float((diff ** 2 @ e.mean()).sum())
    return total


@pytest.mark.parametrize("q", ["Q4_K_M", "IQ4_XS"])
def test_an_image_imatrix_lowers_the_error_on_held_out_image_prompts(q, f16_dir, calibration, root):
    held_items = evaluate.generated_items(5, seed=7)
    held = imatrix.prompts_from_items(held_items)
    with _load(f16_dir) as owl:
        held_stats = imatrix.collect(owl, held)
    plain, guided = root / f"plain-{q}", root / f"im-{q}"
    quantize_folder(f16_dir, plain, q)
    quantize_folder(f16_dir, guided, q, importance=calibration[0])
    assert _weighted_error(f16_dir, guided, held_stats) < 0.97 * _weighted_error(f16_dir, plain,
                                                                               held_stats)


# --- the commands -------------------------------------------------------------------------------------

def _owl2(*args, timeout=300, no_torch=False):
    prefix = "import sys; sys.modules['torch'] = None; " if no_torch else ""
    code = prefix + "from owl2_edge.cli import main; sys.argv[0] = 'owl2'; main()"
    return subprocess.run([sys.executable, "-c", "import sys; " + code, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_imatrix_and_quantize_commands_work_without_torch(f16_dir, tmp_path):
    im = tmp_path / "im.gguf"
    r = _owl2("imatrix", "-m", f16_dir, "-o", im, "--prompts", 8, no_torch=True)
    assert r.returncode == 0, r.stderr
    assert "8 visual-route matrices from 8 prompts" in r.stderr
    r = _owl2("quantize", f16_dir, "-o", tmp_path / "iq2", "-q", "IQ2_XS", "--imatrix", im,
              "--vision", "fp32", no_torch=True)
    assert r.returncode == 0, r.stderr
    assert Manifest.load(tmp_path / "iq2").quant == "IQ2_XS"


def test_quantize_report_prints_the_comparison(f16_dir, tmp_path):
    r = _owl2("quantize", f16_dir, "-o", tmp_path / "q8", "-q", "q8_0", "--report",
              "--report-n", 3, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["questions"] == 9 and out["kl_mean"] < 1e-4 and out["same_answer"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["-q", "IQ1_S"], "IQ1_S needs an importance matrix"),
    (["-q", "Q4_9"], "unknown quantization"),
    (["-q", "Q4_0", "--imatrix", "missing.gguf"], "no such importance matrix"),
    (["-q", "Q4_0", "--vision", "int3"], "unknown vision variant"),
])
def test_quantize_refusals_are_one_line(args, message, f16_dir, tmp_path):
    r = _owl2("quantize", f16_dir, "-o", tmp_path / "out", *args)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
