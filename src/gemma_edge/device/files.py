"""Files written atomically and read back: what every step writes, on the host and on a device.

Standard library only, so a device runs it as it is (the device package is uploaded whole).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt or does not match its manifest."""


class DiskFull(ArtifactError):
    """The filesystem an artifact goes to has no room for it."""


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    """Peak resident memory so far of this process or of any child it waited for (a converter
    subprocess, say), whichever is larger. Exact, unlike sampling, which misses short spikes."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return scale * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def temp_path_for(path: Path) -> Path:
    """A hidden name beside `path` that keeps its suffix (torch.export.load wants a .pt2 name)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of `path` (temp_path_for's names) whose process no longer runs: left by a
    step killed with SIGKILL, which cannot clean up. A live process's (another run writing the same
    file in a shared hub cache, say) is never one of them."""
    path = Path(path)
    name = re.compile(rf"\.{re.escape(path.stem)}\.tmp-(\d+){re.escape(path.suffix)}")
    if not path.parent.is_dir():
        return []
    return [
        candidate
        for candidate in path.parent.iterdir()
        if (match := name.fullmatch(candidate.name)) and not _process_runs(int(match.group(1)))
    ]


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def atomic_output(path: Path, min_bytes: int | None = None):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    Whatever fails inside the block leaves neither the temporary file nor a partial `path` behind;
    a full disk raises DiskFull, one sentence naming the folder, its free space and what `path`
    needs (`min_bytes`, the least it will take when the caller knows it, is checked first).
    Temporaries of `path` left by a killed process are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):
        _remove(stale)
        log.info("removed %s, left by a process killed before it could clean up", stale)
    if min_bytes and shutil.disk_usage(path.parent).free < min_bytes:
        raise DiskFull(disk_full_message(path, 0, min_bytes))
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        written = tmp.stat().st_size if tmp.is_file() else 0
        _remove(tmp)
        if isinstance(error, Exception) and not isinstance(error, DiskFull) and _disk_full(error):
            raise DiskFull(disk_full_message(path, written, min_bytes)) from error
        raise


def _disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is "no space left on
    device" (torch's zip writer, for one, reports it as a RuntimeError raised while handling it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(path: Path, written: int, min_bytes: int | None) -> str:
    """One sentence: the folder, its free space, what `path` needs, what to do."""
    path = Path(path)
    free = shutil.disk_usage(path.parent).free
    need = f"at least {min_bytes / 1e6:.1f} MB" if min_bytes and min_bytes > free else "more than that"
    filled = f" (the disk filled after {written / 1e6:.1f} MB of it)" if written else ""
    return (
        f"{path.parent} has {free / 1e6:.1f} MB free but {path.name} needs {need}{filled}: "
        "free space there, then re-run the same command"
    )


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if Path(path).is_dir():
            shutil.rmtree(path)
        else:
            os.remove(path)


def write_json(path: Path, payload) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))
