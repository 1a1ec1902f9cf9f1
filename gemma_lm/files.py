"""Files every layer writes: atomic writes (readers never see a half-written file), output paths
checked before the work, a lock for work that only one process may do, and the cache root."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """Root of everything gemma-circuits caches (models, transcoders, dashboards).
    `GEMMA_CIRCUITS_CACHE` overrides it."""
    root = os.environ.get("GEMMA_CIRCUITS_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemma-circuits"


def atomic_write(path: str | Path, write) -> None:
    """Call `write(fileobj)` on a temporary file beside `path` (`.NAME.XXXXXXXX.partial`), then
    rename it into place: readers never see a half-written file. The temporary file of a writer
    that was killed is removed by the next write of the same `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(path)
    fd, tmp = _locked_partial(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            # mkstemp makes 0600; give the file the usual permissions
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            # renamed while still open, so still locked: an unlocked partial counts as stale
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# A partial file is locked (flock) by its writer from creation to rename, and only unlocked ones
# are removed. A lock, not an age: a slow writer (a big graph on a slow disk) is never mistaken for
# a dead one, and a killed writer's lock goes with it, so its file is stale at once. mkstemp's
# random part has no dots, so `.NAME.<random>.partial` belongs to the target NAME and no other.
_PARTIAL_SUFFIX = ".partial"


def _locked_partial(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file beside `path`, locked. Another writer's cleanup may
    remove it between its creation and the lock (to that writer it looked unlocked); then it has
    no name any more, and another is made."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX, dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return fd, tmp
        os.close(fd)


def _remove_stale_partials(path: Path) -> None:
    """Remove the temporary files that killed writers of `path` left beside it: those no live
    writer holds locked. Lists the folder, O(files in it) per write."""
    prefix = f".{path.name}."
    for entry in os.scandir(path.parent):
        random_part = entry.name[len(prefix) : -len(_PARTIAL_SUFFIX)]
        if (
            entry.name.startswith(prefix)
            and entry.name.endswith(_PARTIAL_SUFFIX)
            and random_part
            and "." not in random_part
        ):
            _remove_if_unlocked(Path(entry.path))


def _remove_if_unlocked(partial: Path) -> None:
    try:
        fd = os.open(partial, os.O_RDONLY)
    except OSError:  # renamed or removed meanwhile, or another user's
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # still the file we locked (not a new one under a reused name): remove it, lock held
        if os.stat(partial).st_ino == os.fstat(fd).st_ino:
            partial.unlink()
    except OSError:  # locked by its live writer, or gone
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def check_output_file(path: str | Path, flag: str = "") -> Path:
    """Refuse, before any work, a file path that cannot be written: an existing folder, a parent
    that is a file, a place without write permission (or on a read-only file system), a read-only
    file. Creates nothing. `flag` (e.g. "--out") names the option in the message."""
    path = Path(path).expanduser()
    name = f"{flag} {path}".strip()
    if path.is_dir():
        raise UserError(f"{name} is a folder, not a file; give the path of a file to write")
    if os.path.lexists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{name} is read-only; make it writable or choose another path")
    _check_can_create_in(_nearest_existing(path.parent), name)
    return path


def check_output_dir(path: str | Path, flag: str = "") -> Path:
    """As `check_output_file`, for a folder that is written into (created if missing)."""
    path = Path(path).expanduser()
    name = f"{flag} {path}".strip()
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{name} is a file, not a folder; give a folder to write into")
    _check_can_create_in(_nearest_existing(path), name)
    return path


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (as anything: a file, a folder, a dead link)."""
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(folder: Path, name: str) -> None:
    if not folder.is_dir():
        raise UserError(
            f"cannot write {name}: {folder} is a file, not a folder; choose another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write {name}: {folder} is not writable (permissions or a read-only file "
            "system); choose another path"
        )


@contextlib.contextmanager
def write_failure_as_user_error(path: str | Path):
    """Inside `with`: an OSError (disk full, read-only file system, permissions changed since the
    check) becomes a one-line UserError naming `path`, not a traceback."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise UserError(
            f"could not write {path}: {reason}; free some space or choose another path"
        ) from None


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
