"""owl2_edge.serve.prometheus: the text format 0.0.4 for GET /metrics (no model, no server)."""

import math
import sys
import threading

import pytest

from owl2_edge.serve.prometheus import (
    CONTENT_TYPE,
    INTER_TOKEN_BUCKETS,
    TTFT_BUCKETS,
    Exposition,
    Histogram,
)


def test_histogram_cumulative_buckets_sum_count():
    h = Histogram([0.1, 1, 5])
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):  # 0.1 and 1.0 sit exactly on a bound: `le` includes it
        h.observe(v)
    buckets, total, count = h.snapshot()
    assert buckets == [(0.1, 2), (1.0, 4), (5.0, 4), (math.inf, 5)]
    assert total == pytest.approx(8.65)
    assert count == h.count == 5
    assert h.sum == total


def test_histogram_empty_and_bounds():
    assert Histogram(TTFT_BUCKETS).snapshot() == ([(b, 0) for b in TTFT_BUCKETS] + [(math.inf, 0)],
                                                  0.0, 0)
    assert Histogram([1, 2, math.inf]).bounds == (1.0, 2.0)  # +Inf given explicitly: dropped
    for bad in ([2, 1], [1, 1], [math.nan], [-math.inf, 1]):
        with pytest.raises(ValueError):
            Histogram(bad)
    with pytest.raises(ValueError):
        Histogram([1]).observe(math.nan)
    assert list(INTER_TOKEN_BUCKETS) == sorted(INTER_TOKEN_BUCKETS)


def test_histogram_text():
    h = Histogram([0.05, 1, 2.5])
    for v in (0.05, 1, 100):
        h.observe(v)
    e = Exposition()
    e.histogram("owl2_ttft_seconds", "Seconds to the first token.", h)
    assert e.text() == (
        "# HELP owl2_ttft_seconds Seconds to the first token.\n"
        "# TYPE owl2_ttft_seconds histogram\n"
        'owl2_ttft_seconds_bucket{le="0.05"} 1\n'
        'owl2_ttft_seconds_bucket{le="1.0"} 2\n'
        'owl2_ttft_seconds_bucket{le="2.5"} 2\n'
        'owl2_ttft_seconds_bucket{le="+Inf"} 3\n'
        "owl2_ttft_seconds_sum 101.05\n"
        "owl2_ttft_seconds_count 3\n")


def test_le_spelling_large_bounds():
    # Go (so prometheus_client) writes 1e+06 where Python's repr keeps 1000000.0
    e = Exposition()
    e.histogram("h", "h", Histogram([999999, 1e6, 1.25e7, 1e20]))
    les = [line.split('"')[1] for line in e.text().splitlines() if "_bucket" in line]
    assert les == ["999999.0", "1e+06", "1.25e+07", "1e+20", "+Inf"]


def test_counter_total_suffix():
    for name in ("owl2_requests", "owl2_requests_total"):
        e = Exposition()
        e.counter(name, "Requests answered.", 3)
        assert e.text() == ("# HELP owl2_requests_total Requests answered.\n"
                            "# TYPE owl2_requests_total counter\n"
                            "owl2_requests_total 3\n")
    with pytest.raises(ValueError):
        Exposition().counter("c", "c", -1)


def test_escaping():
    e = Exposition()
    e.gauge("g", 'back\\slash "quoted"\nsecond line', 1, {"path": 'a"b\\c\nd'})
    assert e.text().splitlines() == [
        '# HELP g back\\\\slash "quoted"\\nsecond line',  # HELP leaves double quotes alone
        "# TYPE g gauge",
        'g{path="a\\"b\\\\c\\nd"} 1',
    ]


def test_values():
    e = Exposition()
    for i, v in enumerate([3, 3.0, 0.25, 1e-05, 1e21, math.inf, -math.inf, math.nan, -2, True]):
        e.gauge("g", "g", v, {"i": i})
    values = [line.rsplit(" ", 1)[1] for line in e.text().splitlines()[2:]]
    assert values == ["3", "3", "0.25", "1e-05", "1e+21", "+Inf", "-Inf", "NaN", "-2", "1"]


def test_one_family_grouped_under_one_help_and_type():
    e = Exposition()
    e.counter("owl2_responses", "Responses by status.", 5, {"status": "200"})
    e.gauge("owl2_queue_depth", "Waiting requests.", 2)
    e.counter("owl2_responses_total", "Responses by status.", 1, {"status": "429"})
    text = e.text()
    assert text.endswith("\n")
    assert text.splitlines() == [
        "# HELP owl2_responses_total Responses by status.",
        "# TYPE owl2_responses_total counter",
        'owl2_responses_total{status="200"} 5',
        'owl2_responses_total{status="429"} 1',
        "# HELP owl2_queue_depth Waiting requests.",
        "# TYPE owl2_queue_depth gauge",
        "owl2_queue_depth 2",
    ]
    assert Exposition().text() == ""


