"""One exception type per kind of failure. Each is raised once, where the fact is known, with a
message a user can act on; the CLI turns it into one stderr line and an exit code."""


class Owl2Error(Exception):
    """Base of every error owl2-edge raises on purpose."""


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
