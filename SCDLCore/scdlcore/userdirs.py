"""The platform's per-user folders for SCDL: installed models (data) and fetched samples (cache)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["user_cache_dir", "user_data_dir"]


def user_data_dir() -> Path:
    """Linux: ``$XDG_DATA_HOME/scdl`` or ``~/.local/share/scdl``; macOS: ``~/Library/Application Support/scdl``;
    Windows: ``%LOCALAPPDATA%\\scdl``."""
    if sys.platform == "win32":
        return _local_app_data() / "scdl"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "scdl"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "scdl"


def user_cache_dir() -> Path:
    """Linux: ``$XDG_CACHE_HOME/scdl`` or ``~/.cache/scdl``; macOS: ``~/Library/Caches/scdl``;
    Windows: ``%LOCALAPPDATA%\\scdl\\Cache``."""
    if sys.platform == "win32":
        return _local_app_data() / "scdl" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "scdl"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scdl"


def _local_app_data() -> Path:
    return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
