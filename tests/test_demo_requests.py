"""The demo model's second edition and after (docs/design.md §10): the picture as JSON, the report_shape
tool, and clips of frames. The data's rules are checked without a model; the accuracies on
held-out layouts by the runtime (`owl2 eval --suite ...`'s code) on folders converted here from
the committed checkpoint.
"""

import json
import random
import subprocess
import sys

import pytest

from owl2_edge import constrain, scenes
from owl2_edge.prompt import TOOLS_INTRO, Turn, render, tool_call_text, tools_text
from owl2_edge.scenes import Clip, Scene, Thing

N_PER_TYPE = 100
# Held-out accuracy each type must reach on these questions, per decoder type. Measured on 200
# per type (docs/measurements.md, "The demo model's training runs", run 11), F32 / Q4_K_M: JSON
# 0.99 / 0.99 (free and under the schema alike), calls 0.96 / 0.945, plain replies with the tool
# offered 0.985 / 0.985, clips at 4 frames 1.0 / 0.985 / 0.98 both. The bounds leave a few
# answers' room for the 100 asked here and for float differences between machines.
BOUNDS = {
    "F32": {"json": 0.95, "json_schema": 0.95, "tool_call": 0.9, "tool_reply": 0.94,
            "clip_move": 0.95, "clip_appear": 0.93, "clip_disappear": 0.93},
    "Q4_K_M": {"json": 0.95, "json_schema": 0.95, "tool_call": 0.88, "tool_reply": 0.93,
               "clip_move": 0.95, "clip_appear": 0.93, "clip_disappear": 0.92},
}


# --- The data, without a model ----------------------------------------------------------------------

def test_the_json_answer_is_the_constrained_layout_in_the_schema_s_order():
    scene = Scene((Thing("circle", "yellow", "top"), Thing("triangle", "red", "left"),
                   Thing("circle", "blue", "center")), seed=0)
    answer = scenes.scene_json(scene)
    assert answer == ('{"count": 3, "shapes": [{"place": "left", "shape": "triangle", "color": '
                      '"red"}, {"place": "top", "shape": "circle", "color": "yellow"}, '
                      '{"place": "center", "shape": "circle", "color": "blue"}]}')
    # The grammar engine lays JSON out as json.dumps does, keys in the schema's order.
    assert constrain.JSON_LAYOUT["key_separator"] == ": "
    assert constrain.JSON_LAYOUT["item_separator"] == ", "
    value = json.loads(answer)
    assert list(value) == list(scenes.SCENE_SCHEMA["properties"])
    item_keys = list(scenes.SCENE_SCHEMA["properties"]["shapes"]["items"]["properties"])
    assert all(list(s) == item_keys for s in value["shapes"])
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(value, scenes.SCENE_SCHEMA)


def test_tool_questions_call_by_colour_or_place_and_keep_plain_questions_plain():
    scene = Scene((Thing("square", "red", "right"), Thing("circle", "red", "left")), seed=0)
    qs = scenes.tool_questions(scene)
    calls = {q.text: q.answer for q in qs if q.kind == "tool_call"}
    # Red is drawn twice: no call names it; each place does.
    assert set(calls) == {"Report the shape on the right.", "Report the shape on the left."}
    assert json.loads(calls["Report the shape on the right."]) == {
        "name": "report_shape", "arguments": {"color": "red", "shape": "square"}}
    assert calls["Report the shape on the left."] == tool_call_text(
        "report_shape", {"color": "red", "shape": "circle"})
    plain = [(q.text, q.answer) for q in qs if q.kind == "tool_reply"]
    assert plain == [(q.text, q.answer) for q in scene.questions()]


def test_the_tools_go_first_in_the_first_question_before_its_images():
    system = tools_text([scenes.REPORT_TOOL])
    assert system.startswith(TOOLS_INTRO) and json.loads(system[len(TOOLS_INTRO):]) == [
        scenes.REPORT_TOOL]
    prompt = render([Turn("Report the red shape.")], n_images=1, system=system)
    assert prompt == f"USER: {system} <|image|>Report the red shape. ASSISTANT:"
    # An OpenAI-style system message with an image part gives the same prompt.
    from owl2_edge.openai_chat import messages_to_prompt
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                             {"type": "text", "text": "Report the red shape."}]}]
    assert messages_to_prompt(messages, read_image=lambda url: url) == (prompt, ["x.png"])


