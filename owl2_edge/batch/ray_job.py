"""`owl2 batch --ray`: the same job on Ray Data (optional extra: pip install 'owl2-edge[ray]').

    rows = ray_rows(todo, load_options, sampling, parallel=4, actors=2, address=None)

The driver makes a dataset of the items still to do; `map_batches` runs them through a pool of
`actors` OwlActor, each holding one Owl2 loaded once in its __init__ and answering a batch of
about 4 x parallel items with Owl2.batch; the driver writes each row as its batch comes back
(run.write_rows, the same resumable output as a local run).

Images travel as paths, made absolute on the driver (a Ray worker's working folder is not the
driver's), and so does the model folder: every node of the cluster must see the same files at
the same paths (a shared file system, or the same copy everywhere).

Each row crosses Ray as its JSON text: Ray Data's batches are numpy arrays or pandas frames,
where None becomes NaN or a null of some dtype and nested dicts (timings) turn into objects; a
JSON string goes through unchanged, unicode included, and is parsed back on the driver.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Iterator, Sequence

from owl2_edge.batch.engine import BatchItem, image_label
from owl2_edge.checks import display_path
from owl2_edge.errors import Owl2Error

INSTALL_HINT = "pip install 'owl2-edge[ray]'"
# Items per Ray batch, per sequence decoded together: enough that an actor keeps its `parallel`
# sequences busy between batches, few enough that rows reach the file often.
BATCH_PER_SEQUENCE = 4


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without its data extra has no ray.data)
    except ImportError as e:
        raise Owl2Error(f"--ray needs Ray Data ({e.name or 'ray'} is missing): {INSTALL_HINT}") \
            from None
    return ray


class OwlActor:
    """One Owl2 per Ray actor: loaded once, then Owl2.batch on each batch of rows."""

    def __init__(self, load_options: dict, sampling: dict, parallel: int):
        from owl2_edge.owl2 import Owl2
        self.owl = Owl2.load(**load_options)
        self.sampling, self.parallel = sampling, parallel

    def __call__(self, batch):
        import pandas as pd
        items = [BatchItem(int(index), _path_or_none(image), str(question))
                 for index, image, question in zip(batch["index"], batch["image"],
                                                   batch["question"])]
        rows = [result.to_row()
                for result in self.owl.batch(items, parallel=self.parallel, **self.sampling)]
        return pd.DataFrame({"index": [row["index"] for row in rows],
                             "row": [json.dumps(row, ensure_ascii=False) for row in rows]})


def _path_or_none(value):
    """An image cell back from pandas: a path, or None, which Ray may hand over as NaN or pd.NA
    (an Arrow null) depending on its version and on the column's other values."""
    import pandas as pd
    if isinstance(value, str):
        return value
    if value is None or pd.isna(value):
        return None
    return str(value)


def ray_rows(items: Sequence[BatchItem], load_options: dict, sampling: dict, parallel: int,
             actors: int = 1, address: str | None = None) -> Iterator[dict]:
    """The rows of `items` answered on Ray, as their batches finish. Connects to `address`
    (None: $RAY_ADDRESS, else a new local Ray) unless Ray is already initialised, and shuts
    down only a Ray it started."""
    ray = import_ray()
    if not items:
        return
    started_here = not ray.is_initialized()
    if started_here:
        # Ray refuses include_dashboard when it connects to a running cluster.
        connecting = address or os.environ.get("RAY_ADDRESS")
        options = {} if connecting else {"include_dashboard": False}
        try:
            ray.init(address=address or None, logging_level=logging.WARNING, **options)
        except Exception as e:  # Ray raises ConnectionError, ValueError, RuntimeError...
            where = f" at {address}" if address else ""
            raise Owl2Error(f"cannot start or reach Ray{where}: {_last_line(e)}") from None
    try:
        yield from _rows(ray, items, load_options, sampling, parallel, actors)
    finally:
        if started_here:
            ray.shutdown()


def _rows(ray, items, load_options, sampling, parallel, actors) -> Iterator[dict]:
    from owl2_edge.model_dir import default_model_path
    shown = {item.index: image_label(item.image) for item in items}  # as the inputs name them
    absolute = {i: None if name is None else os.path.abspath(name) for i, name in shown.items()}
    records = [{"index": item.index, "image": absolute[item.index], "question": item.question}
               for item in items]
    model = load_options.get("path") or default_model_path()
    load_options = {**load_options, "path": os.path.abspath(model)}
    ray.data.DataContext.get_current().enable_progress_bars = False  # the CLI draws its own
    dataset = ray.data.from_items(records).map_batches(
        OwlActor, fn_constructor_kwargs=dict(load_options=load_options, sampling=sampling,
                                             parallel=parallel),
        batch_size=BATCH_PER_SEQUENCE * parallel, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if load_options.get("device") == "cuda" else 0)
    try:
        for record in dataset.iter_rows():
            row = json.loads(record["row"])
            yield _as_driver_names(row, shown[row["index"]], absolute[row["index"]])
    except ray.exceptions.RayError as e:
        raise Owl2Error(f"the Ray job failed: {_last_line(e)}") from None


def _as_driver_names(row: dict, shown: str | None, absolute: str | None) -> dict:
    """A row as a local run writes it: the image named as the inputs name it, in the row and
    in its error message, rather than by the absolute path the actor read."""
    row["image"] = shown
    if "error" in row and shown is not None and absolute != shown:
        row["error"] = row["error"].replace(display_path(absolute), display_path(shown))
    return row


def _last_line(e: BaseException) -> str:
    """Ray's errors carry the remote traceback; its last line says what failed. An owl2-edge
    error's message is shown as it would be locally, without its class name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return re.sub(r"^owl2_edge\.errors\.\w+: ", "", lines[-1])
