"""The source's answers to the chooser's questions, kept on disk beside the group costs
(docs/quantize.md, "Kept sensitivities"). Before it measures anything, `owl2 quantize
--target-size` has the source answer its calibration and check questions (greedy answers, the
log-probabilities at their positions, the pictures' embeddings: tools/choose.py's Probe); at 7B
on 2 cores that is 31 s a question, over an hour and a half for the default 192. A second target
size on the same source reads them back instead.

A file is named by a digest of the source pair, the questions (text, pictures and settings) and
the options the source was loaded with; it holds each question's runs (token ids or picture
embeddings), its answer's length and the log-probabilities, in the dtypes they were computed in
(the group costs' own digest reads them, so a question read back is the very question answered).
A file that cannot be read, or was written for other questions, is answered afresh and replaced.

    path = answers_path(source_digest, items, owl.options, max_tokens)
    questions = load(path)             # [(runs, n_answer, logprobs)] or None
    save(path, questions)              # through a temporary file and a rename
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from owl2_edge.image import content_hash
from owl2_edge.tools.kept_costs import kept_costs_folder, write_whole

FORMAT = 1

# (runs, answer positions, log-probabilities [n_answer, n_vocab]); a run is a list of token ids
# or an array of picture embeddings [n_visual, n_embd], as Decoder.eval_runs takes it.
Question = tuple[list, int, np.ndarray]


def items_digest(items: Sequence) -> str:
    """What of the questions the answers depend on: each one's text and settings and what its
    pictures look like (image.content_hash, the image-embedding cache's key)."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.question, item.system, item.json_schema, item.max_tokens],
                            sort_keys=True).encode())
        for image in item.image if isinstance(item.image, list) else [item.image]:
            h.update(b"none" if image is None else content_hash(image).encode())
    return h.hexdigest()


def answers_path(source: str, items: Sequence, options, max_tokens: int) -> Path:
    """The file for the source pair's digest (kept_costs.source_digest), these questions, the
    load options and the answers' longest length."""
    key = hashlib.sha256(f"{FORMAT}|{source}|{items_digest(items)}|{options!r}|{max_tokens}"
                         .encode()).hexdigest()
    return kept_costs_folder() / f"answers-{key[:32]}.npz"


def load(path: Path) -> list[Question] | None:
    """The questions kept in `path`, or None when there is no readable file of this format."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != FORMAT or meta.get("file") != path.name:
                return None
            out = []
            for i, q in enumerate(meta["questions"]):
                runs = [data[f"q{i}r{j}"].tolist() if text else data[f"q{i}r{j}"]
                        for j, text in enumerate(q["text"])]
                out.append((runs, int(q["n_answer"]), data[f"q{i}p"]))
            return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile):
        return None


def save(path: Path, questions: Sequence[Question]) -> None:
    arrays, meta = {}, []
    for i, (runs, n_answer, logprobs) in enumerate(questions):
        for j, run in enumerate(runs):
            arrays[f"q{i}r{j}"] = np.asarray(run, dtype=np.int32) if isinstance(run, list) else run
        arrays[f"q{i}p"] = logprobs
        meta.append({"text": [isinstance(run, list) for run in runs], "n_answer": int(n_answer)})
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, "file": path.name,
                                          "questions": meta}))
    write_whole(path, lambda f: np.savez(f, **arrays))


__all__ = ["answers_path", "items_digest", "load", "save"]
