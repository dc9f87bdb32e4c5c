"""The first word after Enter in the chat page of `owl2 serve` (issue 38), in a real Chromium: a
new picture picked, the question typed --delay seconds later, sent with Enter; the time from
Enter to the answer's first character on the page. With the page's read-ahead (POST /v1/warm
when the picture is picked) and without it (that request blocked in the browser: the page as
before), alternating, --rounds times each, the same picture for both runs of a round, so the
two answers are also compared (greedy: they must be equal).

    python benchmarks/bench_page_typing.py --shape 7b [--delay 20] [--rounds 2] [--threads 2]

Needs Debian's chromium and Playwright (the dev extra). A new server (and empty disk cache) for
every run. A benchmark, not a test: it asserts nothing about time. Traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_clients import ServerProcess, free_port, owl2_serve_argv  # noqa: E402

QUESTION = "What is in the picture?"


def one_run(browser, model: Path, picture: Path, delay: float, warm: bool, threads, tmp: Path
            ) -> tuple[float, str]:
    """(seconds from Enter to the first character shown, the answer)."""
    import os
    port = free_port()
    env = dict(os.environ, OWL2_CACHE_DIR=tempfile.mkdtemp(dir=tmp))
    with ServerProcess(owl2_serve_argv(model, port, threads=threads), port, env=env):
        page = browser.new_page()
        page.set_default_timeout(600_000)
        if not warm:
            page.route("**/v1/warm", lambda route: route.abort())
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        page.set_input_files("#file", str(picture))
        page.locator("#attachments img").wait_for()
        time.sleep(delay)                                  # the user looks and types
        page.fill("#prompt", QUESTION)
        enter = time.perf_counter()
        page.press("#prompt", "Enter")
        # The first character on the page (or, for an answer with none to show, its end).
        page.wait_for_function(
            "() => { const a = document.querySelector('.message.assistant .answer');"
            " return (a && a.textContent.length > 0) ||"
            " document.querySelector('.message.assistant .timings, .message.assistant .error'); }")
        first = time.perf_counter() - enter
        page.locator(".message.assistant .timings, .message.assistant .error").first.wait_for()
        answer = page.locator(".message.assistant .answer")
        text = answer.first.text_content() if answer.count() else ""
        page.close()
    return first, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--shape", default=None)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--delay", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.shape:
        from owl2_edge.tools.bench.shapes import shape_folder
        model = shape_folder(args.shape, args.quant)
    else:
        from owl2_edge.model_dir import default_model_path
        model = args.model or default_model_path()
    from playwright.sync_api import sync_playwright

    from owl2_edge import scenes
    results: dict[bool, list[float]] = {True: [], False: []}
    equal = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        for round_no in range(args.rounds):
            picture = Path(tmp) / f"picture-{round_no}.png"
            scenes.random_scene(random.Random(100 + round_no), "heldout").draw(448).save(picture)
            answers = {}
            for warm in ((True, False) if round_no % 2 == 0 else (False, True)):
                first, answers[warm] = one_run(browser, model, picture, args.delay, warm,
                                               args.threads, Path(tmp))
                results[warm].append(first)
                print(f"round {round_no + 1} · {'read ahead' if warm else 'no read-ahead'}: "
                      f"first character {first:.2f} s after Enter, answer {answers[warm]!r}",
                      flush=True)
            equal.append(answers[True] == answers[False])
        browser.close()
    print(f"\n{model}, delay {args.delay:g} s, {args.rounds} rounds, threads "
          f"{args.threads or 'default'}; answers equal with and without: {all(equal)}\n")
    print("| chat page | first character after Enter (median s) | runs |")
    print("|---|---:|---:|")
    for warm in (False, True):
        print(f"| {'read ahead (default)' if warm else 'no read-ahead (as before)'} | "
              f"{statistics.median(results[warm]):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in results[warm])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
