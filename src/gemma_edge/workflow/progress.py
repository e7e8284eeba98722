"""Progress of long steps on the terminal: which step, how long so far, and the latest line of its log.

A step such as lowering E2B's 35 layers is silent on the terminal for 15 to 30 minutes: its
progress goes to its rule's log (`steplog.rule_log`), which the terminal never shows. The
workflow's logger plugin (`snakemake_logger_plugin_gemma_edge`) feeds this tracker Snakemake's job
events and, every `every_s` seconds, prints one line for each job running at least that long:

    lower: 4 min 10 s so far; XNNPACK delegate 12 of 35 (forward) (log: logs/demo/lower.log)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

# steplog's line format is "<date> <time>,<ms> <LEVEL> <logger>: <message>"; the terminal shows the message.
_TAIL_BYTES = 4096


@dataclass
class Running:
    rule: str
    log: str | None
    started: float


@dataclass
class RunningJobs:
    """Jobs Snakemake has started and not yet finished, by job id."""

    every_s: float = 60.0
    jobs: dict[int, Running] = field(default_factory=dict)

    def started(self, jobid: int, rule: str, logs: list[str], now: float | None = None) -> None:
        self.jobs[jobid] = Running(rule, logs[0] if logs else None, time.monotonic() if now is None else now)

    def ended(self, jobid: int) -> None:
        self.jobs.pop(jobid, None)

    def lines(self, now: float | None = None) -> list[str]:
        """One line per job running for at least `every_s` seconds, oldest first."""
        now = time.monotonic() if now is None else now
        due = sorted((job for job in self.jobs.values() if now - job.started >= self.every_s), key=lambda job: job.started)
        return [progress_line(job, now - job.started) for job in due]


def progress_line(job: Running, elapsed_s: float) -> str:
    line = f"{job.rule}: {duration(elapsed_s)} so far"
    if job.log:
        if latest := latest_message(Path(job.log)):
            line += f"; {latest}"
        line += f" (log: {job.log})"
    return line


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def latest_message(log: Path) -> str | None:
    """The message of the last line a step logged (steplog's format), or None before its first."""
    try:
        with log.open("rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - _TAIL_BYTES))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        parts = line.split(" ", 4)
        # "2026-12-07 14:10:00,123 INFO gemma_edge: message": date, time, level, logger, message
        if len(parts) == 5 and parts[3].endswith(":") and parts[2].isupper():
            return parts[4].strip()
    return None
