"""The trained demo model (convert/demo_model, docs/design.md §10): it reads the picture, its
quantizations keep that, and MAM is what lets it.

Accuracies are measured on held-out layouts (owl2_edge/scenes.py) by the runtime (`owl2 eval`'s
code), on folders converted here from the committed checkpoint.
"""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from owl2_edge import names  # noqa: E402
from owl2_edge.tools import evaluate  # noqa: E402
from owl2_edge.convert import DEMO_CHECKPOINT  # noqa: E402
from owl2_edge.tools.demo_image import (SAMPLES, sample_clip_frames, sample_clip_question,  # noqa: E402
                                        sample_image, sample_json, sample_questions)
from owl2_edge.owl2 import Owl2  # noqa: E402

N_PER_TYPE = 200
# Held-out accuracy each type must reach on these 600 questions, per decoder type. Measured
# (docs/quantize.md, "The demo model's quality by type") on them: colour / count / shape-at
# 1.000 / 1.000 / 0.970 at F32 and Q8_0,
# 1.000 / 1.000 / 0.965 at Q4_K_M; on 1,000 other questions per type at F32, 1.000 / 1.000 /
# 0.963 (docs/design.md §10). The bounds leave a few answers' room for float differences between
# machines, and Q4_K_M's shape-at a little more.
BOUNDS = {
    "F32": {"color": 0.95, "count": 0.95, "shape_at": 0.95},
    "Q8_0": {"color": 0.95, "count": 0.95, "shape_at": 0.95},
    "Q4_K_M": {"color": 0.95, "count": 0.95, "shape_at": 0.93},
}


def _convert(src, out, quant):
    from owl2_edge.convert.converter import convert
    convert(src, out, quant=quant, vision=("fp32",))
    return out


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {q: _convert(DEMO_CHECKPOINT, root / q, q) for q in BOUNDS}


@pytest.fixture(scope="module")
def heldout():
    return evaluate.generated_items(N_PER_TYPE, seed=0)


def _accuracy(folder, items):
    with Owl2.load(folder, device="cpu", n_ctx=256) as owl:
        return evaluate.evaluate(owl, items)


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_heldout_accuracy_per_type_meets_the_bound(demo_dirs, heldout, quant):
    report = _accuracy(demo_dirs[quant], heldout)
    assert set(report.total) == {"color", "count", "shape_at"}
    for kind in report.total:
        assert report.total[kind] == N_PER_TYPE
        assert report.accuracy(kind) >= BOUNDS[quant][kind], (quant, kind, report.to_dict())


def _swap_routes(src, dst):
    """The checkpoint with its visual route replaced by a copy of the text route: image positions
    then take the text norms and K/V projections, as a runtime without MAM would."""
    from owl2_edge.convert import hf_layout, tiny
    from owl2_edge.convert.checkpoint import Checkpoint
    ckpt = Checkpoint.open(src)
    tensors = ckpt.load(hf_layout.expected_shapes(ckpt.config))
    swapped = 0
    for name in list(tensors):
        if f".multiway.{names.VISUAL_ROUTE}." in name:
            tensors[name] = tensors[name.replace(f".multiway.{names.VISUAL_ROUTE}.",
                                                 f".multiway.{names.TEXT_ROUTE}.")].clone()
            swapped += 1
    assert swapped == 4 * 4  # 4 layers × (input norm, K, V, post-attention norm)
    return tiny.make_tiny_checkpoint(dst, config=ckpt.config, tensors=tensors,
                                     tokenizer_model=(src / hf_layout.TOKENIZER_MODEL).read_bytes())


def test_the_text_route_on_image_positions_loses_the_picture(demo_dirs, heldout, tmp_path):
    """MAM matters on a model that reads the picture: with the text route copied into the visual
    route, accuracy falls to about chance (colour 1/6, count and shape 1/3)."""
    swapped = _convert(_swap_routes(DEMO_CHECKPOINT, tmp_path / "hf"), tmp_path / "F32", "F32")
    right = _accuracy(demo_dirs["F32"], heldout)
    wrong = _accuracy(swapped, heldout)
    for kind in right.total:
        assert wrong.accuracy(kind) < right.accuracy(kind) - 0.3, (kind, wrong.to_dict())
    assert wrong.accuracy() < 0.6, wrong.to_dict()


