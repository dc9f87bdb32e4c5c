"""Prometheus text exposition format, version 0.0.4 (the format llama-server's /metrics speaks),
for `owl2 serve`'s GET /metrics: counters, gauges and histograms (time to first token, time
between tokens) written as text a Prometheus server scrapes.

Hand-written rather than prometheus_client: the runtime keeps its dependencies few, and the part
of the format a server needs is small. What a scraper would reject is refused here, by ValueError:
bad names, one family with two types, the same series twice.

    h = Histogram(TTFT_BUCKETS); h.observe(0.3)        # from any thread
    e = Exposition()
    e.counter("owl2_requests", "Requests answered.", 7, {"status": "200"})
    e.histogram("owl2_ttft_seconds", "Seconds to the first token.", h)
    body = e.text()                                    # served as CONTENT_TYPE
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds in seconds. First token: the prompt's evaluation, images included, on CPU or GPU.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Between two tokens of one answer: a 7B model's decode step, fast GPU to slow CPU.
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # colons are for metric names only


class Histogram:
    """Cumulative buckets over `buckets` (ascending upper bounds; +Inf is implied), their sum and
    count. observe() may run on a worker thread while the event loop renders: both it and
    snapshot() hold the lock, so a snapshot's buckets, sum and count always agree."""

    def __init__(self, buckets: Sequence[float]):
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()
        ascending = all(a < b for a, b in itertools.pairwise(bounds))
        if not ascending or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"buckets must be finite and strictly ascending: {list(buckets)}")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative: observe adds to one
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        value = float(value)
        if math.isnan(value):  # bisect would file it under the first bucket
            raise ValueError("cannot observe NaN")
        # bisect_left: the first bound >= value, so a value equal to a bound counts as `le` it.
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self.sum += value
            self.count += 1

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(le, cumulative count), ..., (inf, count)], sum, count), taken under the lock."""
        with self._lock:
            counts, total, n = list(self._counts), self.sum, self.count
        return list(zip(self.bounds + (math.inf,), itertools.accumulate(counts))), total, n


def _check_name(name: str, pattern: re.Pattern = _METRIC_NAME) -> str:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise ValueError(f"invalid Prometheus name: {name!r}")
    return name


def _value(v: float) -> str:
    """A sample value: integral values without '.0' or exponent (3, not 3.0 or 3e+00), others as
    Python's shortest repr (0.25, 1e-05), which Go's ParseFloat reads back exactly."""
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _le(bound: float) -> str:
    """A bucket's `le`, spelled as prometheus_client spells it (so dashboards written against
    either match): 0.05, 1.0, +Inf, and Go's exponent from 1e+06 up where Python keeps digits."""
    if bound == math.inf:
        return "+Inf"
    s = repr(float(bound))
    whole, _, frac = s.partition(".")
    if bound > 0 and "e" not in s and len(whole) > 6:
        digits = (whole + frac).rstrip("0")
        s = digits[0] + ("." + digits[1:] if digits[1:] else "") + f"e+{len(whole) - 1:02d}"
    return s


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    pairs = []
    for k, v in labels.items():
        v = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        pairs.append(f'{_check_name(k, _LABEL_NAME)}="{v}"')
    return "{" + ",".join(pairs) + "}"


class Exposition:
    """One scrape's text. Samples are grouped by family in first-declared order, so a family
    emitted several times (one call per label set) still gets one # HELP and one # TYPE."""

    def __init__(self):
        # name -> (type, help, {label text: sample lines}); dicts keep the first-declared order
        self._families: dict[str, tuple[str, str, dict[str, list[str]]]] = {}
        self._types: dict[str, str] = {}  # by name less `_total`: `x` gauge and `x` counter clash

    def _series(self, name: str, kind: str, help: str, labels: str) -> list[str]:
        _check_name(name)
        root = name.removesuffix("_total")
        if self._types.setdefault(root, kind) != kind:
            raise ValueError(f"metric {name!r} declared as {kind}, already {self._types[root]}")
        series = self._families.setdefault(name, (kind, help, {}))[2]
        if labels in series:  # a scraper refuses a page that repeats a series
            raise ValueError(f"metric {name!r} already has a sample with labels {labels or '{}'}")
        return series.setdefault(labels, [])

    def counter(self, name: str, help: str, value: float, labels: dict | None = None) -> None:
        # Counters end in _total, and prometheus_client's 0.0.4 writer puts the _total name on the
        # HELP and TYPE lines too (as llama-server does); its parser only groups them that way.
        if value < 0:
            raise ValueError(f"counter {name!r} cannot be negative: {value}")
        name = _check_name(name).removesuffix("_total") + "_total"
        lbl = _labels(labels)
        self._series(name, "counter", help, lbl).append(f"{name}{lbl} {_value(value)}")

    def gauge(self, name: str, help: str, value: float, labels: dict | None = None) -> None:
        lbl = _labels(labels)
        self._series(name, "gauge", help, lbl).append(f"{name}{lbl} {_value(value)}")

    def histogram(self, name: str, help: str, hist: Histogram) -> None:
        lines = self._series(name, "histogram", help, "")
        buckets, total, count = hist.snapshot()
        lines += [f'{name}_bucket{{le="{_le(le)}"}} {_value(n)}' for le, n in buckets]
        lines += [f"{name}_sum {_value(total)}", f"{name}_count {_value(count)}"]

    def text(self) -> str:
        out = []
        for name, (kind, help, series) in self._families.items():
            out.append(f"# HELP {name} " + help.replace("\\", "\\\\").replace("\n", "\\n"))
            out.append(f"# TYPE {name} {kind}")
            out += itertools.chain.from_iterable(series.values())
        return "".join(line + "\n" for line in out)
