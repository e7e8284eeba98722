"""What the workflow prints on the terminal when a step fails or the run is cancelled.

A failing step already says why in one sentence that names its log (`steplog.rule_log`). Snakemake
then adds its own report: a `RuleException`/`CalledProcessError` block with the full script
command, an "Error in rule" block, and at the end "Exiting because a job execution failed" and
"WorkflowError: At least one job did not complete successfully". The workflow's logger plugin
(`snakemake_logger_plugin_gemma_edge`, named in profiles/) puts `OneSentencePerFailure` around
Snakemake's terminal formatter (its log file under .snakemake/log/ keeps everything), so that:

- a step that reported its failure (exit status EXIT_REPORTED) adds nothing to its sentence;
- a step that was interrupted (Ctrl-C or SIGTERM) adds nothing: the run's end says it was cancelled;
- any other failed step (killed by the kernel, crashed before it could report) gets one sentence
  naming how its process ended and its log (a SIGKILL: that nothing partial was kept);
- a config refusal (while the Snakefile is read, or while a rule checks what its job needs) is
  its own sentence, without Snakemake's frame and traceback;
- the run's closing error lines give way to the Snakefile's `onerror` sentence.

Anything it does not recognise is printed exactly as Snakemake formats it. The records' `event`
and fields are the logger-plugin interface's (`LogEvent`); the messages matched below are
Snakemake's own text, which tests/test_terminal.py pins against the installed Snakemake.
"""

from __future__ import annotations

import logging
import re
import signal
import threading

from gemma_edge.workflow.steplog import EXIT_REPORTED, STOP_SIGNALS

CANCELLED = "Cancelled: nothing partial was kept; re-run the same command to resume."
FAILED = "A step failed: the sentence above says why and names its log; fix the cause and re-run the same command."
CANCELLED_AFTER_FAILURE = (
    "Cancelled after a step failed: fix the failure the sentence above names, then re-run the same command to resume."
)

# Snakemake's closing lines after a failed run, which the `onerror` sentence replaces.
_CLOSING_LINES = (
    "Exiting because a job execution failed. Look above for error messages",
    "At least one job did not complete successfully.",
)
_EXIT_STATUS = re.compile(r"CalledProcessError in file .*returned non-zero exit status (\d+)\.", re.S)
_DIED = re.compile(r"CalledProcessError in file .*died with <Signals\.(\w+): (\d+)>\.", re.S)
_INTERRUPTED = {128 + stop for stop in STOP_SIGNALS} | {-stop for stop in STOP_SIGNALS}
# A config refusal (gemma_edge.workflow.config.ConfigError), raised while the Snakefile is read or while a
# rule's input function checks what its job needs: its own sentence, without Snakemake's frame.
_CONFIG_REFUSALS = {"ConfigError", "InputFunctionException"}
_CONFIG_SENTENCE = re.compile(r"^\s*(?:ConfigError: )?(config: .+)$", re.M)

_state = {"cancelled": False, "failed": False}


def step_exit(message: str) -> int | None:
    """How a script step's process ended, from Snakemake's CalledProcessError text: its exit
    status, or minus the signal that killed it; None if the message is not about that."""
    if match := _EXIT_STATUS.search(message):
        return int(match.group(1))
    if match := _DIED.search(message):
        return -int(match.group(2))
    return None


def describe_exit(status: int) -> str:
    if status > 128 and status - 128 in signal.valid_signals():
        status = 128 - status  # the shell's way of saying its child was killed by that signal
    if status < 0:
        name = signal.Signals(-status).name
        if -status == signal.SIGKILL:
            return f"its process was killed by {name} (often the kernel's out-of-memory killer)"
        return f"its process was killed by {name}"
    return f"its process exited with status {status} without saying why"


def failure_sentence(rule: str, status: int) -> str:
    """What the terminal says of a step that ended without saying why. A SIGKILL (the OOM killer,
    `kill -9`) is the one ending a step cannot clean up after; its outputs are only ever renamed
    into place whole, and the next run removes its temporaries (gemma_edge.device.files.atomic_output)."""
    sentence = f"{rule} failed: {describe_exit(status)}"
    if status in (-signal.SIGKILL, 128 + signal.SIGKILL):
        sentence += "; nothing partial was kept: re-run the same command to resume"
    return sentence


