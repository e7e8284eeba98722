"""What the terminal shows when a step fails and when the run is cancelled with Ctrl-C, with the
workflow's own profile (profiles/default), as a user running `snakemake` would see it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from snakemake_interface_logger_plugins.common import LogEvent

from conftest import REPO, snakemake, snakemake_argv, write_config
from gemma_edge.workflow import terminal
from gemma_edge.workflow.steplog import EXIT_REPORTED

DEMO_MARKER = "results/demo-hub/local--gemma4-tiny.json"
DEMO_LOG = "logs/demo/local--gemma4-tiny.log"


def lines_after(output: str, marker: str) -> list[str]:
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if marker in line]
    assert starts, f"{marker!r} is not in:\n{output}"
    return lines[starts[0] :]


def test_a_failing_step_prints_one_sentence_naming_its_log(tmp_path):
    """A download refused offline: one sentence with the log's path, then the run's end; the
    traceback and Snakemake's CalledProcessError block stay out of the terminal."""
    (tmp_path / "empty-cache").mkdir()
    config = write_config(
        tmp_path / "missing.yaml",
        {
            "model": "missing",
            "models": {
                "missing": {
                    "repo_id": "tests/missing-model",
                    "revision": "main",
                    "hub_cache": str(tmp_path / "empty-cache"),
                    "offline": True,
                }
            },
        },
    )
    result = snakemake(tmp_path, "results/missing/checkpoint.json", "--configfile", str(config), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    failure = lines_after(result.stderr, "download failed:")
    assert "is not in" in failure[0] and "(full log: logs/missing/download.log)" in failure[0], output
    for noise in ("Traceback", "RuleException", "CalledProcessError", "Error in rule", "Logfile", "WorkflowError"):
        assert noise not in output, output
    # After the sentence only Snakemake's pointer to its own log and the elapsed time.
    assert len(failure) <= 3, failure
    assert terminal.FAILED in result.stdout and "Cancelled" not in output
    log = (tmp_path / "logs/missing/download.log").read_text()
    assert "Traceback" in log and "download failed:" in log  # the whole story is in the log


@pytest.mark.e2e  # trains the demo model
def test_ctrl_c_cancels_cleanly_and_the_same_command_resumes(tmp_path):
    """SIGINT to snakemake's process group, as a terminal sends it, while the demo model trains."""
    config = write_config(tmp_path / "short.yaml", {"demo": {"train_steps": 20}})
    command = snakemake_argv(tmp_path, DEMO_MARKER, "--configfile", str(config))
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0)
    step_log = tmp_path / DEMO_LOG
    try:
        deadline = time.monotonic() + 180
        while not (step_log.exists() and "demo training step 1/" in step_log.read_text()):
            assert run.poll() is None and time.monotonic() < deadline, "the demo step never started training"
            time.sleep(0.2)
        assert any((tmp_path / "results/demo-hub").glob("tmp*")), "the step's temporary folder should exist while it trains"
        os.killpg(run.pid, signal.SIGINT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = stdout + stderr
    assert run.returncode != 0
    assert terminal.CANCELLED in stdout, output
    for noise in ("Traceback", "KeyboardInterrupt", "RuleException", "CalledProcessError", "Error in rule", "A step failed"):
        assert noise not in output, output
    # After the job's header only Snakemake's own few lines: "Terminating processes on user
    # request" (printed or not, depending on where its main loop takes the signal), its log, the
    # time; and, on a slow machine, the step's progress line a minute.
    after = [line for line in lines_after(stderr, "Reason: Missing output files") if " so far" not in line]
    assert len(after) <= 4, output
    assert "demo_checkpoint: interrupted by SIGINT" in step_log.read_text()
    leftovers = [p for p in (tmp_path / "results").rglob("*")] if (tmp_path / "results").exists() else []
    assert not leftovers, leftovers  # no temporary folder, no partial marker or cache entry

    resumed = snakemake(tmp_path, DEMO_MARKER, "--configfile", str(config))
    assert (tmp_path / DEMO_MARKER).exists()
    assert "Cancelled" not in resumed.stdout + resumed.stderr
    assert "demo_checkpoint: finished in" in step_log.read_text()


STEP = """
import os, signal, sys
sys.path.insert(0, {src!r})
from gemma_edge.device.files import atomic_output
from gemma_edge.workflow.steplog import rule_log

with rule_log({log!r}, "export"):
    with atomic_output({out!r}) as tmp:
        tmp.write_text("half a program")
        os.kill(os.getpid(), signal.{signal})
        raise AssertionError("the signal should have stopped the step")
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_step_logs_interrupted_removes_its_temporaries_and_exits_quietly(tmp_path, stop):
    log, out = tmp_path / "logs/export.log", tmp_path / "results/program.pt2"
    script = STEP.format(src=str(REPO / "src"), log=str(log), out=str(out), signal=stop.name)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + stop
    assert result.stdout == result.stderr == ""  # no traceback, no sentence: the run's end says it was cancelled
    assert f"export: interrupted by {stop.name}" in log.read_text()
    assert list((tmp_path / "results").iterdir()) == []  # neither the temporary nor a partial output


def _record(event, message="", **fields) -> logging.LogRecord:
    record = logging.LogRecord("snakemake.logging", logging.ERROR, __file__, 1, message, None, None)
    record.event = event
    record.__dict__.update(fields)
    return record


class _Inner(logging.Formatter):
    def format(self, record):
        return f"snakemake: {record.getMessage()}"


def _rule_exception(ending: str) -> logging.LogRecord:
    return _record(
        LogEvent.ERROR,
        'RuleException:\nCalledProcessError in file "/w/rules/export.smk", line 30:\n'
        f"Command 'set -euo pipefail;  python3 /w/.snakemake/scripts/tmpab12.export.py' {ending}.",
        exception="RuleException",
    )


def test_a_step_that_could_not_say_why_still_gets_one_sentence(monkeypatch):
    """Killed by the kernel (no sentence from the step itself): one line naming the signal and the log."""
    monkeypatch.setattr(terminal, "_state", {"cancelled": False, "failed": False})
    formatter = terminal.OneSentencePerFailure(_Inner())
    assert formatter.format(_rule_exception("died with <Signals.SIGKILL: 9>")) == ""
    job_error = _record(LogEvent.JOB_ERROR, rule_name="export", log=["logs/demo/fp32/export.log"])
    assert formatter.format(job_error) == (
        "export failed: its process was killed by SIGKILL (often the kernel's out-of-memory killer); nothing partial "
        "was kept: re-run the same command to resume (full log: logs/demo/fp32/export.log)"
    )
    assert formatter.format(_rule_exception("died with <Signals.SIGSEGV: 11>")) == ""
    assert formatter.format(job_error) == "export failed: its process was killed by SIGSEGV (full log: logs/demo/fp32/export.log)"
    assert terminal.describe_exit(137) == terminal.describe_exit(-9)  # bash's status for a child killed by SIGKILL
    assert terminal.describe_exit(1) == "its process exited with status 1 without saying why"
    # A step that reported its failure adds nothing; an unrelated record is Snakemake's own.
    assert formatter.format(_rule_exception(f"returned non-zero exit status {EXIT_REPORTED}")) == ""
    assert formatter.format(job_error) == ""
    other = _record(LogEvent.ERROR, "MissingOutputException: files missing", exception="MissingOutputException")
    assert formatter.format(other) == "snakemake: MissingOutputException: files missing"
    assert formatter.format(job_error).startswith("snakemake:")


def test_a_cancel_after_a_failure_says_both(monkeypatch):
    """keep-going runs on after a failure; Ctrl-C then must not hide that a step failed."""
    monkeypatch.setattr(terminal, "_state", {"cancelled": False, "failed": False})
    formatter = terminal.OneSentencePerFailure(_Inner())
    assert terminal.run_failed_message() == terminal.FAILED
    formatter.format(_rule_exception("died with <Signals.SIGINT: 2>"))
    formatter.format(_record(LogEvent.JOB_ERROR, rule_name="export", log=["logs/demo/fp32/export.log"]))
    assert terminal.run_failed_message() == terminal.CANCELLED
    formatter.format(_rule_exception(f"returned non-zero exit status {EXIT_REPORTED}"))
    formatter.format(_record(LogEvent.JOB_ERROR, rule_name="verify", log=["logs/demo/verify.log"]))
    assert terminal.run_failed_message() == terminal.CANCELLED_AFTER_FAILURE


def test_a_step_log_leaves_out_the_named_third_party_noise_and_keeps_the_rest(tmp_path):
    """rule_log drops the messages steplog.QUIET_* name (in a subprocess: it redirects the
    process's stdout and stderr) and keeps every other warning and record."""
    log_path = tmp_path / "step.log"
    code = f"""
import logging, warnings
from gemma_edge.workflow.steplog import rule_log
with rule_log({str(log_path)!r}, "noise"):
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use TreeSpec", FutureWarning)
    warnings.warn("something else is deprecated", FutureWarning)
    logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: no CUDA")
    logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_other.so")
    logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton, on systems without Triton")
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO / "src", timeout=120)
    text = log_path.read_text()
    assert "something else is deprecated" in text and "_C_other.so" in text
    assert "LeafSpec" not in text and "_C_mxfp8" not in text and "triton" not in text


def test_the_done_line_names_what_was_asked_for():
    from types import SimpleNamespace as Job

    pte = Job(output=["results/m/int4-g128/xnnpack-auto/model.pte"], input=["results/m/int4-g128/program.pt2"])
    perf = Job(output=[], input=["results/perf/m/int4-g128/xnnpack-auto/perf.md"])  # a rule target: its inputs
    assert terminal.done_message([pte]).startswith("Done: results/m/int4-g128/xnnpack-auto/model.pte (logs in logs/")
    assert "Done: results/perf/m/int4-g128/xnnpack-auto/perf.md (" in terminal.done_message([perf])
    many = [Job(output=[f"results/{name}.json"], input=[]) for name in "abcde"]
    assert "results/a.json, results/b.json, results/c.json and 2 more" in terminal.done_message(many)


SLOW_SNAKEFILE = """
rule slow:
    output: "done.txt"
    log: "logs/slow.log"
    shell: "echo '2026-12-07 14:00:00,000 INFO gemma_edge: XNNPACK delegate 3 of 16' > {log}; sleep 5; touch {output}"
"""


def test_the_logger_plugin_prints_a_progress_line_for_a_long_step(tmp_path):
    """The workflow's logger plugin (snakemake_logger_plugin_gemma_edge), found by Snakemake's
    plugin registry and run by a real snakemake: each second a step runs, a line with its rule,
    its time so far and its log's latest message."""
    (tmp_path / "Snakefile").write_text(SLOW_SNAKEFILE)
    command = [str(Path(sys.executable).with_name("snakemake")), "-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path)]
    result = subprocess.run(
        [*command, "--cores", "1", "--logger", "gemma-edge", "--logger-gemma-edge-progress-every", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("slow: ")]
    assert progress, result.stderr
    assert progress[-1].endswith(" so far; XNNPACK delegate 3 of 16 (log: logs/slow.log)"), progress
    assert len(progress) >= 2, progress  # one a second while it runs
    after = lines_after(result.stderr, "Finished jobid")
    assert not [line for line in after if line.startswith("slow: ")], result.stderr  # none once it ended


def test_the_workflow_profiles_name_the_logger_plugin_and_it_wraps_snakemakes_terminal_handler():
    """What the plugin relies on beyond the plugin interface, pinned on the installed Snakemake:
    its terminal handler class and the keyword arguments it is built with."""
    import inspect

    import yaml
    from snakemake.logging import ColorizingTextHandler
    from snakemake_interface_logger_plugins.registry import LoggerPluginRegistry

    for profile in ("default", "slurm"):
        assert yaml.safe_load((REPO / f"profiles/{profile}/config.yaml").read_text())["logger"] == ["gemma-edge"]
    assert LoggerPluginRegistry().is_installed("gemma-edge")
    assert {"nocolor", "stream"} <= set(inspect.signature(ColorizingTextHandler).parameters)
    assert issubclass(ColorizingTextHandler, logging.StreamHandler)


def test_progress_lines_name_only_jobs_running_long_enough(tmp_path):
    from gemma_edge.workflow.progress import RunningJobs

    log = tmp_path / "lower.log"
    log.write_text(
        "2026-12-07 14:00:00,000 INFO gemma_edge: lower: started (pid 1)\n"
        "2026-12-07 14:00:09,000 INFO gemma_edge.build.delegate_progress: XNNPACK delegate 12 of 35 (9 s into lowering)\n"
        "a traceback line\n"
    )
    jobs = RunningJobs(every_s=60)
    jobs.started(1, "lower", [str(log)], now=0)
    jobs.started(2, "verify", [], now=100)
    assert jobs.lines(now=59) == []
    assert jobs.lines(now=150) == [f"lower: 2 min 30 s so far; XNNPACK delegate 12 of 35 (9 s into lowering) (log: {log})"]
    assert jobs.lines(now=250)[1] == "verify: 2 min 30 s so far"
    jobs.ended(1)
    assert jobs.lines(now=3700) == ["verify: 1 h 00 min so far"]