def test_refusals():
    e = Exposition()
    e.gauge("x", "x", 1)
    for clash in (lambda: e.counter("x", "x", 1),        # x_total counter vs x gauge
                  lambda: e.histogram("x", "x", Histogram([1])),
                  lambda: e.gauge("x", "x", 2)):          # the same series twice
        with pytest.raises(ValueError):
            clash()
    e.counter("y", "y", 1)
    with pytest.raises(ValueError):
        e.gauge("y_total", "y", 1)
    for name in ("", "1abc", "a-b", "a b", "é", "a\n"):
        with pytest.raises(ValueError):
            Exposition().gauge(name, "h", 1)
    for label in ("", "1a", "a-b", "a:b", "a\n"):
        with pytest.raises(ValueError):
            Exposition().gauge("g", "h", 1, {label: "v"})
    Exposition().gauge("ns:sub_metric", "colons are fine in metric names", 1, {"_ok9": "v"})


def test_concurrent_observations_are_all_counted():
    # Several observers and a reader at once, as a worker thread observes while the event loop
    # renders. Every observation must count, and every snapshot must agree with itself.
    h = Histogram([0.5, 1])
    threads, per_thread = 8, 5000
    start = threading.Barrier(threads + 1)  # the observers and the reader start together
    observing = threading.Event()
    observing.set()
    snapshots, torn = [0], []

    def observe(i):
        start.wait()
        for _ in range(per_thread):
            h.observe(0.5 if i % 2 else 2.0)  # binary-exact values: the sum is exact too

    def read():
        start.wait()
        while observing.is_set():
            buckets, total, count = h.snapshot()
            snapshots[0] += 1
            halves = buckets[0][1]  # the 0.5s; every other observation is a 2.0
            if buckets[-1][1] != count or halves * 0.5 + (count - halves) * 2.0 != total:
                torn.append((buckets, total, count))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a missing lock would show
    try:
        observers = [threading.Thread(target=observe, args=(i,)) for i in range(threads)]
        reader = threading.Thread(target=read)
        for t in observers + [reader]:
            t.start()
        for t in observers:
            t.join()
        observing.clear()
        reader.join()
    finally:
        sys.setswitchinterval(old)
    buckets, total, count = h.snapshot()
    n = threads * per_thread
    assert count == n
    assert buckets == [(0.5, n // 2), (1.0, n // 2), (math.inf, n)]
    assert total == n // 2 * 0.5 + n // 2 * 2.0
    assert snapshots[0] > 0 and torn == []


def test_prometheus_client_parses_it():
    parser = pytest.importorskip("prometheus_client.parser")
    h = Histogram(INTER_TOKEN_BUCKETS)
    for v in (0.004, 0.01, 0.3, 9.0):
        h.observe(v)
    e = Exposition()
    e.counter("owl2_tokens", "Tokens generated.", 42)
    e.counter("owl2_responses", 'By "status".\nAll of them.', 5, {"status": "200", "x": 'q"\\\n'})
    e.counter("owl2_responses", 'By "status".\nAll of them.', 1, {"status": "429", "x": ""})
    e.gauge("owl2_queue_depth", "Waiting.", 0.25)
    e.histogram("owl2_inter_token_seconds", "Between tokens.", h)
    families = {f.name: f for f in parser.text_string_to_metric_families(e.text())}
    assert {n: f.type for n, f in families.items()} == {
        "owl2_tokens": "counter", "owl2_responses": "counter", "owl2_queue_depth": "gauge",
        "owl2_inter_token_seconds": "histogram"}
    assert families["owl2_responses"].documentation == 'By "status".\nAll of them.'
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("owl2_tokens_total", ())] == 42
    assert samples[("owl2_responses_total", (("status", "200"), ("x", 'q"\\\n')))] == 5
    assert samples[("owl2_responses_total", (("status", "429"), ("x", "")))] == 1
    assert samples[("owl2_queue_depth", ())] == 0.25
    assert samples[("owl2_inter_token_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("owl2_inter_token_seconds_bucket", (("le", "0.01"),))] == 2
    assert samples[("owl2_inter_token_seconds_bucket", (("le", "0.5"),))] == 3
    assert samples[("owl2_inter_token_seconds_bucket", (("le", "+Inf"),))] == 4
    assert samples[("owl2_inter_token_seconds_count", ())] == 4
    assert samples[("owl2_inter_token_seconds_sum", ())] == pytest.approx(9.314)


def test_content_type():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
