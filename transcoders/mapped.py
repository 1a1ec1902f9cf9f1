"""Rows of memory-mapped weights, read from their file instead of through the mapping (Linux).

Loaded decoders are views of their memory-mapped safetensors files. Reading a few rows through the mapping
faults in far more than those rows: the kernel maps the whole page-cache folio around each fault, and the
pages stay resident. `read_rows` reads the rows with `pread` into a tensor of their own, so that only the
page cache holds the rest. It does so only when that gives the same values as the mapping: the tensor's
memory must be a mapping of a regular file still at its path (same device and inode), and no page of it may
have been written in this process (a private copy-on-write page, which the file does not see). Anywhere
else it returns None and the caller reads through the mapping (`take_rows` does both). `row_chunks` and
`matmul` make whole passes over such a matrix (the unembedding: 63% of Gemma 3 270M's weights; encoders stored
`[D, F]`, or the transposed view of a `[F, D]` file tensor) the same way, a chunk at a time; `read_columns` /
`take_columns` read an encoder's columns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# Column blocks read from a file go through a buffer of about this size. Not larger: glibc serves a block
# just under 32 MiB from its heap once its mmap threshold has risen (after the first such buffer is freed),
# and a fresh 32 MiB buffer per product, with small allocations landing in the holes between them, grew the
# heap by up to ~0.2 GB during the encoder pass in some runs (benchmarks/memory_spikes.py; first attribution
# in fresh processes, skip set, 8 tokens, 10 each: peak +107..257 MiB at 32 MiB, +110..136 at 8 MiB).
CHUNK_BYTES = 8 << 20

_PRESENT, _SWAPPED, _FILE = (
    np.uint64(1 << b) for b in (63, 62, 61)
)  # /proc/self/pagemap entry bits


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from t's first element to the end of its last one."""
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def file_region(t: torch.Tensor) -> tuple[str, int] | None:
    """(path, offset in the file of t's first element) when t's memory is a mapping of a regular file that
    is still at that path; else None."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return None
    address = t.data_ptr()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if not start <= address < end:
            continue
        if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith(" (deleted)"):
            return None
        path, offset, inode = parts[5], int(parts[2], 16), int(parts[4])
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_ino != inode or (os.major(st.st_dev), os.minor(st.st_dev)) != (major, minor):
            return None
        if address + _span_bytes(t) > end:  # not one mapping: do not guess
            return None
        return path, offset + (address - start)
    return None


def _page_entries(t: torch.Tensor) -> np.ndarray | None:
    """This process's /proc/self/pagemap entry of every page under t, or None where it cannot be read."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = t.data_ptr() // page, (t.data_ptr() + _span_bytes(t) - 1) // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first * 8)
            raw = f.read((last - first + 1) * 8)
    except OSError:
        return None
    if len(raw) != (last - first + 1) * 8:
        return None
    return np.frombuffer(raw, dtype=np.uint64)


def written_in_process(t: torch.Tensor) -> bool:
    """Whether any page under t holds data the file does not: written (copy-on-write, now anonymous) or
    swapped out. True where this cannot be told."""
    entries = _page_entries(t)
    return entries is None or bool(
        ((entries & _SWAPPED != 0) | ((entries & _PRESENT != 0) & (entries & _FILE == 0))).any()
    )


def resident_fraction(t: torch.Tensor) -> float:
    """Share of the memory pages under t that are present in this process (0.0 where that cannot be read)."""
    entries = _page_entries(t)
    return float((entries & _PRESENT != 0).mean()) if entries is not None and len(entries) else 0.0


def _readable(w: torch.Tensor) -> tuple[str, int] | None:
    """(path, offset of w's first element) where reading w's rows from its file gives the values w holds and
    each row is contiguous in memory (rows may be strided); else None."""
    inner = w.shape[1:]
    expected = [1]
    for n in reversed(inner[1:]):
        expected.insert(0, expected[0] * n)
    if w.dim() < 1 or list(w.stride()[1:]) != expected[: len(inner)]:
        return None
    region = file_region(w)
    if region is None or written_in_process(w):
        return None
    return region


