"""The Hugging Face Hub side of inputs: repo ids, downloads into the hub's cache, what a model card's
front matter says; and gemmaquant's own cache directory (the demo model, cached base logits).

Downloads take weights, configs and tokenizer files only: never *.bin (pickles), never code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import GemmaQuantError

HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "README.md", "LICENSE*"]
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def cache_dir() -> Path:
    """gemmaquant's cache (the demo model, cached base logits): $GEMMAQUANT_CACHE, else
    $XDG_CACHE_HOME/gemmaquant, else ~/.cache/gemmaquant."""
    if os.environ.get("GEMMAQUANT_CACHE"):
        return Path(os.environ["GEMMAQUANT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gemmaquant"


def valid_repo_id(s: str | None) -> bool:
    """Spelled like a Hub repo id (owner/name)."""
    return bool(s) and bool(REPO_ID.match(s))


def is_repo_id(s: str | None) -> bool:
    """A repo id, not a local path that happens to look like one."""
    return valid_repo_id(s) and not Path(s).exists()


def download(repo_id: str) -> Path:
    """The repo's snapshot directory in the Hugging Face cache (HF_HUB_OFFLINE: the cache only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise GemmaQuantError(
            f"{repo_id}: not in the Hugging Face cache and the hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + "; download it first or pass a local directory"
        ) from None
    except Exception as e:  # network, auth (gated Gemma repos), unknown repo
        raise GemmaQuantError(f"{repo_id}: download from the Hugging Face hub failed: {type(e).__name__}: {e}") from None
    return Path(path)


def front_matter(text: str) -> dict:
    """Top-level `key: value` and `key:` + `- item` lists of a model card's YAML front matter (the
    subset the Hub's keys use; nested or folded values are skipped)."""
    m = _FRONT.match(text)
    if not m:
        return {}
    out: dict = {}
    key = None
    for line in m.group(1).splitlines():
        if line[:1] not in (" ", "\t", "-") and ":" in line:
            k, _, v = line.partition(":")
            key, v = k.strip(), v.strip()
            out[key] = v.strip("'\"") if v else []
        elif key is not None and line.lstrip().startswith("- ") and isinstance(out.get(key), list):
            out[key].append(line.lstrip()[2:].strip().strip("'\""))
    return out
