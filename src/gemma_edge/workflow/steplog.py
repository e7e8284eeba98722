"""Send a step's logging, warnings and traceback to its rule's log file.

Snakemake prints a failing script's traceback only to the terminal; with this, the rule's `log:`
file holds the whole story and the terminal gets one clear sentence. The step's exit status says
which of the two endings it took, so the workflow's terminal filter (`gemma_edge.workflow.terminal`) can
drop Snakemake's own report of it: EXIT_REPORTED after a failure the step has already put in one
sentence, 128 + the signal's number after an interruption (Ctrl-C, or SIGTERM from a scheduler).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

log = logging.getLogger("gemma_edge")


# The step failed and said why on the terminal in one sentence (any other status: it did not).
EXIT_REPORTED = 3
# What stops a step: Ctrl-C in its terminal, or a scheduler or `kill` ending it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# Third-party messages that say nothing about this step on a CPU host, by logger (or warning
# category) and message: torch's pytree deprecation, repeated through every lowering log; torchao
# failing to load its CUDA-only kernels and finding no Triton. Anything else is logged.
QUIET_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)
QUIET_RECORDS = (
    ("torchao", r"Failed to load .*/torchao/_C_(mxfp8|cutlass)"),
    ("torchao.kernel.intmm", r"Warning: Detected no triton"),
)


def _third_party_noise(record: logging.LogRecord) -> bool:
    """False for a record QUIET_RECORDS names (a logging filter: keeps every other record)."""
    message = record.getMessage()
    return not any(record.name == name and re.match(pattern, message) for name, pattern in QUIET_RECORDS)


class StepFailed(SystemExit):
    """Raised after a step's error has been logged; exits non-zero without a second traceback."""


class StepInterrupted(KeyboardInterrupt):
    """A stop signal arrived: unwinds the step like Ctrl-C does, so every `with` block (atomic
    outputs, temporary folders) removes what it made."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    # The first signal unwinds the step; further ones (a second Ctrl-C, the scheduler's SIGTERM
    # after it) must not cut short the clean-up it triggers, so they are ignored from here on.
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    raise StepInterrupted(signum)


@contextlib.contextmanager
def _stop_signals_unwind():
    """SIGINT and SIGTERM raise StepInterrupted while the block runs (main thread only)."""
    try:
        previous = {stop: signal.signal(stop, _raise_interrupted) for stop in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    except KeyboardInterrupt:
        # On its way out: no further stop signal may cut short the logging and clean-up that follow.
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        raise
    except BaseException:
        _restore(previous)
        raise
    _restore(previous)


def _restore(handlers: dict) -> None:
    for stop, handler in handlers.items():
        signal.signal(stop, handler)


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
        handler.addFilter(_third_party_noise)
        for category, pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        started = time.monotonic()
        try:
            with _stop_signals_unwind():
                log.info("%s: started (pid %d)", step, os.getpid())
                yield
            log.info("%s: finished in %.1f s", step, time.monotonic() - started)
        except KeyboardInterrupt as stop:
            # By now every `with` block inside the step has removed its temporaries. Nothing on
            # the terminal: the workflow says once that the run was cancelled.
            signum = getattr(stop, "signum", signal.SIGINT)
            log.warning(
                "%s: interrupted by %s after %.1f s; its temporary files were removed",
                step,
                signal.Signals(signum).name,
                time.monotonic() - started,
            )
            raise StepFailed(128 + signum) from None
        except Exception as error:  # noqa: BLE001 - every failure is logged, then reported once
            log.error("%s failed: %s\n%s", step, error, traceback.format_exc())
            print(f"{step} failed: {error} (full log: {log_path})", file=terminal)
            raise StepFailed(EXIT_REPORTED) from error
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
    from gemma_edge.device.files import peak_rss_mb

    try:
        current_mb = f"{int(Path('/proc/self/statm').read_text().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20:.0f}"
    except OSError:  # not Linux: the peak alone
        current_mb = "?"
    log.info("memory after %s: RSS %s MiB, peak %.0f MiB", stage, current_mb, peak_rss_mb())
