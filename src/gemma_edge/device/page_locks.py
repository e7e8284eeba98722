"""Keep ExecuTorch from locking a program's pages in memory.

The Python bindings open a .pte by path with an mmap data loader that `mlock`s every segment it
maps, ignoring failures (`MmapDataLoader::MlockConfig::UseMlockIgnoreErrors`). A lock succeeds for
root (CAP_IPC_LOCK) or within RLIMIT_MEMLOCK, and then reads the whole segment at load and pins
it: for E2B that is the 2.7 GB of INT8 embedding tables, of which a token reads one row each, and
the 35-layer program no longer fits a 4 GB Pi (docs/design.md, "The program's pages are mapped,
never locked", has the figures). As an ordinary user with the default RLIMIT_MEMLOCK the same lock
fails and is ignored, so the program's memory depended on who ran it.

`unlock_program_pages()` makes every later lock fail for this process, as it does for an ordinary
user: RLIMIT_MEMLOCK to 0 and CAP_IPC_LOCK dropped from the calling thread's effective set (the
thread that loads the program). The mapped pages are then read when touched and can be reclaimed
under pressure. Standard library only (the device runs it as uploaded), so the capability is
dropped with capget/capset through ctypes; no library in the device's runtime does it.
"""

from __future__ import annotations

import ctypes
import os
import resource
from pathlib import Path

CAP_IPC_LOCK = 14
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_ipc_lock() -> bool:
    """Drop CAP_IPC_LOCK from this thread's effective capabilities; whether it had it."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _Header(LINUX_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    bit = 1 << CAP_IPC_LOCK
    had = bool(data[0].effective & bit)
    if had:
        data[0].effective &= ~bit
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    return had


def unlock_program_pages() -> dict:
    """Make page locks fail for this thread from now on; what was changed."""
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, hard))
    return {"memlock_limit": 0, "dropped_cap_ipc_lock": _drop_ipc_lock()}


def release_page_cache(path: Path) -> None:
    """Tell the kernel the program file's cached pages that no mapping holds are not needed: after
    loading, XNNPACK has packed the linears' weights into memory of its own, and their file pages
    would otherwise sit in the page cache, charged to this process's cgroup, until
    reclaim takes them back while the program runs. Pages a mapping still holds stay."""
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
