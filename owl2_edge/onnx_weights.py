"""Vision ONNX files whose weights ONNX Runtime maps instead of copying (docs/design.md §12).

A single-file ONNX holds its weights inside the protobuf: ONNX Runtime parses the whole file and
copies every weight into its own memory before a session starts (4.6 s and 2.4 GB of peak memory
for the 7B release's 1.5 GB fp32 vision model on 2 cores). Weights kept in a data file beside the
graph ("external data"), each at an offset aligned to ALIGNMENT, are memory-mapped by ONNX
Runtime instead: the same session starts in 2.0 s at 1.6 GB, and the weights' pages are the page
cache's, shared with any other process that maps the file.

    save_mappable(onnx.load(path), path)     # path + names.vision_data_file(path.name)
"""

from __future__ import annotations

from pathlib import Path

from owl2_edge import names

# ONNX Runtime maps external data only at offsets that are multiples of the allocation
# granularity (64 KiB on Windows, a page elsewhere): 64 KiB suits both.
ALIGNMENT = 1 << 16
# Tiny tensors (shapes, scalars) stay in the graph, as onnx's own writer leaves them. Tensors
# under ALIGNMENT go to the data file unaligned, packed (ONNX Runtime reads those into memory):
# aligned, each would take a whole 64 KiB step of the file.
MIN_EXTERNAL_BYTES = 1 << 10


def save_mappable(model, path: str | Path) -> Path:
    """Write `model` (an onnx.ModelProto with every weight loaded) as `path` + its data file,
    names.vision_data_file(path.name), every tensor of MIN_EXTERNAL_BYTES or more moved there,
    those of ALIGNMENT or more at a multiple of it. Returns the data file's path. `model` is changed (its tensors point
    into the data file)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    path = Path(path)
    data_name = names.vision_data_file(path.name)
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        for tensor in _weights(model.graph):
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < MIN_EXTERNAL_BYTES:
                continue
            if len(tensor.raw_data) >= ALIGNMENT:
                offset = -(-offset // ALIGNMENT) * ALIGNMENT
            data.seek(offset)
            data.write(tensor.raw_data)
            set_external_data(tensor, data_name, offset, len(tensor.raw_data))
            offset += len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
        data.truncate(offset)
    onnx.save(model, str(path))
    return path.parent / data_name


def _weights(graph):
    """The graph's initializers and those of its subgraphs (If/Loop bodies), if any."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.ByteSize():
                yield from _weights(attribute.g)
            for sub in attribute.graphs:
                yield from _weights(sub)
