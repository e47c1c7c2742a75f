"""Where loramux keeps its files: one home directory, `LORAMUX_HOME`, with fixed sub-folders."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The loramux home: `$LORAMUX_HOME`, else `$XDG_CACHE_HOME/loramux`, else `~/.cache/loramux`."""
    configured = os.environ.get("LORAMUX_HOME")
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loramux"


def models_dir() -> Path:
    """Converted base models (Hugging Face directories), one sub-folder per model."""
    return home() / "models"


def data_dir() -> Path:
    """The registry's data: the metadata database and the blob store."""
    return home() / "data"
