"""Bounded runs of the fuzzers on the tiny model. The file fuzzer (tests/fuzz_model_files.py):
every mutated GGUF, manifest, ONNX or image must end in an answer or an Owl2Error; never another
exception, a crash of the process or a hang. OWL2_FUZZ_SECONDS sets the budget (default 120);
the README gives the longer run. Then the constraint fuzzer and the clip fuzzer."""

import pytest

pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_model_files import fuzz  # noqa: E402


def test_mutated_model_files_and_images_never_crash_hang_or_escape(tiny_model_dir, tmp_path):
    seconds = float(os.environ.get("OWL2_FUZZ_SECONDS", "120"))
    result = fuzz(tiny_model_dir, seconds, seed=int(os.environ.get("OWL2_FUZZ_SEED", "7")),
                  out=tmp_path / "findings", log=lambda line: None)
    print(f"fuzz: {result['iterations']} inputs in {seconds:.0f} s")
    assert result["iterations"] > 100
    # Each kind of file was reached, and most mutations were refused, not ignored.
    targets = {target for target, _ in result["outcomes"]}
    assert {"decoder", "mam", "manifest", "vision-fp32", "image-PNG"} <= targets
    assert not result["findings"], "\n".join(f"{t} {o}: {d} ({p})" for t, o, d, p in result["findings"])


def test_quantize_of_mutated_folders_never_crashes_hangs_escapes_or_writes_a_bad_folder(
        tiny_model_dir, tmp_path):
    """`owl2 quantize` (issue 24) on a few hundred folders with one file mutated, most without
    the manifest's file records (so the files' own checks are what refuses them): an Owl2Error,
    or a written folder that loads."""
    from fuzz_model_files import fuzz_quantize
    n = int(os.environ.get("OWL2_FUZZ_QUANTIZE", "300"))
    result = fuzz_quantize(tiny_model_dir, n, seed=int(os.environ.get("OWL2_FUZZ_SEED", "7")),
                           out=tmp_path / "findings", seconds=240, log=lambda line: None)
    print(f"fuzz quantize: {result['iterations']} folders")
    assert result["iterations"] == n
    outcomes = {outcome for _, outcome in result["outcomes"]}
    assert {"ok", "owl2error"} <= outcomes
    refused_mam = sum(k for (target, outcome), k in result["outcomes"].items()
                      if target == "mam" and outcome == "owl2error")
    assert refused_mam > n // 4  # the sidecar was reached, and mostly refused
    assert not result["findings"], "\n".join(f"{t} {o}: {d} ({p})" for t, o, d, p in result["findings"])


def test_constraints_through_the_api_and_the_server_are_refused_by_name_or_answered(
        tiny_server):
    """The schema and grammar fuzzer (tests/fuzz_constraints.py, issue 36): OWL2_FUZZ_CONSTRAINTS
    (default 2,000) constraints through Owl2.ask, every seventh also through the server,
    streamed or not. Each is a GrammarError / 400 naming its field, or an answer within 10 s;
    an answer its grammar ended validates against its schema; never another exception, a 5xx,
    a stream without its end, or a slot left busy."""
    import json
    import time
    import urllib.error
    import urllib.request

    import jsonschema

    from fuzz_constraints import constraints
    from owl2_edge.errors import GrammarError
    owl, url = tiny_server.owl, tiny_server.url + "/v1/chat/completions"
    n = int(os.environ.get("OWL2_FUZZ_CONSTRAINTS", "2000"))
    findings, outcomes = [], {}

    def finding(i, kind, value, what):
        findings.append(f"#{i} {kind} {json.dumps(value)[:200]}: {what}")

    def post(body):
        request = urllib.request.Request(url, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    for i, (kind, value) in enumerate(constraints(n, seed=int(os.environ.get("OWL2_FUZZ_SEED",
                                                                             "7")))):
        t = time.monotonic()
        try:
            text = owl.ask([], "Go.", temperature=0, max_tokens=24, **{kind: value})
        except GrammarError as e:
            outcome = "refused"
            if e.param != kind or "\n" in str(e):
                finding(i, kind, value, f"refused without naming {kind} in one line: {e}")
        except Exception as e:  # noqa: BLE001 (any other is what the fuzzer looks for)
            outcome = "error"
            finding(i, kind, value, f"{type(e).__name__}: {e}")
        else:
            outcome = f"answered-{owl.stats.finish_reason}"
            if kind == "json_schema" and owl.stats.finish_reason == "stop":
                try:
                    jsonschema.validate(json.loads(text), value)
                except jsonschema.ValidationError as e:
                    finding(i, kind, value, f"answer {text!r} does not validate: {e.message}")
                except (ValueError, jsonschema.SchemaError):
                    outcome += "-unverifiable"  # a regex or schema Python's validator cannot read
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if time.monotonic() - t > 10:
            finding(i, kind, value, f"took {time.monotonic() - t:.1f} s")
        if i % 7 == 0:
            stream = i % 14 == 0
            status, body = post({"model": "owl2", "max_tokens": 24, "temperature": 0,
                                 "stream": stream, kind: value,
                                 "messages": [{"role": "user", "content": "Go."}]})
            if status not in (200, 400):
                finding(i, kind, value, f"HTTP {status}: {body[:200]}")
            elif stream and status == 200:
                last = [line for line in body.splitlines() if line.startswith("data: ")][-1]
                if last != "data: [DONE]" and '"grammar_error"' not in last:
                    finding(i, kind, value, f"the stream ended with {last[:200]}")
    print(f"fuzz constraints: {n}: {outcomes}")
    assert owl.engine.n_running == 0 and owl.engine.n_waiting == 0  # no slot left busy
    assert outcomes.get("refused", 0) > n // 10 and \
        sum(k for o, k in outcomes.items() if o.startswith("answered")) > n // 3
    assert not findings, "\n".join(findings[:30])


def test_mutated_clips_are_refused_in_one_line_or_read_and_never_hurt_the_server(
        tiny_server, tmp_path):
    """The clip fuzzer (tests/fuzz_clips.py, issue 40): OWL2_FUZZ_CLIPS (default 150) mutated
    MP4, WebM, MKV, MOV and GIF clips read as a user's clip: frames or one refusal line, within
    the clip bounds' time; then every fifth mutant as a video_url part to the server: a 200 or
    a 400, never a 5xx, and the server answers the next request."""
    pytest.importorskip("av", reason="videos need PyAV (pip install 'owl2-edge[video]')")
    import random
    from fuzz_clips import fuzz as fuzz_clips, mutate, post_clip, seed_clips
    n = int(os.environ.get("OWL2_FUZZ_CLIPS", "150"))
    seed = int(os.environ.get("OWL2_FUZZ_SEED", "7"))
    result = fuzz_clips(n, seed, tmp_path, log=lambda line: None)
    print(f"fuzz clips: {result['outcomes']}, slowest {result['slowest']:.2f} s")
    assert not result["findings"], "\n".join(map(str, result["findings"]))
    outcomes = {outcome for _, outcome in result["outcomes"]}
    assert outcomes == {"frames", "refused"}  # both reached; nothing escaped

    def post(data: bytes) -> int:
        return post_clip(tiny_server.url, data, "What happens?", max_tokens=2)
    rng = random.Random(seed)
    seeds = seed_clips(tmp_path)
    statuses = [post(mutate(rng, rng.choice(list(seeds.values())), list(seeds.values()))[1])
                for _ in range(max(1, n // 5))]
    assert set(statuses) <= {200, 400}, statuses
    assert post(seeds[".mp4"]) == 200
