"""`owl2 batch`: its inputs, its resumable output, and the command line end to end on the tiny
model (rows equal Owl2.ask's greedy answers; a killed run resumes; bad items give error rows)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageDraw

from owl2_edge.batch.engine import BatchItem
from owl2_edge.batch.inputs import image_items, question_items, read_items
from owl2_edge.batch.output import Output, OutputError
from owl2_edge.tools.bench.runner import child_env
from owl2_edge.errors import ArgumentError
from conftest import like_a_terminal  # noqa: E402

QUESTION = "What is in the picture?"
# Greedy, short answers, the tiny model on the CPU with an exact (f32) cache: as the owl fixture.
MODEL_OPTIONS = ("--device", "cpu", "--kv-type", "f32", "--ctx", "256", "--temperature", "0",
                 "-n", "8")


def owl2(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=child_env())


def start_owl2(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), preexec_fn=like_a_terminal)


def draw(path, k: int) -> None:
    """A small picture of its own per k: a coloured shape on a coloured ground."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black"]
    image = Image.new("RGB", (60 + 7 * k, 48 + 3 * k), colours[(k + 3) % len(colours)])
    box = [4 + k, 6, 30 + 2 * k, 40]
    shape = ImageDraw.Draw(image).ellipse if k % 2 else ImageDraw.Draw(image).rectangle
    shape(box, fill=colours[k % len(colours)])
    image.save(path)


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# What differs from run to run: the times, and how many prompt positions an answer shared
# with the others being answered at the same moment.
RUN_DEPENDENT = {"timings", "reused_positions"}


def without_timings(rows) -> dict[int, dict]:
    """index -> row, without what differs run to run."""
    return {row["index"]: {k: v for k, v in row.items() if k not in RUN_DEPENDENT}
            for row in rows}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    for k in range(5):
        draw(folder / f"pic-{k}.png", k)
    return folder


# -- inputs ----------------------------------------------------------------------------------------

def test_folder_gives_its_images_sorted_by_name(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp"]:
        draw(tmp_path / name, 1)
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "sub").mkdir()
    draw(tmp_path / "sub" / "d.png", 2)  # not recursive
    items = image_items(tmp_path, QUESTION)
    assert [i.image.name for i in items] == ["a.JPG", "b.png", "c.webp"]
    assert [i.index for i in items] == [0, 1, 2]
    assert all(i.question == QUESTION for i in items)


def test_txt_list_resolves_relative_paths_and_skips_comments(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "images.txt"
    listing.write_text(f"# pictures\n\n  one.png  \n../two.png\n{tmp_path / 'three.png'}\n"
                       "   # indented comment\n")
    items = image_items(listing, QUESTION)
    assert [str(i.image) for i in items] == [str(tmp_path / "lists" / "one.png"),
                                              str(tmp_path / "lists" / "../two.png"),
                                              str(tmp_path / "three.png")]
    assert [i.index for i in items] == [0, 1, 2]


def test_jsonl_questions(tmp_path):
    data = tmp_path / "q.jsonl"
    lines = [{"image": "pics/a.png", "question": "What?", "answer": "ignored", "id": 7},
             {"question": "Qué es un búho? 🦉"},
             {"image": None, "question": "No image."},
             {"image": str(tmp_path / "abs.png"), "question": "Absolute?"}]
    data.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n",
                    encoding="utf-8")
    items = question_items(data)
    assert items == [BatchItem(0, tmp_path / "pics/a.png", "What?"),
                     BatchItem(1, None, "Qué es un búho? 🦉"),
                     BatchItem(2, None, "No image."),
                     BatchItem(3, tmp_path / "abs.png", "Absolute?")]


