"""Where generated and preprocessed files live, and how they are written without half-written states."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


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


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success, sync it to disk and rename it to `path`.

    A rename within one directory is atomic: readers, and a resume after a kill, see the old file or
    the new one, never half of one. A crash leaves at most a hidden ``.<name>.*.tmp`` file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # Created as any ordinary file is (0o666 less the umask), without reading the process-wide umask,
    # which only os.umask can, by changing it (a race with other threads). mkstemp would make it owner-only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
