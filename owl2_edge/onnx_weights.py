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


def check_external_data(onnx_path: Path) -> None:
    """ModelFolderError when a data file beside the graph is not the one the graph was written
    with: every weight the graph keeps outside it names its file, offset and length, and the
    writer (save_mappable) ends the file at the last weight's end, so its size is known without
    any record (a data file of another vision variant, same name, has another). A data file
    outside the graph's folder is refused as well. Reads the graph's weight headers only (the
    onnx package takes a second to import; a load should not)."""
    from owl2_edge.errors import ModelFolderError
    ends, problem = _external_ends(Path(onnx_path))
    if problem:
        raise ModelFolderError(f"{onnx_path}: not a usable ONNX model ({problem})")
    for location, end in ends.items():
        if not location or Path(location).name != location:
            raise ModelFolderError(f"{onnx_path}: a weight's data is at {location[:100]!r}, "
                                   f"outside the model folder")
        data = Path(onnx_path).parent / location
        size = data.stat().st_size if data.is_file() else None
        if size != end:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise ModelFolderError(f"{data}: {found} but {Path(onnx_path).name} places its "
                                   f"weights in exactly {end:,} (a data file of another vision "
                                   f"variant?); copy or convert the model folder again")


# The protobuf fields read (onnx.proto): ModelProto.graph, GraphProto.initializer,
# TensorProto.external_data and .data_location (1: EXTERNAL), StringStringEntryProto.key/.value.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 13, 14, 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _external_ends(path: Path) -> tuple[dict[str, int], str | None]:
    """(data file name -> the end of the last weight the graph places in it, None), or ({},
    what is wrong with the file)."""
    import mmap
    if path.stat().st_size == 0:
        return {}, "an empty file"
    with open(path, "rb") as f:
        # Mapped, not read: a graph that keeps its weights inside is read only where its
        # headers are.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _scan(mapped)  # (no view of the mapping outlives the call)


def _scan(mapped) -> tuple[dict[str, int], str | None]:
    ends: dict[str, int] = {}
    try:
        for graph in _fields(memoryview(mapped), _MODEL_GRAPH):
            for tensor in _fields(graph, _GRAPH_INITIALIZER):
                location, end = _external_extent(tensor)
                if location is not None:
                    ends[location] = max(ends.get(location, 0), end)
    except ValueError as e:  # (its traceback, and the views it holds, end with this block)
        return {}, str(e)
    return ends, None


def _external_extent(tensor: memoryview) -> tuple[str | None, int]:
    """(data file, offset + length) of a TensorProto kept outside the graph, else (None, 0)."""
    external = any(value == _EXTERNAL for value in _fields(tensor, _TENSOR_DATA_LOCATION))
    if not external:
        return None, 0
    entry = {}
    for pair in _fields(tensor, _TENSOR_EXTERNAL_DATA):
        key = next(_fields(pair, _ENTRY_KEY), b"")
        value = next(_fields(pair, _ENTRY_VALUE), b"")
        entry[bytes(key).decode("utf-8", "replace")] = bytes(value).decode("utf-8", "replace")
    try:
        return entry.get("location", ""), int(entry.get("offset", 0)) + int(entry["length"])
    except (KeyError, ValueError):
        raise ValueError("a weight kept outside the graph has no valid offset and length") \
            from None


def _fields(message: memoryview, number: int):
    """The values of field `number` in a protobuf message: ints for varints, memoryviews for
    length-delimited fields (messages, strings); other fields are skipped unread."""
    at, n = 0, len(message)
    while at < n:
        key, at = _varint(message, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(message, at)
        elif wire == 2:
            length, at = _varint(message, at)
            if at + length > n:
                raise ValueError("a field runs past the end of its message")
            value, at = message[at:at + length], at + length
        elif wire in (1, 5):
            value, at = None, at + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire} is not protobuf's (or not ONNX's)")
        if field == number and value is not None:
            yield value


def _varint(buffer: memoryview, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(buffer) or shift > 63:
            raise ValueError("a number runs past the end of the file")
        byte = buffer[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at
