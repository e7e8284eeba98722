"""What of an engine stays resident, split as the kernel splits it: anonymous pages (heap, packed
weights, planned buffers: what a memory limit without swap cannot take back) and file-backed
pages (a mmapped model file: the kernel can drop and re-read them under pressure).

Standard library only (it runs on the device as uploaded). Linux keeps the exact peak of the
whole (VmHWM) but not of its parts, so the parts' peaks are sampled: a thread reads
/proc/<pid>/status while the engine runs, every millisecond at first and then less often, up to
every `interval_s`; the peaks it saw are at most the true ones (a spike between two samples can be
missed; the whole's peak is exact up to the last sample). An engine that ends before the first
sample has no figures (None: unknown, not zero). A child's exact peak cannot be had from wait4
instead: its ru_maxrss keeps the forked parent's memory from before the exec (421 MB for a
llama-bench whose samples never passed 10 MB).
"""

from __future__ import annotations

import threading
from pathlib import Path

KIB = 1024
# /proc/<pid>/status fields, in kB: the whole and its parts (RssShmem: shared memory, tmpfs).
# VmLck: pages locked in memory (mlock), which no pressure can take back either.
FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem", "VmHWM": "peak", "VmLck": "locked"}


def resident(pid: int | str = "self") -> dict[str, int] | None:
    """A process's resident memory now, in bytes (`rss`, `anon`, `file`, `shmem`, `locked`) and its
    exact peak (`peak`); None once the process is gone, or where /proc has no such fields."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[FIELDS[key]] = int(rest.split()[0]) * KIB
    return values if len(values) == len(FIELDS) else None


class ResidentPeaks:
    """Samples a process's resident memory in a thread between `start()` and `stop()` (or while
    entered, as a context manager). `summary()` gives the peaks: `peak_bytes` (the kernel's own,
    exact) and, sampled, `anon_peak_bytes`, `file_peak_bytes`, `shmem_peak_bytes` and
    `locked_peak_bytes`."""

    def __init__(self, pid: int | str = "self", interval_s: float = 0.05):
        self.pid, self.interval_s = pid, interval_s
        self.peaks = dict.fromkeys(FIELDS.values(), 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resident-peaks", daemon=True)

    def sample(self) -> None:
        now = resident(self.pid)
        if now is not None:
            self.samples += 1
            for key, value in now.items():
                self.peaks[key] = max(self.peaks[key], value)

    def _run(self) -> None:
        wait = 0.001  # a short engine (a tiny model's llama-bench) is caught before it ends
        while not self._stop.wait(wait):
            self.sample()
            wait = min(2 * wait, self.interval_s)

    def start(self) -> ResidentPeaks:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def __enter__(self) -> ResidentPeaks:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        def seen(value: int) -> int | None:
            return value if self.samples else None

        return {
            "peak_bytes": seen(max(self.peaks["peak"], self.peaks["rss"])),
            "anon_peak_bytes": seen(self.peaks["anon"]),
            "file_peak_bytes": seen(self.peaks["file"]),
            "shmem_peak_bytes": seen(self.peaks["shmem"]),
            "locked_peak_bytes": seen(self.peaks["locked"]),
            "samples": self.samples,
            "interval_s": self.interval_s,
            "how": "peak_bytes: the kernel's VmHWM (exact up to the last sample); the parts: /proc/<pid>/status "
            "sampled every 1 ms at first, then at most every interval_s; null: the engine ended before the first sample",
        }


def highest(*summaries: dict) -> dict:
    """The peaks over several sampled runs of one engine (its llama-bench phases, say); a figure no
    run sampled stays None."""
    merged = dict(summaries[0])
    for other in summaries[1:]:
        for key, value in other.items():
            if key.endswith("_bytes"):
                known = [v for v in (merged[key], value) if v is not None]
                merged[key] = max(known) if known else None
    merged["samples"] = sum(summary["samples"] for summary in summaries)
    return merged
