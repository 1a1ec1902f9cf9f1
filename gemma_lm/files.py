"""Files every layer writes: atomic writes (readers never see a half-written file), a lock for
work that only one process may do, and the cache root."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Root of everything gemma-circuits caches (models, transcoders, dashboards).
    `GEMMA_CIRCUITS_CACHE` overrides it."""
    root = os.environ.get("GEMMA_CIRCUITS_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemma-circuits"


def atomic_write(path: str | Path, write) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it into place: readers
    never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


class exclusive_lock:
    """An exclusive advisory lock on the file `path`, held inside `with` (released when the process
    dies too, so never stale): one process at a time builds a cached thing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
