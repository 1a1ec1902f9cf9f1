"""The weight store: tensors of safetensors files, memory-mapped, and read without becoming
resident.

Loading (`read_safetensors`) gives every tensor of a file as a memory-mapped view of it, after
checking the file's values apart from the views (`nonfinite_tensors_in_file`), so loading touches
none of them. Model and transcoder weights stay such views for as long as they are used.

`StoredWeight` is how those views are read. Its contract: **rows (and encoder columns) are read from
the file into tensors of their own, whole passes go a block at a time through one reused buffer, and
nothing makes the whole matrix resident in this process.** Reading through the mapping instead would
fault in far more than the rows asked for (the kernel maps the whole page-cache folio around each
fault), and those pages would stay resident. A read goes to the file only where that gives the
values the tensor holds: its memory must be a mapping of a regular file still at its path (same
device and inode), and no page of it may have been written in this process (a private copy-on-write
page, which the file does not see). Anywhere else (in memory, on a GPU, edited, or where autograd
needs the graph) the same calls read the tensor from memory, with the same values. So: never call
`.contiguous()`, `.clone()`, `.float()` or `.to()` on a whole mapped weight, and never reduce over
it directly; ask a `StoredWeight`.

The unembedding (most of a small Gemma's weights), the embedding, the decoders (read by active row)
and the encoders (`[D, F]`, or the transposed view of a `[F, D]` file tensor; read by column, or
passed over in blocks) are all read this way.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

# Column blocks read from a file go through a buffer of about this size. Not larger: glibc serves a
# block just under 32 MiB from its heap once its mmap threshold has risen (after the first such
# buffer is freed), and a fresh buffer per product, with small allocations landing in the holes
# between them, grew the heap during the encoder pass (benchmarks/memory_spikes.py measures it).
CHUNK_BYTES = 8 << 20
ROW_CHUNK = 16384  # rows per block of a pass over rows

_PRESENT, _SWAPPED, _FILE = (np.uint64(1 << b) for b in (63, 62, 61))  # /proc/self/pagemap bits


class StoredWeight:
    """A weight tensor read by the store's contract (see the module docstring): rows and columns
    come from its file where it is a clean mapping of one, from memory elsewhere, with the same
    values.

    `w` may be any tensor; shapes are given with each method. Nothing is read until a method is
    called, and each call checks the mapping afresh (a weight edited in memory after loading is read
    from memory).
    """

    def __init__(self, w: torch.Tensor, chunk_bytes: int = CHUNK_BYTES):
        self.w = w
        self.chunk_bytes = chunk_bytes

    # -- rows of w [n, ...] ----------------------------------------------------------------------
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """`w[ids]` (`[k, *w.shape[1:]]`, a tensor of its own)."""
        w = self.w
        if not (torch.is_grad_enabled() and w.requires_grad):
            out = self.file_rows(ids)
            if out is not None:
                return out
        return w.index_select(0, ids.to(w.device))

    def file_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """`w[ids]` read from w's file, or None where the file would not give the values w holds."""
        w = self.w.detach()
        return _read_rows(w, ids, _readable(w) if len(ids) else None)

    def row_chunks(self, chunk_rows: int = ROW_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(a, w[a:a + k]) for consecutive blocks of at most `chunk_rows` rows. Read from the file,
        the blocks share one buffer: each is valid until the next one is asked for."""
        w = self.w
        return _row_chunks(w, chunk_rows, _readable(w) if w.dim() >= 1 and w.shape[0] else None)

    # -- columns of w [D, F] ---------------------------------------------------------------------
    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """`w[:, ids].T` (`[k, D]`, a tensor of its own), e.g. encoder vectors of some features."""
        w = self.w
        if not (torch.is_grad_enabled() and w.requires_grad):
            out = self.file_columns(ids)
            if out is not None:
                return out
        return w.index_select(1, ids.to(w.device)).T

    def file_columns(self, ids: torch.Tensor) -> torch.Tensor | None:
        """`w[:, ids].T` read from w's file (the rows of w.T where w is the transposed view of a
        `[F, D]` file tensor, else one pass over the column blocks), or None where the file would
        not give the values w holds."""
        w = self.w.detach()
        if w.dim() != 2 or w.device.type != "cpu":
            return None
        ids = ids.detach().cpu().long()
        if len(ids) and (bool((ids < 0).any()) or bool((ids >= w.shape[1]).any())):
            raise IndexError(f"columns must lie in [0, {w.shape[1]})")
        source = _column_source(w)
        if source is None:
            return None
        transposed, region = source
        if transposed:
            if not len(ids):
                return torch.empty(0, w.shape[0], dtype=w.dtype)
            return _read_rows(w.T, ids, region)
        out = torch.empty(len(ids), w.shape[0], dtype=w.dtype)
        order = torch.argsort(ids)
        sorted_ids = ids[order]
        for a, block in _column_chunks(w, self.chunk_bytes, source):
            lo, hi = (int(torch.searchsorted(sorted_ids, v)) for v in (a, a + block.shape[1]))
            if hi > lo:
                out[order[lo:hi]] = block[:, sorted_ids[lo:hi] - a].T
        return out

    def column_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(a, w[:, a:a + k]) for consecutive blocks of whole columns, about `chunk_bytes` each (so
        a product with each block sums over D as one product would). Read from the file, the blocks
        share one buffer: each is valid until the next one is asked for."""
        return _column_chunks(self.w, self.chunk_bytes, _column_source(self.w))

    def left_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ w `[..., F]` (in w's dtype) for x `[..., D]`, w `[D, F]`, one column block at a time
        (one product where autograd needs the graph or w is on a GPU). A pass over the rows of a
        matrix m `[n, D]` is `StoredWeight(m.T).left_matmul(x)`."""
        w = self.w
        x = x.to(w.dtype)
        grad = torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)
        if w.device.type != "cpu" or grad:
            return x @ w
        out = torch.empty(*x.shape[:-1], w.shape[1], dtype=w.dtype)
        for a, block in self.column_chunks():
            out[..., a : a + block.shape[1]] = x @ block
        return out


# -- where a tensor's memory comes from ------------------------------------------------------------


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from t's first element to the end of its last one."""
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def file_region(t: torch.Tensor) -> tuple[str, int] | None:
    """(path, offset in the file of t's first element) when t's memory is a mapping of a regular
    file that is still at that path; else None."""
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
    """This process's /proc/self/pagemap entry of every page under t, or None where it cannot be
    read."""
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
    """Whether any page under t holds data the file does not: written (copy-on-write, now anonymous)
    or swapped out. True where this cannot be told."""
    entries = _page_entries(t)
    return entries is None or bool(
        ((entries & _SWAPPED != 0) | ((entries & _PRESENT != 0) & (entries & _FILE == 0))).any()
    )


def resident_fraction(t: torch.Tensor) -> float:
    """Share of the memory pages under t that are present in this process (0.0 where that cannot be
    read)."""
    entries = _page_entries(t)
    return float((entries & _PRESENT != 0).mean()) if entries is not None and len(entries) else 0.0


def _readable(w: torch.Tensor) -> tuple[str, int] | None:
    """(path, offset of w's first element) where reading w's rows from its file gives the values w
    holds and each row is contiguous in memory (rows may be strided); else None."""
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
    """Fill `view` (bytes) from `offset` of the open file; False where the file ends first (it
    changed)."""
    return os.preadv(fd, [view], offset) == len(view)


def _changed(path: str) -> OSError:
    return OSError(f"{path} is shorter than its mapping: the file changed while in use")


def _read_rows(
    w: torch.Tensor, rows: torch.Tensor, region: tuple[str, int] | None
) -> torch.Tensor | None:
    """w[rows] read from the file at `region` (`_readable(w)`), or None where there is none."""
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


def _row_chunks(
    w: torch.Tensor, chunk_rows: int, region: tuple[str, int] | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """`StoredWeight.row_chunks` with w's region (`_readable(w)`) known."""
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
    """How w `[D, F]` can be read from its file: (True, region of w.T) where w is the transposed
    view of a `[F, D]` file tensor, (False, region of w) where it is stored `[D, F]`; None where
    neither (`_readable`)."""
    region = _readable(w.T)
    if region is not None:
        return True, region
    region = _readable(w) if w.numel() else None
    return None if region is None else (False, region)


def _column_chunks(
    w: torch.Tensor, chunk_bytes: int, source: tuple[bool, tuple[str, int]] | None
) -> Iterator[tuple[int, torch.Tensor]]:
    """`StoredWeight.column_chunks` with w's `_column_source` known."""
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


# -- loading safetensors files ---------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata of a safetensors file; missing or corrupt files, and
    floating-point tensors holding NaN or inf, are UserErrors. The tensors are memory-mapped views
    of the file (read when first touched), and the values check reads the file apart from them: a
    decoder of which attribution reads only the active features' rows never becomes resident as a
    whole."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
            "write or download it again"
        ) from None
    for name in nonfinite_tensors_in_file(path):  # the first one found
        raise UserError(f"{path}: {name} holds NaN or infinite values; the file is corrupt")
    for t in tensors.values():
        # build_transcoder_set need not read it again; a copy or view loses the mark
        t.finite_checked = True
    return tensors, metadata


# bit masks of the exponent of each floating dtype a safetensors file stores: all ones = inf or NaN
_EXPONENT_MASKS = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
_TORCH_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _safetensors_header(f) -> tuple[dict, int]:
    """(header, offset of the data) of an open safetensors file."""
    header_len = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(header_len)), 8 + header_len