def test_the_demo_answers_the_sample_questions_greedily(demo_dirs):
    with Owl2.load(demo_dirs["Q8_0"], device="cpu") as owl:
        for i in range(len(SAMPLES)):
            assert SAMPLES[i].split == "heldout"
            for question, expected in sample_questions(i):
                assert owl.ask(sample_image(i), question, temperature=0) == expected


def test_owl2_demo_builds_once_and_answers_right(tmp_path):
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path)}
    for run in range(2):  # the second run reuses the model built by the first
        r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "demo"], capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert ("building the demo model" in r.stderr) == (run == 0)
        asked = [(q, a) for i in range(len(SAMPLES)) for q, a in sample_questions(i)]
        asked += [sample_json(0), sample_clip_question()]
        for question, expected in asked:
            assert f"USER: {question}\nASSISTANT: {expected}   (right)" in r.stdout, r.stdout
        assert "expected" not in r.stdout
    demo = tmp_path / "owl2-edge" / "demo"
    assert (demo / "model" / names.MANIFEST_FILE).is_file()
    assert (demo / "sample-1.png").is_file()
    from PIL import Image
    with Image.open(demo / "sample-clip.gif") as gif:  # the clip, for video inputs
        assert gif.is_animated and gif.n_frames == len(sample_clip_frames())
    # A changed checkpoint (a retrained model) is noticed and converted again.
    (demo / "checkpoint.sha256").write_text("0" * 64)
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "demo", "-q", "How many shapes are there?"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "building the demo model" in r.stderr, r.stderr
    assert "ASSISTANT: Three." in r.stdout


# --- owl2 eval and owl2 compare -------------------------------------------------------------------

