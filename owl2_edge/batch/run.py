"""The batch job: rows from an answering engine (Owl2.batch here, or Ray: ray_job.py) written to
the resumable output as they arrive, and a summary at the end.

    with Output.open(out_path, items) as out:
        todo, refused = split_refused(pending(items, out))
        rows = itertools.chain(refused, local_rows(owl, todo, parallel=4, temperature=0))
        summary = write_rows(rows, out, total=len(items), on_row=...)

Nothing here prints: the CLI passes on_row to draw its progress bar and prints the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from owl2_edge.batch.engine import BatchItem, BatchResult, image_label
from owl2_edge.batch.inputs import RefusedItem
from owl2_edge.batch.output import Output


def pending(items: Sequence[BatchItem], out: Output) -> list[BatchItem]:
    """The items whose row is not in the output yet, in input order."""
    return [item for item in items if item.index not in out.done]


def split_refused(items: Sequence[BatchItem]) -> tuple[list[BatchItem], list[dict]]:
    """The items a model is given, and the error rows of those refused while reading the inputs
    (inputs.RefusedItem): written like any error row, so a rerun skips them instead of stopping
    at the same input again."""
    todo, refused = [], []
    for item in items:
        if isinstance(item, RefusedItem):
            refused.append(BatchResult(item.index, image_label(item.image), item.question,
                                       None, item.error).to_row())
        else:
            todo.append(item)
    return todo, refused


def local_rows(owl, items: Sequence[BatchItem], parallel: int, **sampling) -> Iterator[dict]:
    """The rows of one Owl2 in this process, as each item finishes."""
    for result in owl.batch(items, parallel=parallel, **sampling):
        yield result.to_row()


@dataclass
class Summary:
    out: str
    total: int          # inputs
    skipped: int        # rows a previous run had written
    written: int        # rows this run wrote
    errors: int         # of which error rows
    seconds: float      # this run's wall time, the model's load included

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"out": self.out, "total": self.total, "skipped": self.skipped,
                "written": self.written, "errors": self.errors,
                "images_per_s": round(self.images_per_s, 3), "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        skipped = f", {self.skipped} already there" if self.skipped else ""
        return (f"wrote {self.written} rows to {self.out} ({self.errors} errors{skipped}) · "
                f"{self.images_per_s:.2f} images/s · {self.seconds:.1f} s")


def write_rows(rows: Iterable[dict], out: Output, total: int, started: float,
               on_row: Callable[[dict], None] | None = None) -> Summary:
    """Append each row as it comes. `started`: time.perf_counter() when the run began.
    An interruption (Ctrl-C) leaves every row written so far in the file."""
    skipped = len(out.done)
    summary = Summary(str(out.path), total, skipped, 0, 0, 0.0)
    for row in rows:
        out.write(row)
        summary.written += 1
        summary.errors += "error" in row
        if on_row:
            on_row(row)
    summary.seconds = time.perf_counter() - started
    return summary
