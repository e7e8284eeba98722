"""Send a step's logging, warnings and traceback to its rule's log file.

Snakemake prints a failing script's traceback only to the terminal; with this, the rule's `log:`
file holds the whole story and the terminal gets one clear sentence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("gemma_edge")


class StepFailed(SystemExit):
    """Raised after a step's error has been logged; exits non-zero without a second traceback."""


@contextlib.contextmanager
def rule_log(log_path: Path | str | None, step: str):
    """Route Python logging and the process's stdout/stderr (C++ runtime logs included) to `log_path`."""
    if log_path is None:
        yield
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with open(log_path, "a", buffering=1, encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        root = logging.getLogger()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        started = time.monotonic()
        log.info("%s: started (pid %d)", step, os.getpid())
        try:
            yield
            log.info("%s: finished in %.1f s", step, time.monotonic() - started)
        except Exception as error:  # noqa: BLE001 - every failure is logged, then reported once
            log.error("%s failed: %s\n%s", step, error, traceback.format_exc())
            print(f"{step} failed: {error} (full log: {log_path})", file=terminal)
            raise StepFailed(1) from error
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.removeHandler(handler)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def log_memory(stage: str) -> None:
    """Log this process's resident memory now and at its peak so far: where a step's peak comes from."""
    from .artifacts import peak_rss_mb

    try:
        current_mb = f"{int(Path('/proc/self/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20:.0f}"
    except OSError:  # not Linux: the peak alone
        current_mb = "?"
    log.info("memory after %s: RSS %s MiB, peak %.0f MiB", stage, current_mb, peak_rss_mb())