def _pread(fd: int, view: memoryview, offset: int) -> bool:
    """Fill `view` (bytes) from `offset` of the open file; False where the file ends first (it changed)."""
    return os.preadv(fd, [view], offset) == len(view)


def _changed(path: str) -> OSError:
    return OSError(f"{path} is shorter than its mapping: the file changed while in use")


def read_rows(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """`w[rows]` (`[k, *w.shape[1:]]`, a tensor of its own) read from w's file, or None where that would not
    give the values w holds (see the module docstring) or w's rows are not contiguous in memory."""
    return _read_rows(w, rows, _readable(w) if len(rows) else None)


def _read_rows(
    w: torch.Tensor, rows: torch.Tensor, region: tuple[str, int] | None
) -> torch.Tensor | None:
    """`read_rows` with w's region (`_readable(w)`) known."""
    if region is None:
        return None
    path, base = region
    row_bytes, stride_bytes = w[0].numel() * w.element_size(), w.stride(0) * w.element_size()
    ids = rows.detach().cpu().long()
    if bool((ids < 0).any()) or bool((ids >= w.shape[0]).any()):
        raise IndexError(f"rows must lie in [0, {w.shape[0]})")
    out = torch.empty((len(ids), *w.shape[1:]), dtype=w.dtype)
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        for i, r in enumerate(ids.tolist()):
            if not _pread(fd, buffer[i * row_bytes : (i + 1) * row_bytes], base + r * stride_bytes):
                return None
    finally:
        os.close(fd)
    return out


def take_rows(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`w[rows]` (`[k, *w.shape[1:]]`, a tensor of its own): read from w's file where `read_rows` can, else
    gathered from memory (on a GPU, for weights not mapped or changed in memory, and where autograd needs
    the graph)."""
    if not (torch.is_grad_enabled() and w.requires_grad):
        out = read_rows(w.detach(), rows)
        if out is not None:
            return out
    return w.index_select(0, rows.to(w.device))


def row_chunks(w: torch.Tensor, chunk_rows: int = 16384) -> Iterator[tuple[int, torch.Tensor]]:
    """(a, w[a:a + k]) for consecutive chunks of at most `chunk_rows` rows of w `[n, ...]`.

    Where `read_rows` could read w, the chunks are read from its file into one buffer that is reused: each
    chunk is valid until the next one is asked for. A pass over a large memory-mapped matrix (the
    unembedding) then leaves it in the page cache instead of resident in the process. Elsewhere the chunks
    are views of w."""
    return _row_chunks(w, chunk_rows, _readable(w) if w.dim() >= 1 and w.shape[0] else None)


def _row_chunks(
    w: torch.Tensor, chunk_rows: int, region: tuple[str, int] | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """`row_chunks` with w's region (`_readable(w)`) known."""
    if region is None:
        for a in range(0, w.shape[0], chunk_rows):
            yield a, w[a : a + chunk_rows]
        return
    path, base = region
    row_bytes, stride_bytes = w[0].numel() * w.element_size(), w.stride(0) * w.element_size()
    buffer = torch.empty((min(chunk_rows, w.shape[0]), *w.shape[1:]), dtype=w.dtype)
    raw = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        for a in range(0, w.shape[0], chunk_rows):
            k = min(chunk_rows, w.shape[0] - a)
            if stride_bytes == row_bytes:  # contiguous rows: one read per chunk
                if not _pread(fd, raw[: k * row_bytes], base + a * row_bytes):
                    raise _changed(path)
            else:
                for i in range(k):
                    if not _pread(
                        fd, raw[i * row_bytes : (i + 1) * row_bytes], base + (a + i) * stride_bytes
                    ):
                        raise _changed(path)
            yield a, buffer[:k]
    finally:
        os.close(fd)


def _column_source(w: torch.Tensor) -> tuple[bool, tuple[str, int]] | None:
    """How w `[D, F]` can be read from its file: (True, region of w.T) where w is the transposed view of a
    `[F, D]` file tensor, (False, region of w) where it is stored `[D, F]`; None where neither (`_readable`)."""
    region = _readable(w.T)
    if region is not None:
        return True, region
    region = _readable(w) if w.numel() else None
    return None if region is None else (False, region)


def column_chunks(
    w: torch.Tensor, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[int, torch.Tensor]]:
    """(a, w[:, a:a + k]) for consecutive blocks of columns of w `[D, F]`, about `chunk_bytes` each. Where w
    (stored `[D, F]`) or w.T (w the transposed view of a `[F, D]` file tensor) can be read by row (`read_rows`'
    conditions), the blocks are read from the file into a reused buffer (each valid until the next is asked
    for); elsewhere they are views of w. Whole columns, so products with them sum over D as one product would."""
    return _column_chunks(w, chunk_bytes, _column_source(w))


def _column_chunks(
    w: torch.Tensor, chunk_bytes: int, source: tuple[bool, tuple[str, int]] | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """`column_chunks` with w's `_column_source` known."""
    D, F = w.shape
    per_chunk = max(1, chunk_bytes // max(1, D * w.element_size()))
    if source is None:
        for a in range(0, F, per_chunk):
            yield a, w[:, a : a + per_chunk]
        return
    transposed, region = source
    if transposed:
        for a, rows in _row_chunks(w.T, per_chunk, region):
            yield a, rows.T
        return
    path, base = region
    size, row_stride = w.element_size(), w.stride(0) * w.element_size()
    buffer = torch.empty(D, min(per_chunk, F), dtype=w.dtype)
    raw = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        for a in range(0, F, per_chunk):
            k = min(per_chunk, F - a)
            for d in range(D):  # rows of the block lie buffer.shape[1] elements apart
                start = d * buffer.shape[1] * size
                if not _pread(fd, raw[start : start + k * size], base + d * row_stride + a * size):
                    raise _changed(path)
            yield a, buffer[:, :k]
    finally:
        os.close(fd)


def matmul(x: torch.Tensor, w: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """x @ w `[..., F]` (in w's dtype) for x `[..., D]`, w `[D, F]`, over `column_chunks`: a memory-mapped w is
    read from its file instead of becoming resident (one product where autograd needs the graph). A pass over
    the rows of a mapped matrix m `[n, D]` is `matmul(x, m.T)`."""
    x = x.to(w.dtype)
    if w.device.type != "cpu" or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
        return x @ w
    out = torch.empty(*x.shape[:-1], w.shape[1], dtype=w.dtype)
    for a, block in column_chunks(w, chunk_bytes):
        out[..., a : a + block.shape[1]] = x @ block
    return out


def read_columns(
    w: torch.Tensor, cols: torch.Tensor, chunk_bytes: int = CHUNK_BYTES
) -> torch.Tensor | None:
    """`w[:, cols].T` (`[k, D]`, a tensor of its own) of a memory-mapped w `[D, F]`, read from its file: the rows
    of w.T where w is the transposed view of a `[F, D]` file tensor, else one pass over `column_chunks`. None
    where w cannot be read from a file (see `read_rows`)."""
    if w.dim() != 2 or w.device.type != "cpu":
        return None
    ids = cols.detach().cpu().long()
    if len(ids) and (bool((ids < 0).any()) or bool((ids >= w.shape[1]).any())):
        raise IndexError(f"columns must lie in [0, {w.shape[1]})")
    source = _column_source(w)
    if source is None:
        return None
    transposed, region = source
    if transposed:
        return (
            _read_rows(w.T, ids, region) if len(ids) else torch.empty(0, w.shape[0], dtype=w.dtype)
        )
    out = torch.empty(len(ids), w.shape[0], dtype=w.dtype)
    order = torch.argsort(ids)
    sorted_ids = ids[order]
    for a, block in _column_chunks(w, chunk_bytes, source):
        lo, hi = (int(torch.searchsorted(sorted_ids, v)) for v in (a, a + block.shape[1]))
        if hi > lo:
            out[order[lo:hi]] = block[:, sorted_ids[lo:hi] - a].T
    return out


def take_columns(w: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`w[:, cols].T` (`[k, D]`): read from w's file where `read_columns` can, else gathered from memory (as
    `take_rows`)."""
    if not (torch.is_grad_enabled() and w.requires_grad):
        out = read_columns(w.detach(), cols)
        if out is not None:
            return out
    return w.index_select(1, cols.to(w.device)).T