def _owl2(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_eval_cli_scores_generated_and_file_questions(demo_dirs, tmp_path):
    r = _owl2("eval", "-m", demo_dirs["Q8_0"], "--generated", 10, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["questions"] == 30 and set(out["types"]) == {"color", "count", "shape_at"}
    assert out["accuracy"] >= 0.9
    # The user's own lines: images relative to the file, "answers" lists, a wrong answer.
    sample_image(0).save(tmp_path / "one.png")
    lines = [{"image": "one.png", "question": "How many shapes are there?", "answer": "three"},
             {"image": "one.png", "question": "What color is the triangle?", "answers": ["Red.", "red"],
              "type": "colour"},
             {"image": "one.png", "question": "What shape is on the left?", "answer": "A square."}]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = _owl2("eval", "-m", demo_dirs["Q8_0"], "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["types"] == {"all": {"correct": 1, "total": 2, "accuracy": 0.5},
                            "colour": {"correct": 1, "total": 1, "accuracy": 1.0}}
    r = _owl2("eval", "-m", demo_dirs["Q8_0"], "--data", data)  # the table
    assert r.returncode == 0 and "accuracy" in r.stdout and "colour" in r.stdout


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1: not valid JSON"),
    ('{"image": "x.png"}', "line 1: needs a \"question\""),
    ('{"question": "Hi?"}', "line 1: needs an \"answer\""),
    ('{"question": "Hi?", "answer": 3}', "line 1: needs an \"answer\""),
    ('[1, 2]', "line 1: not a JSON object"),
])
def test_eval_refuses_a_bad_data_line_in_one_line(demo_dirs, tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(line + "\n")
    r = _owl2("eval", "-m", demo_dirs["Q8_0"], "--data", data)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_eval_refuses_data_and_generated_together(demo_dirs, tmp_path):
    r = _owl2("eval", "-m", demo_dirs["Q8_0"], "--data", tmp_path / "x.jsonl", "--generated", 3)
    assert r.returncode == 1 and "not both" in r.stderr


def test_compare_a_folder_with_itself_is_exact(demo_dirs):
    from owl2_edge.tools.compare import compare
    items = evaluate.generated_items(5)
    result = compare(demo_dirs["F32"], demo_dirs["F32"], items,
                     lambda p: Owl2.load(p, device="cpu", kv_type="f32")).to_dict()
    assert result["kl_mean"] < 1e-6 and result["top1_agreement"] == 1.0
    assert result["same_answer"] == 1.0 and result["image_cosine"] > 0.999999
    assert abs(result["ppl_ratio"] - 1) < 1e-4
    assert result["candidate"] == result["reference"]


def test_compare_measures_a_quantization_and_a_broken_model(demo_dirs, tmp_path):
    r = _owl2("compare", demo_dirs["F32"], demo_dirs["Q4_K_M"], "--generated", 10, "--json")
    assert r.returncode == 0, r.stderr
    q4 = json.loads(r.stdout)
    assert 0 < q4["kl_mean"] < 0.05 and q4["top1_agreement"] > 0.95
    assert q4["questions"] == 30 and q4["positions"] >= 30 * 3  # ≥ 2 answer tokens + eos each
    swapped = _convert(_swap_routes(DEMO_CHECKPOINT, tmp_path / "hf"), tmp_path / "F32", "F32")
    r = _owl2("compare", demo_dirs["F32"], swapped, "--generated", 10, "--json")
    broken = json.loads(r.stdout)
    assert broken["kl_mean"] > 10 * q4["kl_mean"]
    assert broken["candidate"]["accuracy"] < broken["reference"]["accuracy"] - 0.3
    r = _owl2("compare", demo_dirs["F32"], demo_dirs["Q4_K_M"], "--generated", 2)  # the table
    assert r.returncode == 0 and "KL mean" in r.stdout and "top-1 agreement" in r.stdout


# --- The scenes and the training script ----------------------------------------------------------

def test_scenes_ask_the_issue_s_question_forms():
    from owl2_edge.scenes import Scene, Thing
    scene = Scene((Thing("circle", "red", "right"), Thing("triangle", "blue", "left")), seed=0)
    qa = {q.text: (q.kind, q.answer) for q in scene.questions()}
    assert qa["What color is the circle?"] == ("color", "Red.")
    assert qa["How many shapes are there?"] == ("count", "Two.")
    assert qa["What shape is on the left?"] == ("shape_at", "A triangle.")
    # A shape drawn twice has no single colour to ask about.
    twice = Scene((Thing("circle", "red", "right"), Thing("circle", "blue", "left")), seed=0)
    assert not any(q.kind == "color" for q in twice.questions())


def test_heldout_layouts_never_appear_in_training():
    import random

    from owl2_edge import scenes
    rng = random.Random(0)
    train = {scenes.random_scene(rng, "train").layout for _ in range(3000)}
    held = {scenes.random_scene(rng, "heldout").layout for _ in range(1000)}
    assert train and held and not train & held
    everything = {scenes.random_scene(rng, s).layout for s in ("train", "heldout") for _ in range(3000)}
    assert 0.1 < sum(scenes.layout_split(x) == "heldout" for x in everything) / len(everything) < 0.3


def test_generated_items_are_fixed_by_the_seed():
    a, b = evaluate.generated_items(4, seed=3), evaluate.generated_items(4, seed=3)
    assert [(x.question, x.answers, x.kind) for x in a] == [(x.question, x.answers, x.kind) for x in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert [x.kind for x in a] == ["color"] * 4 + ["count"] * 4 + ["shape_at"] * 4


def test_training_dialogues_are_tokenized_as_the_runtime_tokenizes_them(demo_dirs):
    """The answers are learnt on the ids the runtime will feed the model: each turn's prompt as
    Owl2.tokenize gives it, then the answer and </s>."""
    import random

    import sentencepiece as spm
    from owl2_edge import scenes
    from owl2_edge.convert import reference_io, train_demo
    from owl2_edge.prompt import Turn, render, tools_text
    from owl2_edge.scenes import random_scene
    from owl2_edge.tokenizer import Tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_CHECKPOINT / "tokenizer.model"))
    rng = random.Random(0)
    with Tokenizer(demo_dirs["F32"] / "decoder-F32.gguf") as tok:
        for _ in range(20):
            qs = rng.sample(random_scene(rng, "train").questions(), 2)
            d = train_demo.dialogue(sp, qs)
            prompt = render([Turn(qs[0].text, qs[0].answer), Turn(qs[1].text)], n_images=1)
            assert d.ids[:d.answer_spans[1][0]] == tok.tokenize(prompt)
            closed = prompt + " " + qs[1].answer + "</s>"
            assert d.ids == tok.tokenize(closed) == reference_io.tokenize(sp, closed)
            a, b = d.answer_spans[1]
            assert tok.detokenize(d.ids[a:b]).strip() == qs[1].answer
            assert d.ids[b - 1] == tok.eos_id
        # A clip's frames and the tool's system text, as Owl2.ask(frames, q, system=...) renders.
        system = tools_text([scenes.REPORT_TOOL])
        for _ in range(10):
            clip = scenes.random_clip(rng, "train", rng.randint(2, 8))
            scene = random_scene(rng, "train")
            for qs, n, text in [(clip.questions()[:2], clip.n_frames, None),
                                (train_demo.tool_dialogue_questions(rng, scene, 2), 1, system)]:
                d = train_demo.dialogue(sp, qs, n_images=n, system=text)
                prompt = render([Turn(qs[0].text, qs[0].answer), Turn(qs[1].text)], n_images=n,
                                system=text)
                assert d.ids[:d.answer_spans[1][0]] == tok.tokenize(prompt)
                assert d.ids.count(names.IMAGE_TOKEN_ID) == n
                a, b = d.answer_spans[1]
                assert tok.detokenize(d.ids[a:b]).strip() == qs[1].answer


