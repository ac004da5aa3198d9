"""File I/O that checkpoints, conversions and training runs share: atomic writes, a direct-I/O writer
that hashes what it writes, CRC-32 re-reads, and giving memory-mapped pages back.

Nothing here knows a file format: the callers (weights/safetensors.py, train/) say where bytes go.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import stat
import sys
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

ALIGN = 4096  # O_DIRECT granularity: data written with it starts at a multiple of it and goes in multiples


def check_regular(path: str | Path) -> Path:
    """`path` (as a Path) if it is a regular file, following symlinks. Anything else is a ValueError naming it:
    reading a FIFO blocks until a writer comes (forever), a device may never end. A missing file is left to
    the open that follows (FileNotFoundError)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{path}: is {kind}, expected a regular file")
    return path


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write to `path.tmp`, fsync, rename: a crash leaves the old file or the new one, never half of one; an
    error (a full disk) removes the temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.writelines([data] if isinstance(data, bytes) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: no half-written .tmp left to fill it further
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DirectWriter:
    """Tensor data -> `file` from byte `start` on, written and hashed on a background thread.

    Each piece is copied (transposed, cast) straight into one of a few reused page-aligned buffers of
    `piece_bytes` (+ one block), then the writer thread writes whole ALIGN-blocks with O_DIRECT where
    the file system allows it (no page cache: on a VM whose fresh memory is slow to touch, and for
    outputs larger than RAM, that is faster) and hashes them; the bytes short of a block move on to
    the next buffer. Making the next piece overlaps with writing this one. Writes and crc32 release
    the GIL. `close` writes the tail and returns the CRC-32 of everything written."""

    def __init__(self, file: Path, start: int, piece_bytes: int, buffers: int = 3) -> None:
        self.fd = os.open(file, os.O_WRONLY)
        try:
            self.direct = os.open(file, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:  # e.g. tmpfs: buffered writes
            self.direct = os.dup(self.fd)
        self.piece_bytes = piece_bytes
        self.cap = piece_bytes + ALIGN
        self.free: queue.Queue = queue.Queue()
        for _ in range(buffers):
            self.free.put(mmap.mmap(-1, self.cap))  # page-aligned, touched once, reused
        self.buf, self.fill, self.pos = self.free.get(), 0, start
        self.crc = 0
        self.error: Exception | None = None
        self.todo: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.todo.get()) is not None:
            buf, n = job
            if self.error is None:
                try:
                    view, done = memoryview(buf)[:n], 0
                    while done < n:
                        done += os.pwrite(self.direct, view[done:], self.pos + done)
                    self.pos += n
                    self.crc = zlib.crc32(view, self.crc)
                except Exception as e:  # noqa: BLE001 -- any failure must reach the producer
                    self.error = e
            self.free.put(buf)

    def put(self, piece: Tensor, dtype: torch.dtype) -> int:
        """Copy a piece (any strides) into the stream as dtype; returns its byte count."""
        if self.error is not None:
            raise self.error
        item = torch.tensor([], dtype=dtype).element_size()
        n = piece.numel() * item
        if not n:
            return 0
        if n > self.cap - self.fill or self.fill % item:  # an oversized row, or an odd offset: go through bytes
            data = piece.to(dtype).contiguous().reshape(-1).view(torch.uint8)
            for i in range(0, n, self.piece_bytes):
                self._put_bytes(data[i:i + self.piece_bytes])
            return n
        dst = torch.frombuffer(self.buf, dtype=torch.uint8, count=n, offset=self.fill)
        dst.view(dtype).view(piece.shape).copy_(piece)
        self.fill += n
        self._ship()
        return n

    def _put_bytes(self, data: Tensor) -> None:
        n = min(data.numel(), self.cap - self.fill)
        torch.frombuffer(self.buf, dtype=torch.uint8, count=n, offset=self.fill).copy_(data[:n])
        self.fill += n
        self._ship()
        if n < data.numel():
            self._put_bytes(data[n:])

    def _ship(self) -> None:
        """Hand the whole blocks to the writer; keep the rest in a fresh buffer."""
        whole = self.fill - self.fill % ALIGN
        if not whole:
            return
        buf, rest = self.buf, self.fill - whole
        self.todo.put((buf, whole))
        self.buf = self.free.get()
        self.buf[:rest] = buf[whole:self.fill]  # the writer only reads [0, whole) of the old buffer
        self.fill = rest

    def close(self) -> str:
        """Finish: the last partial block (buffered write); the CRC-32 of all data (8 hex digits)."""
        try:
            self.todo.put(None)
            self.thread.join()
            if self.error is not None:
                raise self.error
            tail = memoryview(self.buf)[:self.fill]
            if os.pwrite(self.fd, tail, self.pos) != len(tail):
                raise OSError(f"short write at the end of {self.fd}")
            return f"{zlib.crc32(tail, self.crc):08x}"
        finally:
            os.close(self.direct)
            os.close(self.fd)


def crc32(file: Path, start: int = 0, progress: Callable[[int], object] | None = None) -> str:
    """CRC-32 (8 hex digits) of `file` from byte `start` to its end, read from the disk with O_DIRECT where
    the file system allows it (a true re-read, and no page cache filled with what was read)."""
    crc = 0
    buf = mmap.mmap(-1, 16 << 20)  # page-aligned
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(file, os.O_RDONLY)
    try:
        pos = start - start % ALIGN  # O_DIRECT reads whole blocks: skip what comes before start in the first one
        skip = start - pos
        while n := os.preadv(fd, [buf], pos):
            crc = zlib.crc32(memoryview(buf)[skip:n], crc)
            if progress is not None:
                progress(n - skip)
            pos, skip = pos + n, 0
    finally:
        os.close(fd)
    return f"{crc:08x}"


def release_pages(t: Tensor) -> None:
    """Drop the pages of a tensor that lives in a private memory map of a file (e.g. from
    `safetensors.open_shard`) once it is no longer needed (e.g. copied into another layout): the map
    lives as long as any tensor of its file, so without this a model rebuilt from mapped weights holds
    them twice. Only whole pages inside t, only where they belong to a private file mapping (dropped
    pages read back from the file if touched); a no-op elsewhere and off Linux."""
    if sys.platform != "linux" or t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start or not _in_private_file_mapping(start, end):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def _in_private_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one private mapping of a file (/proc/self/maps)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= start and end <= hi:
            return fields[1].endswith("p") and len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/")
    return False
