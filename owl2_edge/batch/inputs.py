"""`owl2 batch`'s inputs as BatchItems, each numbered by its place in the list (0-based).

Two forms, exactly one per run:

    image_items(FOLDER_OR_TXT, question)   every picture with the same question
        FOLDER: its image files, sorted by name, not recursive
        FILE.txt: one path per line, relative to the list's folder; blank lines and # comments skipped
    question_items(FILE.jsonl)             {"image": PATH or null, "question": TEXT} per line
        ("video": PATH instead of "image" for a clip); relative paths against the file's
        folder; other keys ignored

Every problem with a file or a line's form is an ArgumentError naming the file (and line)
before any model loads (the file is read as owl2_edge/textfiles.py reads: a regular file, its
size, its lines' lengths and JSON nesting bounded). A line whose text is not valid Unicode (bytes
that are not UTF-8, or a "\\ud800" escape) is a RefusedItem instead: it becomes an error row
naming its line, and the run goes on, as for a missing or broken picture, which is not checked
here either.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from owl2_edge import checks, textfiles
from owl2_edge.batch.engine import BatchItem
from owl2_edge.checks import display_path
from owl2_edge.errors import ArgumentError

# The largest list or JSONL read (a line is a path or a question: millions of items fit).
MAX_LIST_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RefusedItem(BatchItem):
    """An input that cannot be asked (its text is not valid Unicode): never given to a model,
    it is written as an error row saying why (batch/run.py)."""
    error: str = ""


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
    if not checks.text("--question", question).strip():
        raise ArgumentError("--question is empty")
    paths = _folder_images(source) if source.is_dir() else _listed_paths(source)
    if not paths:
        raise ArgumentError(f"{display_path(source)}: no images in it")
    items = []
    for i, (path, where, line) in enumerate(paths):
        problem = textfiles.unicode_problem(line, {"image": str(path)})
        items.append(BatchItem(i, path, question) if problem is None
                     else RefusedItem(i, path, question, f"{where}: {problem}"))
    return items


def _folder_images(folder: Path) -> list[tuple[Path, str, None]]:
    extensions = image_extensions()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise ArgumentError(f"{display_path(folder)}: cannot list it ({e.strerror or e})") from None
    # A name with a picture's suffix is listed even when it is not a regular file or not really
    # a picture: it then gets an error row, which says more than silently leaving it out.
    return [(folder / e.name, display_path(folder / e.name), None) for e in entries
            if Path(e.name).suffix.lower() in extensions and not e.is_dir()]


def _listed_paths(path: Path) -> list[tuple[Path, str, textfiles.Line]]:
    """(path, where it was listed, its line) per line."""
    if path.suffix.lower() in image_extensions():
        raise ArgumentError(f"--images {display_path(path)}: give a folder of images or a .txt "
                            f"list of paths, not one image")
    paths = []
    lines, path = textfiles.lines("images", path, MAX_LIST_BYTES)
    for line in lines:
        text = line.text.strip()
        if text and not text.startswith("#"):
            # An absolute line stays absolute.
            paths.append((path.parent / text, f"{display_path(path)}:{line.number}", line))
    return paths


def question_items(path: str | os.PathLike) -> list[BatchItem]:
    lines, path = textfiles.lines("questions", path, MAX_LIST_BYTES)
    items = []
    for line in lines:
        if not line.text.strip():
            continue
        where = f"{display_path(path)}:{line.number}"
        row = textfiles.json_value(line.text, where)
        if not isinstance(row, dict):
            raise ArgumentError(f"{where}: not a JSON object")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ArgumentError(f"{where}: needs a \"question\" (non-empty text)")
        # "video" names a clip (a video or an animated picture: its frames are asked about,
        # clips.py); "image" may name one too, as the content decides. One of them at most.
        key = "video" if row.get("video") is not None else "image"
        if key == "video" and row.get("image") is not None:
            raise ArgumentError(f"{where}: give \"image\" or \"video\", not both")
        image = row.get(key)
        if image is not None:
            if not isinstance(image, str) or not image:
                raise ArgumentError(f"{where}: \"{key}\" must be a path (text) or null")
            image = path.parent / image
        problem = textfiles.unicode_problem(line, {"question": question, key: row.get(key)})
        items.append(BatchItem(len(items), image, question) if problem is None
                     else RefusedItem(len(items), image, question, f"{where}: {problem}"))
    if not items:
        raise ArgumentError(f"{display_path(path)}: no questions in it")
    return items
