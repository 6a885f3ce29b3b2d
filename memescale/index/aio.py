"""Direct reads of record sectors with Linux native AIO (O_DIRECT + io_submit/io_getevents).

With ``Index.open(dir, io="direct")`` every sector a search expands is read from the device,
bypassing the page cache (what DiskANN does): latency does not depend on what other
processes cached, the index's pages never crowd out anything else's, and one search thread
keeps every read of every query it advances in flight at once (the kernel queues them on
the device together), instead of faulting pages in one after the other.

Python side: `DirectReader` opens the file with O_DIRECT and hands out `IoSlot`s (one per
concurrent search call: an AIO context, a 4 KiB-aligned buffer, iocbs and events); the search
kernels take a slot as an `AioView`.
Kernel side (numba, nogil): `set_read` fills one iocb, `submit` submits a run of them,
`reap` collects completions (waiting for at least a given number). System calls go through libc's ``syscall`` (variadic, so the call is
ABI-correct), declared as an external symbol so the compiled kernels stay cacheable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import queue
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit

from .kernels import last_errno, raw_syscall

ALIGN = 4096
IOCB_CMD_PREAD = 0
IOCB_WORDS = 8  # struct iocb: 64 bytes
EVENT_WORDS = 4  # struct io_event: 32 bytes
_MAX_RETRIES = 1000  # io_submit / io_getevents interrupted (EINTR, EAGAIN) in one call before giving up
# Native AIO system call numbers (io_setup, io_destroy, io_getevents, io_submit).
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = _SYSCALLS.get(platform.machine(), (-1, -1, -1, -1))

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


class DirectIOUnavailable(OSError):
    """Direct reads cannot be used here (platform, filesystem or AIO limits); `str` says why."""


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of `nbytes` whose data starts on an ALIGN boundary."""
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]


class AioView(NamedTuple):
    """An `IoSlot` as the numba kernels take it (a named tuple of plain ints and arrays, so
    compiled kernels stay cached). fd < 0 stands for no slot: records are then read through
    the memory map and the other fields are unused placeholders."""

    ctx: int  # AIO context (io_setup)
    fd: int  # O_DIRECT descriptor of the record file, or -1
    iocbs: np.ndarray  # (capacity, IOCB_WORDS) uint64: one struct iocb per read
    ptrs: np.ndarray  # (capacity,) uint64: address of each iocb (io_submit's array)
    events: np.ndarray  # (capacity, EVENT_WORDS) int64: struct io_event completions
    b16: np.ndarray  # (capacity * span / 2,) uint16 view of the read buffer (read j lands at byte j * span)
    b32: np.ndarray  # (capacity * span / 4,) int32 view of the same buffer


class IoSlot:
    """Everything one search call needs for direct reads of up to `capacity` sectors spans
    at a time: an AIO context, a buffer of capacity x span bytes, iocbs, pointers, events."""

    def __init__(self, fd: int, capacity: int, span: int) -> None:
        self.fd = fd
        self.capacity = capacity
        self.span = span
        ctx = ctypes.c_ulong(0)
        if _libc.syscall(SYS_IO_SETUP, ctypes.c_long(capacity), ctypes.byref(ctx)) != 0:
            e = ctypes.get_errno()
            raise DirectIOUnavailable(e, f"io_setup({capacity}) failed: {os.strerror(e)} (see /proc/sys/fs/aio-max-nr)")
        self.ctx = int(ctx.value)
        self.buf = aligned_buffer(capacity * span)
        self.buf16 = self.buf.view(np.uint16)
        self.buf32 = self.buf.view(np.int32)
        self.buf16.flags.writeable = self.buf32.flags.writeable = False  # only the kernel writes
        self.iocbs = np.zeros((capacity, IOCB_WORDS), np.uint64)
        self.ptrs = (self.iocbs.ctypes.data + np.arange(capacity, dtype=np.uint64) * np.uint64(IOCB_WORDS * 8)).astype(np.uint64)
        self.events = np.zeros((capacity, EVENT_WORDS), np.int64)

    def view(self) -> AioView:
        """The slot as the search kernels take it."""
        return AioView(self.ctx, self.fd, self.iocbs, self.ptrs, self.events, self.buf16, self.buf32)

    def close(self) -> None:
        """Destroy the AIO context (the kernel first waits for reads still in flight)."""
        if self.ctx:
            _libc.syscall(SYS_IO_DESTROY, ctypes.c_ulong(self.ctx))
            self.ctx = 0

    __del__ = close  # contexts count against the system-wide aio-max-nr


