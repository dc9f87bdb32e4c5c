"""`owl2 batch`'s inputs as BatchItems, each numbered by its place in the list (0-based).

Two forms, exactly one per run:

    image_items(FOLDER_OR_TXT, question)   every picture with the same question
        FOLDER: its image files, sorted by name, not recursive
        FILE.txt: one path per line, relative to the list's folder; blank lines and # comments skipped
    question_items(FILE.jsonl)             {"image": PATH or null, "question": TEXT} per line
        relative paths against the file's folder; other keys ignored

Every problem is an ArgumentError naming the file (and line) before any model loads. Whether a
listed image exists or reads is not checked here: a missing or broken picture becomes that item's
error row, and the run goes on.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from owl2_edge import checks
from owl2_edge.batch.engine import BatchItem
from owl2_edge.checks import display_path
from owl2_edge.errors import ArgumentError

# The largest list or JSONL read (a line is a path or a question: millions of items fit).
MAX_LIST_BYTES = 256 * 2**20


@functools.cache
def image_extensions() -> frozenset[str]:
    """The suffixes (".png", ".jpg", ...) of every format Pillow can open: what load_image reads."""
    from PIL import Image
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


def read_items(images: str | os.PathLike | None, question: str | None,
               questions: str | os.PathLike | None) -> list[BatchItem]:
    """The CLI's three options as items: --images with --question, or --questions alone."""
    if questions is not None:
        if images is not None or question is not None:
            raise ArgumentError("give --questions FILE.jsonl alone, or --images with --question")
        return question_items(questions)
    if images is None:
        raise ArgumentError("give --images FOLDER|FILE.txt with --question TEXT, "
                            "or --questions FILE.jsonl")
    if question is None:
        raise ArgumentError("--images needs --question TEXT (the question asked of every image)")
    return image_items(images, question)


def image_items(source: str | os.PathLike, question: str) -> list[BatchItem]:
    source = Path(checks.path("images", source))
    if not question.strip():
        raise ArgumentError("--question is empty")
    paths = _folder_images(source) if source.is_dir() else _listed_paths(source)
    if not paths:
        raise ArgumentError(f"{display_path(source)}: no images in it")
    return [BatchItem(i, path, question) for i, path in enumerate(paths)]


def _folder_images(folder: Path) -> list[Path]:
    extensions = image_extensions()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise ArgumentError(f"{display_path(folder)}: cannot list it ({e.strerror or e})") from None
    # A name with a picture's suffix is listed even when it is not a regular file or not really
    # a picture: it then gets an error row, which says more than silently leaving it out.
    return [folder / e.name for e in entries
            if Path(e.name).suffix.lower() in extensions and not e.is_dir()]


def _listed_paths(path: Path) -> list[Path]:
    if path.suffix.lower() in image_extensions():
        raise ArgumentError(f"--images {display_path(path)}: give a folder of images or a .txt "
                            f"list of paths, not one image")
    paths = []
    for _, line in _lines(path):
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(path.parent / line)  # an absolute line stays absolute
    return paths


def question_items(path: str | os.PathLike) -> list[BatchItem]:
    path = Path(checks.path("questions", path))
    items = []
    for n, line in _lines(path):
        if not line.strip():
            continue
        where = f"{display_path(path)}:{n}"
        try:
            row = json.loads(line)
        except ValueError:
            raise ArgumentError(f"{where}: not valid JSON") from None
        if not isinstance(row, dict):
            raise ArgumentError(f"{where}: not a JSON object")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ArgumentError(f"{where}: needs a \"question\" (non-empty text)")
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise ArgumentError(f"{where}: \"image\" must be a path (text) or null")
            image = path.parent / image
        items.append(BatchItem(len(items), image, question))
    if not items:
        raise ArgumentError(f"{display_path(path)}: no questions in it")
    return items


def _lines(path: Path):
    """(line number, text) of a UTF-8 text file, with a one-line error for what cannot be read."""
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise ArgumentError(f"{display_path(path)}: larger than {MAX_LIST_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArgumentError(f"{display_path(path)}: no such file or folder") from None
    except UnicodeDecodeError:
        raise ArgumentError(f"{display_path(path)}: not UTF-8 text") from None
    except OSError as e:
        raise ArgumentError(f"{display_path(path)}: cannot read it ({e.strerror or e})") from None
    return enumerate(text.splitlines(), start=1)
