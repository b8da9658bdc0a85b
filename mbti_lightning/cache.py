"""Where generated and preprocessed files live, and how they are written without half-written states."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """$MBTI_LIGHTNING_CACHE, else ~/.cache/mbti_lightning."""
    return Path(os.environ.get("MBTI_LIGHTNING_CACHE", Path.home() / ".cache" / "mbti_lightning"))


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, first running `build(tmp_dir)` and renaming tmp_dir to `target` if it is missing.

    Readers never see a half-built folder, and a crash leaves only a hidden temporary folder behind.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.exists():  # otherwise another process finished the same build first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
