"""Where `owl2 convert` reads a checkpoint from: a local folder, or a Hugging Face Hub id such as
MAGAer13/mplug-owl2-llama2-7b, downloaded through huggingface_hub into its shared cache
(~/.cache/huggingface, or HF_HOME): resumed where an interrupted download stopped, shown with its
progress bars, and found there again by every later conversion and by other tools.
"""

from __future__ import annotations

import re
from pathlib import Path

from owl2_edge.convert import hf_layout
from owl2_edge.errors import CheckpointError

# owner/name as the Hub spells repository ids.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a conversion reads; the release's other files (README, images) are not fetched.
CHECKPOINT_PATTERNS = ("*.json", "*.bin", "*.safetensors", hf_layout.TOKENIZER_MODEL)


def is_hub_id(source: str) -> bool:
    """True for "owner/name" when no such local path exists (a local folder always wins)."""
    return bool(_HUB_ID.fullmatch(str(source))) and not Path(source).exists()


def resolve_checkpoint(source: str | Path) -> Path:
    """The local folder of `source`: itself, or a Hub id's snapshot in the cache (downloaded
    first when needed). A failed download is one CheckpointError line saying what to do."""
    if not is_hub_id(str(source)):
        return Path(source)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{source}: no such folder; to download it from the Hugging Face "
                              f"Hub install huggingface_hub (pip install 'owl2-edge[convert]')") from None
    try:
        return Path(snapshot_download(str(source), allow_patterns=list(CHECKPOINT_PATTERNS)))
    except Exception as e:  # network, HTTP, offline mode, unknown repo: huggingface_hub's and httpx's types
        raise CheckpointError(
            f"{source}: no such folder, and it cannot be downloaded from the Hugging Face Hub "
            f"({_reason(e)}). On a machine "
            f"with a connection run `hf download {source} --local-dir DIR`, then pass DIR: "
            f"owl2 convert DIR -o OUT") from None


def _reason(e: Exception) -> str:
    name = type(e).__name__
    if name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        return "no connection to the Hub, or offline mode, and it is not in the Hugging Face cache"
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        return "no such repository, or it needs a login: `hf auth login`"
    first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
    return f"{name}: {first}" if first else name
