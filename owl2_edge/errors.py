"""One exception type per kind of failure. Each is raised once, where the fact is known, with a
message a user can act on; the CLI turns it into one stderr line and an exit code.

The contract: every exception owl2-edge raises on purpose is an Owl2Error. Arguments of the wrong
type or out of range raise ArgumentError, which is also a ValueError, so code that catches
ValueError for bad arguments keeps working. After any Owl2Error the object that raised it stays
usable. Anything else escaping the API is a bug.
"""


class Owl2Error(Exception):
    """Base of every error owl2-edge raises on purpose."""


class ArgumentError(Owl2Error, ValueError):
    """An argument of the wrong type or out of its range (n_ctx "2048", temperature NaN...).
    `param`: the request field at fault where the raiser knows it (the server's 400 names it)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class GrammarError(ArgumentError):
    """A schema or grammar that cannot constrain an answer; `param` names the field it came in."""


class BusyError(Owl2Error):
    """A call that needs the decoder whole (Owl2.logits) from a thread that still has an answer
    of its own not read to its end: it would wait for itself (Engine.exclusive)."""


class CheckpointError(Owl2Error):
    """A Hugging Face checkpoint folder that cannot be converted (missing file, wrong shape...)."""


class ModelFolderError(Owl2Error):
    """A converted model folder that is missing, incomplete or of an unknown version."""


class DecoderError(Owl2Error):
    """The native decoder refused its files or its input (bad GGUF, mismatched pair, bad ids)."""


class ContextFullError(Owl2Error):
    """The input would not fit in the decoder's context window."""


class PromptError(Owl2Error):
    """A prompt that does not fit its images (more or fewer <|image|> marks than images), or
    messages that do not make a conversation."""


class ImageError(Owl2Error):
    """An image that cannot be read or used (missing file, not an image, truncated, too large)."""
