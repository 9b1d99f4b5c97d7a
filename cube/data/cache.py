"""Where derived artefacts (embeddings, converted models) are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$CUBE_CACHE`, else `~/.cache/cube`."""
    return Path(os.environ.get("CUBE_CACHE") or Path.home() / ".cache" / "cube").expanduser()


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
