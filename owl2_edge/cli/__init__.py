"""The `owl2` command: thin typer commands over the Python API.

Every command parses its options, calls the API, and turns an owl2-edge error into one line on
stderr and a non-zero exit code (cli/app.py); nothing below this edge prints or exits. The
commands, one module per family, register on the one app when imported here, in the order
`owl2 --help` lists them: answering first (ask, chat, serve, batch), speed last.
"""

from __future__ import annotations

import sys
import warnings

from owl2_edge.cli import answer, serve, batch, cache, model, quality, bench  # noqa: F401, I001 (registers)
from owl2_edge.cli.app import EXIT_INTERRUPTED, app


def _note(message, category, filename, lineno, file=None, line=None) -> str:
    # A warning the API gives (model_dir.UnrecordedFolderWarning) is one line on stderr here.
    return f"note: {message}\n"


def main():
    warnings.formatwarning = _note
    # typer turns Ctrl-C inside a command into exit code 130 without a traceback; this catches
    # one that lands before a command runs (while Python imports).
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


__all__ = ["app", "main"]
