"""`owl2 bench` on the tiny model: every row and every ratio comes out, a shape is built once and
then found in the cache, bad input gives one line. A benchmark's figures are never asserted."""

import json
import subprocess
import sys

import pytest

from owl2_edge.tools.bench import report, runner, shapes, workers
from owl2_edge.errors import Owl2Error
from owl2_edge.model_dir import Manifest

# One thread: the machine's cores may be busy, and ggml's spinning threads would fight for them.
THREADS = "1"


def owl2(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**runner.child_env(), **(env or {})})


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


# --- A whole run on a model folder --------------------------------------------------------------

@pytest.fixture(scope="module")
def result(tiny_model_dir) -> dict:
    r = owl2("bench", "-m", tiny_model_dir, "--rounds", "1", "--threads", THREADS, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bench_gives_every_ratio_with_both_sides_measured(result):
    assert set(result["ratios"]) == {ratio.key for ratio in report.RATIOS}
    for key, ratio in result["ratios"].items():
        assert all(_is_positive_number(ratio[side]) for side in ("ours", "theirs", "speedup")), key
    assert result["ratios"]["decode"]["against"] == "llama.cpp"
    assert result["ratios"]["second_question"]["against"] == "stock pipeline"


def test_every_worker_reports_its_measures_and_its_memory(result, tiny_model_dir):
    rows, m = result["rows"], Manifest.load(tiny_model_dir)
    assert set(rows) == {"decoder/llama.cpp", "decoder/ours", "vision/fp32", "ask/stock",
                         "ask/ours", "ask/ours-cli-1", "ask/ours-cli-128"}
    for engine in ("decoder/llama.cpp", "decoder/ours"):
        row = rows[engine]
        for measure in ("load_s", "text_prefill_tok_s", "image_prefill_pos_s", "decode_tok_s"):
            assert _is_positive_number(row[measure]), (engine, measure)
        # Ours evaluates the image's rows and the text after them; llama.cpp as many positions.
        assert row["image_prefill_positions"] == m.n_visual + workers.IMAGE_TEXT
    assert _is_positive_number(rows["vision/fp32"]["images_per_s"])
    for pipeline in ("ask/stock", "ask/ours"):
        assert _is_positive_number(rows[pipeline]["first_token_s"])
        assert _is_positive_number(rows[pipeline]["second_token_s"])
    # The second question found the image's prefix in ours' KV cache.
    assert rows["ask/ours"]["second_reused_positions"] > m.n_visual
    assert rows["ask/stock"]["vision_file"] == m.vision_files["fp32"]
    # The real `owl2 ask`, at full length (--ignore-eos).
    assert rows["ask/ours-cli-1"]["tokens"] == 1 and rows["ask/ours-cli-128"]["tokens"] == 128
    for process in ("ask/stock", "ask/ours-cli-1"):
        assert _is_positive_number(rows[process]["process_first_token_s"])
    for process, memory in result["memory"].items():
        assert memory["peak_rss_bytes"] > memory["files_bytes"] > 0, process
    assert set(result["memory"]) >= {"decoder/ours", "decoder/llama.cpp", "ask/ours-cli-1",
                                     "ask/stock"}


def test_the_setting_is_recorded_and_a_row_that_cannot_run_says_why(result, tiny_model_dir):
    assert result["machine"]["threads"] == int(THREADS) and result["machine"]["cpu"]
    assert result["model"]["folder"] == str(tiny_model_dir) and result["model"]["quant"] == "F32"
    assert "--shape" in result["skipped"]["vision/torch"]
    assert all(len(runs) == 1 for runs in result["runs"].values())


def test_bench_prints_tables_without_json(tiny_model_dir):
    r = owl2("bench", "-m", tiny_model_dir, "--rounds", "1", "--threads", THREADS,
             "--only", "decoder")
    assert r.returncode == 0, r.stderr
    assert "the decoder alone" in r.stdout and "decode tok/s" in r.stdout
    assert "asking" not in r.stdout  # --only decoder


def test_rounds_rotate_the_order_of_the_jobs(monkeypatch, tiny_model_dir, tmp_path):
    bench = runner.plan(tiny_model_dir, 1, "cpu", ("decoder",), tmp_path / "picture.png")
    started = []
    monkeypatch.setattr(runner, "run_job", lambda job: started.append(job.key) or {"wall_s": 0})
    runs = runner.run_rounds(bench, 2)
    assert started == ["decoder/llama.cpp", "decoder/ours", "decoder/ours", "decoder/llama.cpp"]
    assert {key: len(r) for key, r in runs.items()} == {"decoder/llama.cpp": 2, "decoder/ours": 2}


# --- Named shapes -------------------------------------------------------------------------------

def test_advertised_shapes_are_the_generators_and_1b_is_a_1b_model():
    tiny = pytest.importorskip("owl2_edge.convert.tiny")
    assert set(shapes.ADVERTISED_SHAPES) <= set(tiny.SHAPES)
    one_b = tiny.SHAPES["1b"]()
    assert one_b.n_visual == tiny.SHAPES["7b"]().n_visual
    assert one_b.vision.image_size == 448 and one_b.text.hidden_size % 256 == 0


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    pytest.importorskip("torch", reason="building a shape needs the converter")
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def tiny_shape(bench_cache):
    return shapes.shape_folder("tiny", "F32", cache=bench_cache)


def test_a_shape_is_built_once_with_every_vision_variant(tiny_shape, bench_cache, monkeypatch):
    assert set(Manifest.load(tiny_shape).vision_files) == set(shapes.VISION_VARIANTS)
    assert shapes.shape_config_file(tiny_shape) is not None
    # Only the finished entry: no hidden work folder, no checkpoint left behind.
    assert [p.name for p in bench_cache.iterdir()] == ["tiny-F32"]
    assert sorted(p.name for p in tiny_shape.parent.iterdir()) == ["model", shapes.SHAPE_FILE]

    def build_again(*args):
        raise AssertionError("a cached shape was built again")
    monkeypatch.setattr(shapes, "_build", build_again)
    assert shapes.shape_folder("tiny", "f32", cache=bench_cache) == tiny_shape


def test_an_interrupted_build_leaves_nothing_to_be_taken_for_cached(tmp_path, monkeypatch):
    pytest.importorskip("torch")

    def interrupted(work, *args):
        (work / shapes.MODEL_SUBFOLDER).mkdir()
        raise KeyboardInterrupt
    monkeypatch.setattr(shapes, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes.shape_folder("tiny", "F32", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_shape_built_from_another_definition_is_built_again(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    entry = tmp_path / "tiny-F32"
    (entry / shapes.MODEL_SUBFOLDER).mkdir(parents=True)
    (entry / shapes.MODEL_SUBFOLDER / "owl2.json").write_text("{}")
    (entry / shapes.SHAPE_FILE).write_text('{"config": "an older tiny"}')
    built = []
    monkeypatch.setattr(shapes, "_build", lambda work, *args: built.append(work))
    shapes.shape_folder("tiny", "F32", cache=tmp_path)
    assert len(built) == 1


def test_bench_on_a_shape_runs_the_pytorch_row_and_reuses_the_folder(tiny_shape, bench_cache):
    made = (tiny_shape / "owl2.json").stat().st_mtime_ns
    r = owl2("bench", "--shape", "tiny", "--quant", "F32", "--only", "vision", "--rounds", "1",
             "--threads", THREADS, "--json", env={shapes.CACHE_ENV: str(bench_cache)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["rows"]) == {f"vision/{v}" for v in (*shapes.VISION_VARIANTS, "torch")}
    assert all(_is_positive_number(row["images_per_s"]) for row in out["rows"].values())
    assert out["skipped"] == {} and out["model"]["shape"] == "tiny"
    assert (tiny_shape / "owl2.json").stat().st_mtime_ns == made


def test_a_shape_without_the_converter_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr("owl2_edge.convert.missing_package", lambda: "torch")
    with pytest.raises(Owl2Error, match=r"pip install 'owl2-edge\[convert\]', or pass -m"):
        shapes.shape_folder("7b", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- Bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["-m", "/nonexistent/model"], "no such model folder"),
    (["-m", "/nonexistent/model", "--shape", "7b"], "not both"),
    (["--quant", "Q8_0", "-m", "/nonexistent/model"], "--quant goes with --shape"),
    (["-m", "/nonexistent/model", "--only", "decoder,speed"], "choose from decoder, vision, ask"),
    (["-m", "/nonexistent/model", "--device", "tpu"], "--device"),
    (["-m", "/nonexistent/model", "--rounds", "0"], "--rounds"),
    (["--shape", "13b"], "unknown shape '13b'"),
])
def test_bad_input_is_one_line_and_a_failure(args, message, tmp_path):
    r = owl2("bench", *args, env={shapes.CACHE_ENV: str(tmp_path)})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    if message.startswith("unknown shape") and "owl2-edge[convert]" in lines[0]:
        return  # no converter here: that is said first
    assert message in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing was built