def test_a_clip_is_one_scene_whose_actor_moves_appears_or_disappears():
    move = Clip("move", (Thing("triangle", "blue", "top"), Thing("square", "red", "left")),
                n_frames=4, seed=3, end_place="bottom")
    frames = move.frames(112)
    assert len(frames) == 4 and len({f.tobytes() for f in frames}) == 4
    assert [q.answer for q in move.questions()] == ["Down.", "Four.", "Four."]
    # The still shape and the background are the same in every frame: the left third is equal.
    left = [f.crop((0, 0, 37, 112)).tobytes() for f in frames]
    assert len(set(left)) == 1
    appear = Clip("appear", (Thing("circle", "green", "right"),), n_frames=5, seed=3, change_at=2)
    assert [appear.shown(i) for i in range(5)] == [False, False, True, True, True]
    assert [(q.kind, q.answer) for q in appear.questions()] == [("clip_appear", "A circle."),
                                                                ("clip_frames", "Three.")]
    shown = appear.frames(112)
    assert shown[0].tobytes() == shown[1].tobytes() != shown[2].tobytes() == shown[4].tobytes()
    gone = Clip("disappear", (Thing("square", "red", "center"),), n_frames=3, seed=3, change_at=1)
    assert [(q.kind, q.answer) for q in gone.questions()] == [("clip_disappear", "A square."),
                                                              ("clip_frames", "One.")]


def test_clip_directions_and_held_out_clip_layouts():
    rng = random.Random(0)
    words = {}
    for _ in range(400):
        clip = scenes.random_clip(rng, "train", rng.randint(2, 8), "move")
        a, b = scenes.PLACES[clip.things[0].place], scenes.PLACES[clip.end_place]
        expected = ("Right." if b[0] > a[0] else "Left.") if a[1] == b[1] else \
            ("Down." if b[1] > a[1] else "Up.")
        words[expected] = words.get(expected, 0) + 1
        assert clip.questions()[0].answer == expected
        assert len({t.shape for t in clip.things}) == len(clip.things)
    assert set(words) == {"Right.", "Left.", "Down.", "Up."}
    train = {scenes.random_clip(rng, "train", 4).layout for _ in range(2000)}
    held = {scenes.random_clip(rng, "heldout", 4).layout for _ in range(500)}
    assert train and held and not train & held
    with pytest.raises(ValueError, match="2-8 frames"):
        scenes.random_clip(rng, "train", 9)


def test_generated_suites_are_fixed_and_typed():
    from owl2_edge.tools import evaluate
    requests = evaluate.generated_items(3, seed=2, suite="requests")
    assert [x.kind for x in requests] == (["json"] * 3 + ["json_schema"] * 3
                                          + ["tool_call"] * 3 + ["tool_reply"] * 3)
    assert all(x.system == tools_text([scenes.REPORT_TOOL])
               for x in requests if x.kind.startswith("tool"))
    assert all(x.json_schema == scenes.SCENE_SCHEMA for x in requests if x.kind == "json_schema")
    clips = evaluate.generated_items(2, seed=2, suite="clips", frames=5)
    assert [x.kind for x in clips] == ["clip_move"] * 2 + ["clip_appear"] * 2 + \
        ["clip_disappear"] * 2 + ["clip_frames"] * 2
    assert all(len(x.image) == 5 for x in clips)
    shuffled = evaluate.generated_items(2, seed=2, suite="clips", frames=5, shuffled=True)
    for a, b in zip(clips, shuffled):
        assert a.answers == b.answers
        assert sorted(f.tobytes() for f in a.image) == sorted(f.tobytes() for f in b.image)
        assert [f.tobytes() for f in a.image] != [f.tobytes() for f in b.image]
    with pytest.raises(Exception, match="suite 'video'"):
        evaluate.generated_items(2, suite="video")


# --- The trained model ---------------------------------------------------------------------------------

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    from owl2_edge.convert import DEMO_CHECKPOINT
    from owl2_edge.convert.converter import convert
    root = tmp_path_factory.mktemp("demo2")
    for quant in BOUNDS:
        convert(DEMO_CHECKPOINT, root / quant, quant=quant, vision=("fp32",))
    return {quant: root / quant for quant in BOUNDS}