@pytest.mark.parametrize("line, why", [
    ('{"image": "a.png", "question": "ok"', "not valid JSON"),
    ('{"image": "a.png"}', 'needs a "question"'),
    ('{"image": "a.png", "question": "  "}', 'needs a "question"'),
    ('["a.png", "What?"]', "not a JSON object"),
    ('{"image": 3, "question": "What?"}', '"image" must be a path'),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, why):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "fine"}\n\n' + line + "\n")
    with pytest.raises(ArgumentError) as e:
        question_items(data)
    assert str(e.value).startswith(f"{data}:3: {why}")


@pytest.mark.parametrize("images, question, questions, why", [
    (None, None, None, "give --images"),
    ("pics", None, None, "--images needs --question"),
    ("pics", "q", "q.jsonl", "give --questions FILE.jsonl alone"),
    (None, "q", "q.jsonl", "give --questions FILE.jsonl alone"),
])
def test_exactly_one_form_of_input(images, question, questions, why):
    with pytest.raises(ArgumentError, match=why):
        read_items(images, question, questions)


def test_empty_or_missing_inputs(tmp_path):
    with pytest.raises(ArgumentError, match="no images in it"):
        image_items(tmp_path, QUESTION)
    with pytest.raises(ArgumentError, match="no such file"):
        image_items(tmp_path / "missing.txt", QUESTION)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ArgumentError, match="no questions in it"):
        question_items(tmp_path / "empty.jsonl")


# -- the output file, without a model --------------------------------------------------------------

def items_of(n):
    return [BatchItem(i, f"p{i}.png", "Q?") for i in range(n)]


def row_of(i, **extra):
    return {"index": i, "image": f"p{i}.png", "question": "Q?", **extra}


def test_output_skips_done_rows_and_drops_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    whole = [json.dumps(row_of(0, answer="A")), json.dumps(row_of(2, error="bad"))]
    torn = json.dumps(row_of(1, answer="B"))[:-5]  # a kill in the middle of a write
    out.write_text("\n".join(whole) + "\n" + torn)
    with Output.open(out, items_of(3)) as o:
        assert set(o.done) == {0, 2}  # an error row counts as done
        assert out.read_text() == "\n".join(whole) + "\n"  # the torn line is gone
        o.write(row_of(1, answer="B ü"))
    assert [r["index"] for r in read_rows(out)] == [0, 2, 1]
    assert read_rows(out)[2]["answer"] == "B ü"


def test_output_retry_errors_removes_error_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(row_of(0, answer="A")) + "\n" + json.dumps(row_of(1, error="x")) + "\n")
    with Output.open(out, items_of(2), retry_errors=True) as o:
        assert set(o.done) == {0}
    assert [r["index"] for r in read_rows(out)] == [0]


@pytest.mark.parametrize("content", [
    json.dumps(row_of(0, answer="A")).replace("p0.png", "other.png") + "\n",
    json.dumps({**row_of(1, answer="A"), "question": "Other?"}) + "\n",
    json.dumps(row_of(5, answer="A")) + "\n",       # an index beyond the inputs
    "some other file\n",
    '{"index": true}\n',
])
def test_output_refuses_a_file_of_other_inputs_and_leaves_it_alone(tmp_path, content):
    out = tmp_path / "out.jsonl"
    out.write_text(content + '{"torn')
    with pytest.raises(OutputError, match="use another -o or delete it"):
        Output.open(out, items_of(3))
    assert out.read_text() == content + '{"torn'


def test_output_is_locked_while_written(tmp_path):
    with Output.open(tmp_path / "out.jsonl", items_of(1)):
        with pytest.raises(OutputError, match="another owl2 batch is writing it"):
            Output.open(tmp_path / "out.jsonl", items_of(1))


