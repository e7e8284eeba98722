"""The working directory's lock left by a snakemake run that was killed, taken over so that the
same command resumes.

Snakemake writes the files its run makes into `.snakemake/locks/` and refuses to start while they
are there ("Directory cannot be locked"). A run killed with SIGKILL (the out-of-memory killer, a
closed laptop, a power cut) cannot remove them. While the Snakefile is read, `take_over` removes
them when no snakemake process on this machine works in this folder: then no run holds them.
(A run on another machine sharing the folder cannot be seen from here: start one at a time.)
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil


def is_snakemake(argv: list[str]) -> bool:
    """Whether a command line runs snakemake (its entry point, or `python -m snakemake`)."""
    return any(Path(arg).name == "snakemake" for arg in argv[:2]) or argv[1:3] == ["-m", "snakemake"]


def snakemake_processes_in(folder: Path) -> list[int]:
    """The other snakemake processes on this machine whose working directory is `folder`."""
    folder = os.path.realpath(folder)
    return [
        info["pid"]
        for info in (process.info for process in psutil.process_iter(["pid", "cmdline", "cwd"]))
        if info["pid"] != os.getpid()
        and info["cwd"]
        and os.path.realpath(info["cwd"]) == folder
        and is_snakemake(info["cmdline"] or [])
    ]


def take_over(folder: Path | str = ".") -> list[Path]:
    """Remove `folder`'s snakemake lock files if no snakemake process works there; what it removed."""
    held = sorted((Path(folder) / ".snakemake/locks").glob("*.lock"))
    if not held or snakemake_processes_in(Path(folder)):
        return []
    for lock in held:
        lock.unlink(missing_ok=True)
    return held
