"""The workflow's terminal, as a Snakemake logger plugin (`--logger gemma-edge`, set in profiles/).

Snakemake finds logger plugins by their top-level module name (`snakemake_logger_plugin_<name>`),
so this module sits beside `gemma_edge` and only wires the plugin interface to it:
- every record goes to Snakemake's own terminal handler, with `gemma_edge.workflow.terminal`'s
  formatter around Snakemake's (one sentence per failed step, the run's end in one sentence);
- every `progress_every` seconds, one line per job running that long (`gemma_edge.workflow.progress`).
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass, field

from snakemake_interface_logger_plugins.base import LogHandlerBase
from snakemake_interface_logger_plugins.common import LogEvent
from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase

from gemma_edge.workflow import terminal
from gemma_edge.workflow.progress import RunningJobs


@dataclass
class LogHandlerSettings(LogHandlerSettingsBase):
    progress_every: int = field(
        default=60,
        metadata={"help": "Seconds between progress lines for running jobs (0: none).", "type": int},
    )


class LogHandler(LogHandlerBase):
    def __post_init__(self) -> None:
        # Snakemake's own terminal handler, so colours, blank lines and its formats stay its own.
        # Not part of the plugin interface: tests/test_terminal.py pins what is used of it.
        from snakemake.logging import ColorizingTextHandler

        stream = sys.stdout if self.common_settings.stdout else sys.stderr
        self.terminal = ColorizingTextHandler(nocolor=self.common_settings.nocolor, stream=stream)
        every = self.settings.progress_every if self.settings is not None else LogHandlerSettings.progress_every
        self.jobs = RunningJobs(every_s=every)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if every > 0 and not self.common_settings.dryrun:
            threading.Thread(target=self._tick, name="gemma-edge-progress", daemon=True).start()

    @property
    def writes_to_stream(self) -> bool:
        return True

    @property
    def writes_to_file(self) -> bool:
        return False

    @property
    def has_filter(self) -> bool:
        return False  # Snakemake's default filter (--quiet, --printshellcmds) applies

    @property
    def has_formatter(self) -> bool:
        return False  # Snakemake's default formatter, wrapped in setFormatter

    @property
    def needs_rulegraph(self) -> bool:
        return False

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        super().setFormatter(fmt)
        self.terminal.setFormatter(terminal.OneSentencePerFailure(fmt or logging.Formatter(), terminal.hooks_run))

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        # One lock over the bookkeeping and the printing: no progress line after its job's end.
        with self._lock:
            if event == LogEvent.JOB_INFO:
                self.jobs.started(record.jobid, record.rule_name, list(record.log or ()))
            elif event == LogEvent.JOB_FINISHED:
                self.jobs.ended(record.job_id)
            elif event == LogEvent.JOB_ERROR:
                self.jobs.ended(record.jobid)
            self.terminal.emit(record)

    def _tick(self) -> None:
        while not self._stop.wait(self.jobs.every_s):
            with self._lock:
                for line in self.jobs.lines():
                    self.terminal.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))

    def close(self) -> None:
        self._stop.set()
        self.terminal.flush()
        super().close()