# -- the command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, why", [
    (["--questions", "{bad}"], ":2: not valid JSON"),
    (["--images", "{pics}", "--question", QUESTION, "--parallel", "0"],
     "--parallel must be between 1 and 64, not 0"),
    (["--images", "{pics}", "--question", QUESTION, "--parallel", "65"],
     "--parallel must be between 1 and 64, not 65"),
    (["--images", "{pics}"], "--images needs --question"),
    (["--images", "{pics}", "--question", QUESTION, "--ray-actors", "2"],
     "--ray-actors goes with --ray"),
    (["--images", "{pics}", "--question", QUESTION, "--temperature", "-1"], "temperature"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, pictures, args, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\n{"question": oops}\n')
    args = [a.format(bad=bad, pics=pictures) for a in args]
    r = owl2("batch", *args, "-o", tmp_path / "out.jsonl", "-m", tmp_path / "no-model")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and why in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out.jsonl").exists()  # nothing written before the inputs are good


def test_batch_takes_the_runtime_and_sampling_options_of_ask():
    import typer.main
    from owl2_edge.cli import app
    commands = typer.main.get_group(app).commands
    options = {name: {o for p in commands[name].params for o in p.opts if o.startswith("--")}
               for name in ("ask", "batch")}
    assert options["ask"] - {"--raw", "--no-stream", "--verbose"} <= options["batch"]


@pytest.mark.parametrize("parallel", [2, 3])
def test_rows_equal_ask_greedy_answers(tiny_model_dir, owl, pictures, tmp_path, parallel):
    out = tmp_path / "out.jsonl"
    r = owl2("batch", "-m", tiny_model_dir, *MODEL_OPTIONS, "--images", pictures,
             "--question", QUESTION, "-o", out, "--parallel", parallel, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["total"], summary["written"], summary["errors"]) == (5, 5, 0)
    rows = read_rows(out)
    assert sorted(row["index"] for row in rows) == list(range(5))
    for row in rows:
        image = pictures / f"pic-{row['index']}.png"
        answer = owl.ask(image, QUESTION, temperature=0, max_tokens=8)
        expected = {"index": row["index"], "image": str(image), "question": QUESTION,
                    "answer": answer, "prompt_tokens": owl.stats.prompt_positions,
                    "completion_tokens": owl.stats.generated_tokens,
                    "finish_reason": owl.stats.finish_reason}
        assert {k: row.get(k) for k in expected} == expected
        assert set(row) - set(expected) <= RUN_DEPENDENT and "error" not in row
        assert set(row["timings"]) >= {"vision", "prefill", "decode", "total"}


N_MANY = 32


@pytest.fixture(scope="module")
def many_questions(pictures, tmp_path_factory):
    """A JSONL of 32 questions about the pictures (with a text-only one and unicode): enough
    that a run can be stopped while it is answering."""
    data = tmp_path_factory.mktemp("many") / "questions.jsonl"
    lines = [{"image": str(pictures / f"pic-{k % 5}.png"), "question": f"Question {k}: what is it?"}
             for k in range(N_MANY)]
    lines[7] = {"question": "Un búho ¿qué es? 🦉"}
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                    encoding="utf-8")
    return data


# Long answers (every one runs to -n) so that a run lasts long enough to be stopped.
LONG = ("--device", "cpu", "--kv-type", "f32", "--ctx", "256", "--temperature", "0", "-n", "32",
        "--ignore-eos", "--parallel", "2")


