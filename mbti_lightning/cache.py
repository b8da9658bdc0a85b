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


def replace_folder(new: Path, out: Path) -> None:
    """Move folder `new` to `out`, replacing an existing `out` so that `out` is the old or the new folder at
    every instant: the old one is renamed aside, the new one in, and if that fails the old one comes back."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A new folder beside `out` to write into; on success it replaces `out` (`replace_folder`), on any failure or
    stop (an exception, a signal) it is removed and `out` is as it was: never half of the new folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}")
    tmp.mkdir()  # with the umask's permissions, as the result is meant to be shared (mkdtemp's are private)
    try:
        yield tmp
        # Some writers (safetensors') make private files; every file gets the mode the umask gives a new one.
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(tmp.stat().st_mode & 0o666)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