def _report(folder, items):
    from owl2_edge.owl2 import Owl2
    from owl2_edge.tools import evaluate
    with Owl2.load(folder, device="cpu", n_ctx=512) as owl:
        return evaluate.evaluate(owl, items)


@pytest.mark.parametrize("quant", list(BOUNDS))
def test_json_tool_and_clip_answers_meet_the_bound(demo_dirs, quant):
    from owl2_edge.tools import evaluate
    items = (evaluate.generated_items(N_PER_TYPE, seed=0, suite="requests")
             + evaluate.generated_items(N_PER_TYPE, seed=0, suite="clips", frames=4))
    report = _report(demo_dirs[quant], items)
    for kind, bound in BOUNDS[quant].items():
        assert report.total[kind] == N_PER_TYPE
        assert report.accuracy(kind) >= bound, (quant, kind, report.to_dict())


def test_the_model_reads_the_frames_order(demo_dirs):
    """The same clips with their frames shuffled: which way a shape moves falls towards chance
    (a model reading one frame, or the set of frames, would not change its answers)."""
    from owl2_edge.tools import evaluate
    items = evaluate.generated_items(N_PER_TYPE, seed=3, suite="clips", frames=4)
    moves = [x for x in items if x.kind == "clip_move"]
    shuffled = [x for x in evaluate.generated_items(N_PER_TYPE, seed=3, suite="clips", frames=4,
                                                    shuffled=True) if x.kind == "clip_move"]
    in_order, out_of_order = _report(demo_dirs["F32"], moves), _report(demo_dirs["F32"], shuffled)
    assert in_order.accuracy() >= 0.88
    assert out_of_order.accuracy() <= 0.65, out_of_order.to_dict()


def test_eval_cli_runs_each_suite_and_refuses_misplaced_options(demo_dirs, tmp_path):
    def owl2(*args):
        return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=300)
    r = owl2("eval", "-m", demo_dirs["F32"], "--generated", 3, "--suite", "clips", "--frames",
             6, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["questions"] == 12 and set(out["types"]) == set(scenes.CLIP_KINDS)
    r = owl2("eval", "-m", demo_dirs["F32"], "--generated", 3, "--suite", "requests", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["types"]) == {"json", "json_schema", "tool_call", "tool_reply"}
    for args, message in [(("--suite", "video"), "--suite 'video'"),
                          (("--frames", 4), "--frames is for --suite clips"),
                          (("--suite", "clips", "--frames", 9), "--frames"),
                          (("--shuffle-frames",), "--shuffle-frames is for --suite clips")]:
        r = owl2("eval", "-m", demo_dirs["F32"], "--generated", 2, *args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "Hi?", "answer": "Hi."}\n')
    r = owl2("eval", "-m", demo_dirs["F32"], "--data", data, "--suite", "clips")
    assert r.returncode == 1 and "--suite is for --generated" in r.stderr, r.stderr


def test_the_sample_json_and_clip_are_answered_right_and_system_needs_the_template(demo_dirs):
    from owl2_edge.errors import ArgumentError
    from owl2_edge.owl2 import Owl2
    from owl2_edge.tools import demo_image
    with Owl2.load(demo_dirs["F32"], device="cpu") as owl:
        question, expected = demo_image.sample_json(0)
        assert owl.ask(demo_image.sample_image(0), question, temperature=0,
                       max_tokens=96) == expected
        # The JSON answer under its schema is the same text as the free one.
        assert owl.ask(demo_image.sample_image(0), question, temperature=0, max_tokens=96,
                       json_schema=scenes.SCENE_SCHEMA) == expected
        question, expected = demo_image.sample_clip_question()
        assert owl.ask(demo_image.sample_clip_frames(), question, temperature=0) == expected
        # With the tool offered, a plain question keeps its plain answer.
        assert owl.ask(demo_image.sample_image(0), "How many shapes are there?", temperature=0,
                       system=tools_text([scenes.REPORT_TOOL])) == "Three."
        with pytest.raises(ArgumentError, match="system goes into the template"):
            owl.ask([], "USER: Hi ASSISTANT:", raw=True, system="Be brief.")
        assert owl.ask(demo_image.sample_image(0), "How many shapes are there?",
                       temperature=0) == "Three."