class DirectReader:
    """O_DIRECT handle on a record file plus a pool of IoSlots (grown on demand).

    `borrow(capacity)` lends one slot with room for `capacity` reads (concurrent callers get
    distinct slots); `give_back` returns it, `discard` destroys it. Opening reads the file's
    first span through a slot of `capacity` and compares it with a plain read, so it raises
    DirectIOUnavailable (naming the cause) wherever direct reads would fail later: no native
    AIO on the platform, O_DIRECT or AIO reads refused by the filesystem, aio-max-nr spent.
    `close` must not run while a search is using a slot.
    """

    def __init__(self, path: Path, span: int, capacity: int) -> None:
        if SYS_IO_SETUP < 0:
            raise DirectIOUnavailable(errno.ENOSYS, f"direct reads need Linux native AIO; {platform.machine()} is not supported")
        if span % ALIGN:
            raise DirectIOUnavailable(errno.EINVAL, f"record span {span} is not a multiple of {ALIGN}")
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            raise DirectIOUnavailable(e.errno, f"cannot open {path} with O_DIRECT: {e.strerror} (use io='mmap')") from None
        self.span = span
        self._free: queue.SimpleQueue[IoSlot] = queue.SimpleQueue()
        self._all: list[IoSlot] = []
        try:  # fail at open, not at the first search, when direct reads are unusable
            slot = self._new_slot(capacity)
            self._probe(path, slot)
            self._free.put(slot)
        except BaseException:
            self.close()
            raise

    def _probe(self, path: Path, slot: IoSlot) -> None:
        with open(path, "rb") as f:
            want = f.read(self.span)
        try:
            read_into(slot.ctx, self.fd, slot.iocbs, slot.ptrs, slot.events, slot.buf.ctypes.data, len(want), 0)
        except OSError as e:
            raise DirectIOUnavailable(errno.EIO, f"direct read of {path} failed: {e} (use io='mmap')") from None
        if bytes(slot.buf[: len(want)]) != want:
            raise DirectIOUnavailable(errno.EIO, f"direct read of {path} returned other bytes than a plain read")

    def _new_slot(self, capacity: int) -> IoSlot:
        assert self.fd is not None, "DirectReader is closed"
        slot = IoSlot(self.fd, capacity, self.span)
        self._all.append(slot)
        return slot

    def borrow(self, capacity: int) -> IoSlot:
        """A free slot with room for `capacity` reads (a larger one replaces a small one)."""
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            return self._new_slot(capacity)
        if slot.capacity < capacity:
            self.discard(slot)
            return self._new_slot(capacity)
        return slot

    def give_back(self, slot: IoSlot) -> None:
        """Return a borrowed slot after a search call that completed."""
        self._free.put(slot)

    def discard(self, slot: IoSlot) -> None:
        """Destroy a borrowed slot (after a failed call, or one too small)."""
        slot.close()
        if slot in self._all:
            self._all.remove(slot)

    def close(self) -> None:
        for slot in self._all:
            slot.close()
        self._all.clear()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@njit(nogil=True, cache=True, inline="always")
def set_read(iocbs, j, fd, addr, nbytes, offset):
    """Make iocb j a pread of `nbytes` at file `offset` into address `addr`."""
    iocbs[j, 0] = np.uint64(j)
    iocbs[j, 1] = np.uint64(0)
    iocbs[j, 2] = np.uint64(IOCB_CMD_PREAD) | (np.uint64(fd) << np.uint64(32))
    iocbs[j, 3] = np.uint64(addr)
    iocbs[j, 4] = np.uint64(nbytes)
    iocbs[j, 5] = np.uint64(offset)
    iocbs[j, 6] = np.uint64(0)
    iocbs[j, 7] = np.uint64(0)


@njit(nogil=True, cache=True, inline="always")
def _transient(r):
    """Whether a system call result r is worth retrying (0 done, or EINTR / EAGAIN)."""
    if r >= 0:
        return True
    e = last_errno()
    return e == errno.EINTR or e == errno.EAGAIN


@njit(nogil=True, cache=True)
def submit(ctx, ptrs, start, count):
    """Submit iocbs [start, start + count) on AIO context `ctx` (retrying partial submits).

    Raises OSError if io_submit fails other than transiently, or keeps being interrupted;
    reads already submitted stay in flight, so the caller must destroy the context (which
    waits for them) before reusing the buffer.
    """
    sent = 0
    retries = 0
    while sent < count:
        r = raw_syscall(SYS_IO_SUBMIT, ctx, count - sent, ptrs.ctypes.data + 8 * (start + sent), 0, 0)
        if r > 0:
            sent += r
        else:
            retries += 1
            if not _transient(r) or retries > _MAX_RETRIES:
                raise OSError("io_submit failed")


@njit(nogil=True, cache=True)
def reap(ctx, events, iocbs, min_nr, max_nr):
    """Wait until at least `min_nr` (0: none) of the submitted reads complete and collect up
    to `max_nr` completions into `events` (row e: iocb index in column 0, result in column 2).
    Returns how many were collected. Raises OSError if a read failed or came back short, or if
    io_getevents fails other than transiently.
    """
    retries = 0
    while True:
        r = raw_syscall(SYS_IO_GETEVENTS, ctx, min_nr, max_nr, events.ctypes.data, 0)
        if r >= 0:
            break
        retries += 1
        if not _transient(r) or retries > _MAX_RETRIES:
            raise OSError("io_getevents failed")
    for e in range(r):
        got = events[e, 2]
        if got < 0:
            raise OSError("read failed (I/O error)")
        if got != np.int64(iocbs[events[e, 0], 4]):
            raise OSError("read came back short (file truncated?)")
    return r


@njit(nogil=True, cache=True)
def read_into(ctx, fd, iocbs, ptrs, events, addr, nbytes, offset):
    """One direct read of `nbytes` at `offset` into address `addr`, waited for."""
    set_read(iocbs, 0, fd, addr, nbytes, offset)
    submit(ctx, ptrs, 0, 1)
    done = 0
    while done < 1:
        done += reap(ctx, events, iocbs, 1, 1)