def test_the_batched_training_forward_is_the_reference_s_math():
    import sentencepiece as spm
    from owl2_edge.convert import reference, train_demo
    cfg = train_demo.demo_config()
    model = reference.Owl2Reference(cfg)
    train_demo.init_weights(model, seed=1)
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_CHECKPOINT / "tokenizer.model"))
    train_demo.check_batched_math(model, sp, cfg)  # raises when they differ
    # ... and the check can fail: the visual route ignored in the batched pass.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_demo, "_routed",
                   lambda pair, x, image: pair.multiway[names.TEXT_ROUTE](x))
        with pytest.raises(AssertionError, match="differs from the reference"):
            train_demo.check_batched_math(model, sp, cfg)


def test_the_committed_checkpoint_is_the_demo_config_in_bfloat16():
    import json as _json

    from owl2_edge.convert import train_demo
    from owl2_edge.convert.config import Owl2Config
    assert Owl2Config.from_dir(DEMO_CHECKPOINT) == train_demo.demo_config()
    assert _json.loads((DEMO_CHECKPOINT / "config.json").read_text())["torch_dtype"] == "bfloat16"
    size = sum(f.stat().st_size for f in DEMO_CHECKPOINT.iterdir())
    assert size < 12 * 2**20


def test_training_from_a_checkpoint_takes_only_the_demo_s_own(tiny_checkpoint, tmp_path, capsys):
    """--init (stage 3 from stages 1-2, as scripts/train_demo.sh runs it) refuses a checkpoint
    of another config or tokenizer before training anything."""
    from owl2_edge.convert import train_demo
    with pytest.raises(SystemExit) as exit_:
        train_demo.main([str(tmp_path / "out"), "--init", str(tiny_checkpoint),
                         "--stage1-steps", "0", "--stage2-steps", "0"])
    assert exit_.value.code == 2
    assert "not a demo checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the suite's 600 s is less than the run takes on a busy 2-core machine