def nonfinite_tensors_in_file(path: Path, piece: int = 64 << 20):
    """Names of the floating-point tensors of safetensors file `path` that hold NaN or inf, read in
    pieces of `piece` bytes through ordinary reads (the page cache), not through a mapping of this
    process."""
    with open(path, "rb") as f:
        header, data_start = _safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__" or info.get("dtype") not in _EXPONENT_MASKS:
                continue
            bits, mask = _EXPONENT_MASKS[info["dtype"]]
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            left = end - begin
            while left > 0:
                data = f.read(min(left, piece))
                if not data:
                    break
                left -= len(data)
                if bool(((np.frombuffer(data, dtype=bits) & bits(mask)) == mask).any()):
                    yield name
                    break


def read_tensor_copy(path: Path, name: str) -> torch.Tensor:
    """One floating-point tensor of a (checked) safetensors file as a tensor of its own, read
    through the page cache: for weights a loader must copy into another layout, since copying from
    the memory-mapped view would leave the mapped pages resident beside the copy."""
    with open(path, "rb") as f:
        header, data_start = _safetensors_header(f)
        info = header.get(name)
        if info is None or info.get("dtype") not in _TORCH_DTYPES:
            raise UserError(f"{path} has no floating-point tensor {name!r}")
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]])
        if out.numel() * out.element_size() != end - begin:
            raise UserError(
                f"{path}: {name} has {end - begin} bytes for shape {info['shape']}; the file is "
                "corrupt"
            )
        f.seek(data_start + begin)
        if f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != end - begin:
            raise UserError(f"{path}: {name} is cut short; the file is truncated")
    out.finite_checked = True
    return out
