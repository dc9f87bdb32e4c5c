"""A 200-question soak on one Owl2: after a warm-up the process's memory stays flat (RSS growth
under 5 %), no file descriptor leaks, and the same question with the same seed gives the same
answer at the end as at the start. Questions vary (text-only, one and two images, bad input in
between), so that every cache fills, evicts and recovers."""

import pytest

pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import os
from pathlib import Path

import numpy as np
from PIL import Image

from owl2_edge.errors import Owl2Error
from owl2_edge.owl2 import Owl2

QUESTIONS = 200
WARM_UP = 40


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_two_hundred_questions_keep_memory_fds_and_answers_steady(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for i in range(24):  # more pictures than the vision cache holds (16): it evicts
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(path)
        images.append(path)
    probe = dict(temperature=0.8, top_k=20, seed=1234, max_tokens=8)
    with Owl2.load(tiny_model_dir, device="cpu", n_ctx=512) as owl:
        first_answer = owl.ask(images[0], "What is in the picture?", **probe)
        rss_after_warm_up = fds_after_warm_up = None
        errors = 0
        for i in range(QUESTIONS):
            pictures = [images[i % len(images)], images[(i * 7) % len(images)]][: i % 3]
            try:
                if i % 25 == 13:  # bad input in between: refused, and the object goes on
                    owl.ask(tmp_path / "missing.png", "What?", max_tokens=4)
                owl.ask(pictures, f"Question {i}: what do you see?", temperature=0.5, seed=i,
                        max_tokens=6 + i % 5)
            except Owl2Error:
                errors += 1
            if i == WARM_UP:
                rss_after_warm_up, fds_after_warm_up = rss_bytes(), open_fds()
        rss_at_end, fds_at_end = rss_bytes(), open_fds()
        last_answer = owl.ask(images[0], "What is in the picture?", **probe)
    assert errors == QUESTIONS // 25 + (QUESTIONS % 25 > 13)   # exactly the bad inputs
    assert last_answer == first_answer
    assert fds_at_end <= fds_after_warm_up
    growth = (rss_at_end - rss_after_warm_up) / rss_after_warm_up
    print(f"soak: RSS {rss_after_warm_up / 2**20:.1f} -> {rss_at_end / 2**20:.1f} MiB ({growth:+.2%}), "
          f"fds {fds_after_warm_up} -> {fds_at_end}")
    assert growth < 0.05, f"RSS grew {growth:.1%} ({rss_after_warm_up >> 20} -> {rss_at_end >> 20} MiB)"