def test_a_short_training_run_gets_past_the_image_blind_plateau(tmp_path):
    """500 + 1,000 steps of the two-stage recipe (a third of it) answer from the picture: every
    type well above chance (colour 1/6, count and shape 1/3), shape-at included. (400 + 600
    steps of the first edition were not enough: shape-at 0.47.) The second edition's step costs
    2.2× the first's: about 25 minutes on 2 cores."""
    r = subprocess.run([sys.executable, "-m", "owl2_edge.convert.train_demo", tmp_path / "hf",
                        "--stage1-steps", "500", "--stage2-steps", "1000", "--stage3-steps", "0",
                        "--stage4-steps", "0", "--stage5-steps", "0", "--eval-per-type", "100"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("held-out accuracy"))
    acc = dict((k, float(v)) for k, v in (p.split() for p in line.split(": ")[1].split(", ")))
    assert acc["color"] > 0.5 and acc["count"] > 0.6 and acc["shape_at"] > 0.6, line
    items = evaluate.generated_items(50)
    report = _accuracy(_convert(tmp_path / "hf", tmp_path / "F32", "F32"), items)
    assert report.accuracy() > 0.6, report.to_dict()


# -- many at once: every answer as it is alone -------------------------------------------------------

def _mixed_requests():
    """Eight requests of every kind: questions about three pictures (two about the same one,
    which share its cells), a follow-up turn, and text-only ones; half of them streamed."""
    asks = [(0, "What color is the circle?"), (0, "How many shapes are there?"),
            (1, "What shape is on the left?"), (2, "What color is the square?"),
            (None, "Say hello."), (None, "Write one word about owls."),
            (1, "How many shapes are there?")]
    requests = [{"image": i, "question": q, "history": (), "stream": k % 2 == 1}
                for k, (i, q) in enumerate(asks)]
    first_q, first_a = sample_questions(0)[0]
    requests.append({"image": 0, "question": "And the other shapes?", "stream": True,
                     "history": ((first_q, first_a),)})
    return requests


def _picture(index: int):
    """The two samples, then held-out scenes."""
    import random

    from owl2_edge import scenes
    if index < len(SAMPLES):
        return sample_image(index)
    return scenes.random_scene(random.Random(index), "heldout").draw(224)


def _ask(owl, request) -> str:
    images = [] if request["image"] is None else [_picture(request["image"])]
    kwargs = dict(history=request["history"], temperature=0, max_tokens=24)
    if request["stream"]:
        return "".join(owl.stream(images, request["question"], **kwargs)).strip()
    return owl.ask(images, request["question"], **kwargs)


def test_eight_concurrent_mixed_answers_equal_each_alone(demo_dirs):
    """From eight threads through the engine (4 slots, the others queued), and from eight
    clients through the server: each answer is the one it gets alone, one at a time."""
    import threading

    requests = _mixed_requests()
    with Owl2.load(demo_dirs["Q8_0"], device="cpu") as owl:
        alone = [_ask(owl, r) for r in requests]
    assert len(set(alone)) >= 6  # different questions: a mix-up would show
    with Owl2.load(demo_dirs["Q8_0"], device="cpu", n_ctx=2048, parallel=4) as owl:
        together = [None] * len(requests)
        start = threading.Barrier(len(requests))

        def answer(k):
            start.wait()
            together[k] = _ask(owl, requests[k])

        threads = [threading.Thread(target=answer, args=(k,)) for k in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
        assert owl.engine.steps < sum(len(a) for a in alone)  # answers shared decoder passes
        assert _served(owl, requests) == alone


def _served(owl, requests) -> list[str]:
    """The requests sent at once to `owl2 serve` over `owl`: each answer's text."""
    import base64
    import io
    import json
    import threading
    import urllib.request

    from owl2_edge.serve.app import create_app
    from owl2_edge.serve.server import running

    def body(request) -> dict:
        content = [{"type": "text", "text": request["question"]}]
        if request["image"] is not None:
            png = io.BytesIO()
            _picture(request["image"]).save(png, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        turns = []
        for q, a in request["history"]:
            turns += [{"role": "user", "content": content[:-1] + [{"type": "text", "text": q}]},
                      {"role": "assistant", "content": a}]
            content = [{"type": "text", "text": request["question"]}]
        return {"messages": [*turns, {"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 24, "stream": request["stream"]}

    texts = [None] * len(requests)
    with running(create_app(owl)) as url:
        def send(k):
            data = json.dumps(body(requests[k])).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", data,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                raw = r.read().decode()
            if not requests[k]["stream"]:
                texts[k] = json.loads(raw)["choices"][0]["message"]["content"]
                return
            events = [json.loads(line[6:]) for line in raw.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            texts[k] = "".join(e["choices"][0]["delta"].get("content") or ""
                               for e in events if e.get("choices")).strip()

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return texts


# -- structured output: every answer parses and follows its schema ----------------------------------

PICTURE_SCHEMA = {
    "type": "object",
    "properties": {
        "circle_colour": {"enum": ["red", "green", "blue", "yellow", "none"]},
        "shapes": {"type": "integer", "minimum": 0, "maximum": 9},
        "left": {"type": "string", "maxLength": 16},
        "kinds": {"type": "array", "items": {"enum": ["circle", "square", "triangle"]},
                  "maxItems": 3},
        "has_square": {"type": "boolean"},
    },
    "required": ["circle_colour", "shapes", "left", "kinds", "has_square"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_a_hundred_constrained_answers_all_follow_their_schema(demo_dirs, temperature):
    """The issue's bar: 100 answers of the demo model at each temperature, 100 % valid."""
    jsonschema = pytest.importorskip("jsonschema")
    questions = ["Describe the picture as JSON.", "What color is the circle?",
                 "How many shapes are there?", "What shape is on the left?"]
    items = [(_picture(k % 25), questions[k % 4]) for k in range(100)]
    with Owl2.load(demo_dirs["Q8_0"], device="cpu", n_ctx=4 * 512, parallel=4) as owl:
        results = list(owl.batch(items, parallel=4, temperature=temperature, seed=7,
                                 max_tokens=200, response_format={
                                     "type": "json_schema",
                                     "json_schema": {"name": "picture", "schema": PICTURE_SCHEMA,
                                                     "strict": True}}))
    assert len(results) == 100
    for r in results:
        assert r.error is None and r.finish_reason == "stop", r
        jsonschema.validate(json.loads(r.answer), PICTURE_SCHEMA)