@pytest.fixture(scope="module")
def clean_run(tiny_model_dir, many_questions, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out.jsonl"
    r = owl2("batch", "-m", tiny_model_dir, *LONG, "--questions", many_questions, "-o", out)
    assert r.returncode == 0, r.stderr
    return read_rows(out)


def stop_after_first_row(args, out, sig) -> subprocess.Popen:
    """Start `owl2 batch`, send `sig` as soon as OUT holds a whole row, wait for the end."""
    process = start_owl2(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and b"\n" in out.read_bytes():
            process.send_signal(sig)
            break
        time.sleep(0.002)
    process.communicate(timeout=120)
    return process


def test_killed_run_resumes_to_the_clean_result(tiny_model_dir, many_questions, clean_run,
                                                 tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["batch", "-m", tiny_model_dir, *LONG, "--questions", many_questions, "-o", out]
    killed = stop_after_first_row(args, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    kept = out.read_bytes()
    whole = kept[:kept.rfind(b"\n") + 1].count(b"\n")
    assert 1 <= whole < N_MANY

    r = owl2(*args, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["skipped"] == whole and summary["written"] == N_MANY - whole
    rows = read_rows(out)
    assert sorted(row["index"] for row in rows) == list(range(N_MANY))  # each exactly once
    assert without_timings(rows) == without_timings(clean_run)


def test_ctrl_c_exits_130_and_keeps_finished_rows(tiny_model_dir, many_questions, clean_run,
                                                  tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["batch", "-m", tiny_model_dir, *LONG, "--questions", many_questions, "-o", out]
    stopped = stop_after_first_row(args, out, signal.SIGINT)
    assert stopped.returncode == 130
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    clean = without_timings(clean_run)
    for index, row in without_timings(read_rows(out)).items():
        assert row == clean[index]


def test_a_torn_last_line_is_answered_again(tiny_model_dir, many_questions, clean_run, tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in clean_run[:10]]
    out.write_text("".join(lines[:9]) + lines[9][:len(lines[9]) // 2], encoding="utf-8")
    r = owl2("batch", "-m", tiny_model_dir, *LONG, "--questions", many_questions, "-o", out,
             "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 9
    rows = read_rows(out)
    assert sorted(row["index"] for row in rows) == list(range(N_MANY))
    assert without_timings(rows) == without_timings(clean_run)


def test_bad_items_give_error_rows_and_the_others_answer(tiny_model_dir, pictures, tmp_path):
    (tmp_path / "broken.png").write_bytes(os.urandom(300))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{pictures / 'pic-0.png'}\nbroken.png\nmissing.png\n"
                       f"{pictures / 'pic-1.png'}\n")
    out = tmp_path / "out.jsonl"
    args = ["batch", "-m", tiny_model_dir, *MODEL_OPTIONS, "--images", listing, "--question",
            QUESTION, "-o", out, "--parallel", "2"]
    r = owl2(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["errors"] == 2
    rows = {row["index"]: row for row in read_rows(out)}
    assert set(rows) == {0, 1, 2, 3}
    assert "answer" in rows[0] and "answer" in rows[3]
    assert rows[1] == {"index": 1, "image": str(tmp_path / "broken.png"), "question": QUESTION,
                       "error": rows[1]["error"]}
    assert "broken.png" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert rows[2]["error"].endswith("missing.png: no such file")

    # Error rows count as done; --retry-errors tries them again (the missing one now exists).
    draw(tmp_path / "missing.png", 3)
    assert json.loads(owl2(*args, "--json").stdout)["written"] == 0
    r = owl2(*args, "--retry-errors", "--json")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["written"], json.loads(r.stdout)["errors"]) == (2, 1)
    rows = {row["index"]: row for row in read_rows(out)}
    assert len(read_rows(out)) == 4 and "answer" in rows[2] and "error" in rows[1]


def test_resume_refuses_an_output_of_other_inputs(tiny_model_dir, pictures, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["batch", "-m", tiny_model_dir, *MODEL_OPTIONS, "--images", pictures, "-o", out]
    assert owl2(*args, "--question", QUESTION).returncode == 0
    before = out.read_bytes()
    r = owl2(*args, "--question", "Another question?")
    assert r.returncode == 1
    assert "was written for other inputs" in r.stderr and "use another -o or delete it" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == before


def test_ray_without_ray_says_how_to_install_it(pictures, tmp_path):
    # A `ray` package that fails to import, first on the path: as if Ray were not installed.
    (tmp_path / "fake" / "ray").mkdir(parents=True)
    (tmp_path / "fake" / "ray" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'ray'\", name='ray')\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "fake"),
                                                      env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "batch", "--images", str(pictures),
                        "--question", QUESTION, "-o", str(tmp_path / "out.jsonl"), "--ray"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1
    assert "pip install 'owl2-edge[ray]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
