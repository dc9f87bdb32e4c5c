"""`owl2 batch --ray`'s job (owl2_edge/batch/ray_job.py) on a local Ray started here: the rows
it writes equal a local run's, None, unicode and error rows included."""

import json
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="needs Ray (pip install 'owl2-edge[ray]')")
pytest.importorskip("ray.data", reason="needs Ray Data (pip install 'owl2-edge[ray]')")

from PIL import Image, ImageDraw  # noqa: E402

from owl2_edge.batch.inputs import question_items  # noqa: E402
from owl2_edge.batch.output import Output  # noqa: E402
from owl2_edge.batch.ray_job import ray_rows  # noqa: E402
from owl2_edge.batch.run import local_rows, write_rows  # noqa: E402
from owl2_edge.tools.bench.runner import child_env  # noqa: E402

SAMPLING = dict(temperature=0, max_tokens=8)
PARALLEL = 2


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def items(tmp_path, monkeypatch):
    """Six questions read from a JSONL with paths relative to the working folder (which Ray's
    workers do not share): pictures, a text-only unicode question and a missing picture."""
    (tmp_path / "pics").mkdir()
    for k, colour in enumerate(["red", "blue", "green"]):
        image = Image.new("RGB", (64 + 8 * k, 56), "white")
        ImageDraw.Draw(image).ellipse([4, 4, 30 + 6 * k, 40], fill=colour)
        image.save(tmp_path / "pics" / f"{k}.png")
    lines = [{"image": "pics/0.png", "question": "What is this?"},
             {"image": "pics/1.png", "question": "What colour is the shape?"},
             {"image": None, "question": "¿Qué es un búho? 🦉"},
             {"image": "pics/missing.png", "question": "What is this?"},
             {"image": "pics/2.png", "question": "Where is the shape?"},
             {"image": "pics/0.png", "question": "Is it round?"}]
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return question_items("q.jsonl")


def load_options(model_dir):
    # What the CLI passes (cli._batch_setting): the cache holds PARALLEL x the per-answer ctx.
    return dict(path=model_dir, device="cpu", kv_type="f32", n_ctx=PARALLEL * 256, n_threads=1)


def without_timings(rows):
    """index -> row, without what differs run to run (times, prompt positions shared)."""
    return {row["index"]: {k: v for k, v in row.items() if k not in ("timings", "reused_positions")}
            for row in rows}


def test_cli_ray_writes_the_local_rows(tiny_model_dir, items, tmp_path):
    # First in the file: its `owl2 batch --ray` starts its own local Ray, before local_ray does.
    options = ["-m", tiny_model_dir, "--device", "cpu", "--kv-type", "f32", "--ctx", "256",
               "--temperature", "0", "-n", "8", "--parallel", PARALLEL, "--questions", "q.jsonl"]
    local = owl2("batch", *options, "-o", "local.jsonl")
    assert local.returncode == 0, local.stderr
    t = time.perf_counter()
    on_ray = owl2("batch", *options, "-o", "ray.jsonl", "--ray", "--json")
    print(f"owl2 batch --ray: {len(items)} items in {time.perf_counter() - t:.1f} s")
    assert on_ray.returncode == 0, on_ray.stderr
    assert json.loads(on_ray.stdout)["written"] == 6
    assert without_timings(read_rows(tmp_path / "ray.jsonl")) == \
        without_timings(read_rows(tmp_path / "local.jsonl"))


def owl2(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=child_env())


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_ray_rows_equal_local_rows(tiny_model_dir, items, tmp_path, local_ray):
    from owl2_edge.owl2 import Owl2
    with Owl2.load(**load_options(tiny_model_dir)) as owl:
        local = list(local_rows(owl, items, PARALLEL, **SAMPLING))

    t = time.perf_counter()
    with Output.open(tmp_path / "out.jsonl", items) as out:
        summary = write_rows(ray_rows(items, load_options(tiny_model_dir), SAMPLING, PARALLEL),
                             out, len(items), t)
    print(f"Ray job: {len(items)} items in {time.perf_counter() - t:.1f} s")
    rows = read_rows(tmp_path / "out.jsonl")

    assert (summary.written, summary.errors) == (6, 1)
    assert sorted(row["index"] for row in rows) == list(range(6))
    assert without_timings(rows) == without_timings(local)
    assert all(type(row["index"]) is int for row in rows)  # plain Python types, not numpy's
    by_index = {row["index"]: row for row in rows}
    assert by_index[2]["image"] is None and by_index[2]["question"] == "¿Qué es un búho? 🦉"
    assert by_index[0]["image"] == "pics/0.png"  # as the inputs name it, not the actor's path
    assert by_index[3]["error"] == "pics/missing.png: no such file"
    assert all(isinstance(row["timings"], dict) for row in rows if "answer" in row)


def test_ray_resumes_only_what_is_left(tiny_model_dir, items, tmp_path, local_ray):
    out_path = tmp_path / "out.jsonl"
    with Output.open(out_path, items) as out:
        write_rows(ray_rows(items[:2], load_options(tiny_model_dir), SAMPLING, PARALLEL), out,
                   len(items), time.perf_counter())
    with Output.open(out_path, items) as out:
        todo = [item for item in items if item.index not in out.done]
        assert [item.index for item in todo] == [2, 3, 4, 5]
        summary = write_rows(ray_rows(todo, load_options(tiny_model_dir), SAMPLING, PARALLEL),
                             out, len(items), time.perf_counter())
    assert (summary.skipped, summary.written) == (2, 4)
    indices = [json.loads(line)["index"] for line in out_path.read_text().splitlines()]
    assert sorted(indices) == list(range(6))
