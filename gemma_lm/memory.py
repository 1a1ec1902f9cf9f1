"""The allocator: keep freed memory in the process while training; give it back after loading.

Training allocates and frees tensors of tens of megabytes every step. glibc serves each one with a
fresh mmap and unmaps it on free, so every step faults in (and zeroes) the same pages again, in the
kernel. Inside `reuse_freed_memory()` large blocks come from the heap and stay there for the next
step; leaving it puts back the settings it found and returns the surplus to the system.

glibc cannot report its settings, and setting any of them ends its dynamic mmap threshold for the
rest of the process, which then runs in another allocator mode. So the tuning happens only where
what it changes can be put back exactly, or does not matter:
  - the settings are known: given by the environment (MALLOC_*_ or GLIBC_TUNABLES, which also put
    glibc in its static mode from the start), or set by this module before;
  - the process ends with its work: `own_process()` declares it (the `transcoders train` commands
    do, and the default set's first-use training runs as one of them, in a process of its own).
Anywhere else (a notebook calling `train_transcoders`) `reuse_freed_memory()` changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys

# mallopt parameter -> (glibc's default, its environment variable, its tunable)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
PARAMETERS = {
    M_TRIM_THRESHOLD: (128 * 1024, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    M_TOP_PAD: (128 * 1024, "MALLOC_TOP_PAD_", "glibc.malloc.top_pad"),
    M_MMAP_THRESHOLD: (128 * 1024, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    M_MMAP_MAX: (65536, "MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max"),
}
# large blocks from the heap, never unmapped or trimmed, grown in big steps
REUSE = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 << 20}

_settings: dict[int, int] | None = None  # the settings in effect, once known


@functools.cache  # find_library runs `ldconfig -p` in a subprocess: a fork of this process per call
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return None


def startup_settings(environ=os.environ) -> dict[int, int] | None:
    """The settings the environment gave glibc when the process started, every parameter it did not
    name at its default; None where it named none (glibc then starts in its dynamic mode)."""
    tunables = dict(
        item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item
    )
    found, named = {}, False
    for param, (default, variable, tunable) in PARAMETERS.items():
        text = tunables.get(tunable, environ.get(variable))
        try:
            found[param] = int(text) if text is not None else default
            named = named or text is not None
        except ValueError:  # glibc ignores what it cannot read
            found[param] = default
    return found if named else None


def _known_settings() -> dict[int, int] | None:
    global _settings
    if _settings is None:
        _settings = startup_settings()
    return _settings


def _apply(settings: dict[int, int]) -> None:
    global _settings
    libc = _libc()
    for param, value in settings.items():
        libc.mallopt(param, value)
    _settings = {**(_known_settings() or {}), **settings}


def own_process() -> None:
    """Declare that this process ends when its work does, so the allocator may leave glibc's
    dynamic mode (`reuse_freed_memory` then tunes it here)."""
    global _settings
    if _libc() is not None and _known_settings() is None:
        _settings = {param: default for param, (default, _, _) in PARAMETERS.items()}


@contextlib.contextmanager
def reuse_freed_memory():
    """Inside, large blocks come from the heap and stay there; on exit, the settings found on entry
    come back and the heap's free pages are returned. Changes nothing where those settings cannot
    be known (see the module docstring)."""
    found = _known_settings() if _libc() is not None else None
    if found is None:
        yield
        return
    found = dict(found)
    _apply(REUSE)
    try:
        yield
    finally:
        _apply(found)
        _libc().malloc_trim(0)


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc keeps freed blocks below its mmap
    threshold, e.g. the temporaries of a loader's layout change)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