class OneSentencePerFailure(logging.Formatter):
    """Wraps Snakemake's formatter on the terminal handler; "" means print nothing."""

    def __init__(self, inner: logging.Formatter, onerror_runs=lambda: True):
        super().__init__()
        self.inner = inner
        self.onerror_runs = onerror_runs
        # Snakemake logs a job's RuleException and then its "Error in rule" from the same thread.
        self._pending = threading.local()

    def format(self, record: logging.LogRecord) -> str:
        from snakemake_interface_logger_plugins.common import LogEvent

        event = getattr(record, "event", None)
        if (
            event == LogEvent.ERROR
            and getattr(record, "exception", None) in _CONFIG_REFUSALS
            and (match := _CONFIG_SENTENCE.search(record.getMessage()))
        ):
            return match.group(1)
        if event == LogEvent.ERROR and getattr(record, "exception", None) == "RuleException":
            status = step_exit(record.getMessage())
            if status is not None:
                self._pending.status = status
                if status in _INTERRUPTED:
                    _state["cancelled"] = True
                return ""
        elif event == LogEvent.JOB_ERROR:
            status = getattr(self._pending, "status", None)
            self._pending.status = None
            if status in _INTERRUPTED:
                return ""
            _state["failed"] = True
            if status == EXIT_REPORTED:
                return ""
            if status is not None:
                logs = ", ".join(record.log) or "none (the rule has no log:)"
                return f"{failure_sentence(record.rule_name, status)} (full log: {logs})"
        elif _is_closing_line(record.getMessage()) and self.onerror_runs():
            return ""
        return self.inner.format(record)


def _is_closing_line(message: str) -> bool:
    lines = [line.strip() for line in message.strip().splitlines()]
    if lines[:1] == ["WorkflowError:"]:
        lines = lines[1:]
    return len(lines) == 1 and lines[0] in _CLOSING_LINES


def hooks_run() -> bool:
    """Whether the Snakefile's `onerror` sentence will replace Snakemake's closing lines."""
    return _state.get("hooks_run", lambda: True)()


def install(workflow) -> None:
    """Called by the Snakefile: tell the formatter whether `onerror` runs, and note a Ctrl-C for
    `cancelled`. A job's own Snakemake process (a cluster job) runs no hooks: no onerror sentence
    replaces the closing lines there, so they stay. (The execution settings arrive after the
    Snakefile is read, hence asked when formatting; tests/test_snakemake_internals.py pins them.)"""
    _state["hooks_run"] = lambda: not getattr(workflow.execution_settings, "no_hooks", False)
    try:
        previous = signal.getsignal(signal.SIGINT)
        if callable(previous) and previous is not _note_ctrl_c:
            _state["previous_sigint"] = previous
            signal.signal(signal.SIGINT, _note_ctrl_c)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass


def _note_ctrl_c(signum, frame):
    _state["cancelled"] = True
    _state["previous_sigint"](signum, frame)


def cancelled(snakemake_logs=()) -> bool:
    """Whether the run ended because it was stopped (Ctrl-C, SIGTERM) rather than by a failure:
    a Ctrl-C reached Snakemake, a step reported an interruption, or Snakemake's own log says a
    user asked it to stop (what it writes on SIGTERM)."""
    if _state["cancelled"]:
        return True
    for path in snakemake_logs:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        if "Will exit after finishing currently running jobs" in text or "Terminating processes on user request" in text:
            return True
    return False


def run_failed_message(snakemake_logs=()) -> str:
    """The `onerror` sentence."""
    if not cancelled(snakemake_logs):
        return FAILED
    return CANCELLED_AFTER_FAILURE if _state["failed"] else CANCELLED


def done_message(target_jobs) -> str:
    """The line after a successful run: what it made sure of, the asked-for files (a target rule
    without outputs, such as `all` or `perf`, by its inputs)."""
    paths = sorted({str(path) for job in target_jobs for path in (job.output or job.input)})
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return f"Done: {shown or 'nothing was asked for'} (logs in logs/, timings in benchmarks/)"
