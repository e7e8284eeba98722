"""A step killed at any moment with SIGKILL (the out-of-memory killer, `kill -9`, a power cut),
then the same command again: the run completes, nothing partial is ever recorded as good, no
temporary file outlives the re-run, and the killed run's terminal says one sentence.

Each host step (export, quantize, lower, verify) and the `local` target's device benchmark is
killed at two moments: a seeded random fraction of its measured duration (the `workflow`
fixture's benchmark file; the bench step's own first run), then a second one, the moment its
output's temporary file appears (a kill mid-write: export, quantize) or a progress line of its log
(lower). The step's own Python process is killed (Snakemake's `script:` runs
`python .snakemake/scripts/tmpXXXX.<script>.py`), not Snakemake, which reports it; one case kills
Snakemake's whole process group instead, as a closed laptop would. GEMMA_EDGE_KILL_SEED picks
other moments."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import snakemake_argv, write_config
from gemma_edge.device.files import atomic_output
from gemma_edge.workflow import stale_lock, terminal
from gemma_edge.workflow.manifest import MANIFEST_SUFFIX, verify_against_manifest

SEED = int(os.environ.get("GEMMA_EDGE_KILL_SEED", "38"))
RUN_TIMEOUT_S = 600
NOISE = ("Traceback", "RuleException", "CalledProcessError", "Error in rule", "WorkflowError", "cannot be locked")

INT4 = "tiny/int4-g128"
VARIANT = f"{INT4}/xnnpack-auto"
LOCAL = f"results/local/{VARIANT}"
# Per step: the outputs removed so that it runs again (the first is asked for), its benchmark file
# and log (under benchmarks/ and logs/), its second moment ("random", "temporary": its temporary
# file appears, "line": its log says `line`), and the progress line near its end at which a random
# moment that has not come yet is taken all the same (the fixture's durations were measured on a
# machine as busy as it happened to be).
STEPS = {
    "export": {
        "outputs": ["results/tiny/fp32/program.pt2"],
        "name": "tiny/fp32/export",
        "second": "temporary",
        "until": "memory after torch.export.save",
    },
    "quantize": {
        "outputs": [f"results/{INT4}/program.pt2"],
        "name": f"{INT4}/quantize",
        "second": "temporary",
        "until": "memory after torch.export.save",
    },
    # The FP32 program, with the default decode_method (one method): the fixture's lowerings take
    # twice as long, and the INT4 one longer still. The second kill: as it starts lowering.
    "lower": {
        "outputs": ["results/tiny/fp32/xnnpack-auto/model.pte"],
        "name": "tiny/fp32/xnnpack-auto/lower",
        "second": "line",
        "line": "lowering to XNNPACK (fused subgraphs)",
        "until": "memory after lowering (",
        "config": {"lowering": {"decode_method": "auto"}},
    },
    "verify": {
        "outputs": [f"results/{VARIANT}/parity.json", f"results/{VARIANT}/parity.log"],
        "name": f"{VARIANT}/verify",
        "second": "random",
        "until": "prompt 1/",
    },
}
# The local target's benchmark, kept short; no peers (CI sets them up, and they would be built here).
LOCAL_TARGET = {
    "targets": {"local": {"kind": "local", "threads": 2}},
    "bench": {
        "prompt_lengths": [8],
        "new_tokens": 4,
        "repetitions": 1,
        "warmup": 0,
        "peers": {"llamacpp": [], "litert": []},
    },
}
PARITY_KEYS = {"summary", "prompts", "pte", "versions"}
BENCH_KEYS = {"schema", "target", "runs", "parity", "pte", "wall_clock"}
DEVICE_PARITY_KEYS = {"target", "pte_sha256", "prompts"}


def copy_of(workflow, tmp_path) -> Path:
    """A copy of the finished workflow folder (timestamps and Snakemake's records kept)."""
    workdir = tmp_path / "work"
    shutil.copytree(workflow["workdir"], workdir, symlinks=True)
    return workdir


def measured_seconds(workdir: Path, benchmark: str) -> float:
    """Wall time of a step in the fixture's run, from its Snakemake benchmark file."""
    header, values = (workdir / "benchmarks" / f"{benchmark}.tsv").read_text().splitlines()[:2]
    return float(dict(zip(header.split("\t"), values.split("\t")))["s"])


class Run:
    """`snakemake ARGS` in `workdir` in the background, in its own process group, as a terminal
    would start it; its output goes to files (a pipe could fill while the test waits)."""

    def __init__(self, workdir: Path, *args: str):
        self.out, self.err = workdir.with_name("run.out"), workdir.with_name("run.err")
        command = snakemake_argv(workdir, *args)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"}, process_group=0
            )

    def wait(self) -> tuple[int, str, str]:
        try:
            self.process.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=60)
        return self.process.returncode, self.out.read_text(), self.err.read_text()

    def descendants(self) -> list[psutil.Process]:
        return descendants_of(psutil.Process(self.process.pid))

    def step_process(self, script: str) -> psutil.Process | None:
        """The step's own Python process once it runs, or None if the run ends first."""
        own = re.compile(rf".*/\.snakemake/scripts/tmp[^/ ]*\.{script}\.py")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while self.process.poll() is None and time.monotonic() < deadline:
            for child in self.descendants():
                with_args = _cmdline(child)
                if with_args and Path(with_args[0]).name.startswith("python") and any(map(own.fullmatch, with_args)):
                    return child
            time.sleep(0.05)
        return None


def descendants_of(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def wait_for_moment(process: psutil.Process, moment: str, seconds: float, temporaries: list[Path], log: Progress) -> str:
    """Wait for the moment to kill `process`: `seconds` after it started (or `log.until`, if that
    comes first), ("line") until `log.until`, or ("temporary") until one of its temporary files
    (files.temp_path_for's names, with its pid) exists. Returns what the moment was."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        started = process.create_time()
    except psutil.NoSuchProcess:
        return "never: it had ended"
    while running(process) and time.monotonic() < deadline:
        if moment == "temporary":
            names = [f".{path.stem}.tmp-{process.pid}{path.suffix}" for path in temporaries]
            if any((path.parent / name).exists() for path, name in zip(temporaries, names)):
                return "while its temporary file existed"
        elif moment == "random" and time.time() >= started + seconds:
            return f"{seconds:.1f} s after it started"
        elif log.reached(process.pid):
            return f"at its log line {log.until!r} ({time.time() - started:.1f} s after it started)"
        time.sleep(0.01)
    return "never: it had ended"


class Progress:
    """Whether a step's log says `until` in the run of the process `pid` (after its "started" line)."""

    def __init__(self, path: Path, until: str | None):
        self.path, self.until = path, until

    def reached(self, pid: int) -> bool:
        if not self.until or not self.path.exists():
            return False
        text = self.path.read_text(encoding="utf-8", errors="replace")
        started = text.rfind(f": started (pid {pid})")
        return started >= 0 and self.until in text[started:]


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill(process: psutil.Process) -> bool:
    """SIGKILL `process`; whether it was still running."""
    if not running(process):
        return False
    try:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    except psutil.NoSuchProcess:
        pass
    return True


def moments(step: str, duration: float, second: str) -> list[tuple[str, float]]:
    """Two moments for `step`, seeded: a random fraction of its measured duration, then another one
    or the `second` kind of moment."""
    rng = random.Random(f"{SEED}-{step}")
    first = ("random", rng.uniform(0.05, 0.6) * duration)
    return [first, (second, rng.uniform(0.05, 0.6) * duration if second == "random" else 0.0)]


def sentences(output: str) -> list[str]:
    """The terminal's failure sentences: each names its log."""
    return [line for line in output.splitlines() if "(full log: " in line or re.match(r"^\w+ failed: ", line)]


def assert_one_sentence(output: str, expected: str) -> None:
    assert sentences(output) == [expected], output
    for noise in NOISE:
        assert noise not in output, output
    assert terminal.FAILED in output, output


def assert_nothing_partial(workdir: Path) -> None:
    """Every program present verifies against its manifest, every manifest has its file, and
    every parity.json and bench.json parses and carries its keys."""
    results = workdir / "results"
    for path in results.rglob("*"):
        if path.name.startswith("."):
            continue
        if path.suffix in (".pt2", ".pte"):
            verify_against_manifest(path)
        elif path.name.endswith(MANIFEST_SUFFIX):
            assert path.with_name(path.name.removesuffix(MANIFEST_SUFFIX)).exists(), path
        elif path.name == "parity.json":
            # results/<model>/… is the host's parity; results/<target>/… a device's (the shared
            # workflow folder also holds the loopback and sweep targets' when those tests ran first)
            keys = PARITY_KEYS if path.is_relative_to(results / "tiny") else DEVICE_PARITY_KEYS
            assert keys <= json.loads(path.read_text()).keys(), path
        elif path.name == "bench.json":
            assert json.loads(path.read_text()).keys() >= BENCH_KEYS, path


def temporaries_in(workdir: Path) -> list[Path]:
    return sorted((workdir / "results").rglob(".*.tmp-*"))


def rerun_completes(workdir: Path, args: list[str], rule: str, step: str, step_log: Path, killed: bool = True) -> str:
    """The same command again: it runs `rule` (its step `step`) again if the last run's was
    `killed`, and completes, leaving nothing partial and no temporary file. Returns its output."""
    status, out, err = Run(workdir, *args).wait()
    assert status == 0, out + err
    assert (f"(Rule: {rule})" in out + err) == killed, out + err  # a killed step was not recorded as done
    for noise in NOISE:
        assert noise not in out + err, out + err
    assert_nothing_partial(workdir)
    assert temporaries_in(workdir) == []
    log = step_log.read_text()
    assert log.rfind(f"{step}: finished in") > log.rfind(f"{step}: started"), log
    return out + err


@pytest.mark.parametrize("step", list(STEPS))
def test_a_host_step_killed_at_any_moment_resumes_with_the_same_command(workflow, tmp_path, step):
    plan = STEPS[step]
    workdir = copy_of(workflow, tmp_path)
    configs = [str(workflow["config"])]
    if "config" in plan:
        configs.append(str(write_config(tmp_path / "step.yaml", plan["config"])))
    args = [plan["outputs"][0], "--configfile", *configs]
    step_log = workdir / "logs" / f"{plan['name']}.log"
    tried = []
    for moment, seconds in moments(step, measured_seconds(workdir, plan["name"]), plan["second"]):
        for output in plan["outputs"]:  # removed with its manifest, so that the step runs again
            (workdir / output).unlink(missing_ok=True)
            (workdir / (output + MANIFEST_SUFFIX)).unlink(missing_ok=True)
        progress = Progress(step_log, plan["line"] if moment == "line" else plan["until"])
        run = Run(workdir, *args)
        process = run.step_process(step)
        assert process is not None, "the step never started"
        when = wait_for_moment(process, moment, seconds, [workdir / output for output in plan["outputs"]], progress)
        killed = kill(process)
        status, out, err = run.wait()
        tried.append(f"{step} (seed {SEED}): killed {when}" if killed else f"{step}: finished before {when}")
        if killed:
            assert status != 0
            assert_one_sentence(
                out + err,
                f"{step} failed: its process was killed by SIGKILL (often the kernel's out-of-memory killer); nothing "
                f"partial was kept: re-run the same command to resume (full log: logs/{plan['name']}.log)",
            )
        if moment == "temporary" and killed:
            assert temporaries_in(workdir), "the kill should have left the temporary file it interrupted"
        assert_nothing_partial(workdir)
    assert any(entry.startswith(f"{step} (seed") for entry in tried), tried
    rerun_completes(workdir, args, step, step, step_log, killed)
    if plan["second"] == "temporary" and killed:  # the re-run removed the temporary the kill left
        assert "left by a process killed before it could clean up" in step_log.read_text()
    print("; ".join(tried))


def test_a_killed_snakemake_and_its_steps_resume_with_the_same_command(workflow, tmp_path):
    """The whole process group (Snakemake and the export it runs) killed while the export writes
    its program: no sentence can be printed, Snakemake's lock and incomplete marks stay behind,
    and the same command takes the lock over and runs the export again."""
    workdir = copy_of(workflow, tmp_path)
    program = workdir / "results/tiny/fp32/program.pt2"
    program.unlink()
    args = ["results/tiny/fp32/program.pt2", "--configfile", str(workflow["config"])]
    run = Run(workdir, *args)
    process = run.step_process("export")
    assert process is not None, "the export never started"
    assert wait_for_moment(process, "temporary", 0, [program], Progress(program, None)) == "while its temporary file existed"
    os.killpg(run.process.pid, signal.SIGKILL)
    status, _, _ = run.wait()
    assert status == -signal.SIGKILL
    process.wait(timeout=60)  # the step was in the group too
    assert list((workdir / ".snakemake/locks").glob("*.lock")), "the killed run's lock should be left behind"
    assert temporaries_in(workdir)
    assert_nothing_partial(workdir)
    output = rerun_completes(workdir, args, "export", "export", workdir / "logs/tiny/fp32/export.log")
    assert "Removed the lock a killed snakemake run left on this folder" in output


def test_the_device_benchmark_killed_at_any_moment_resumes_with_the_same_command(workflow, tmp_path):
    """The local target's bench step killed, then the benchmark process it runs (the device side,
    `python -m gemma_edge.device.device_bench`), each at a seeded moment of its measured duration."""
    workdir = copy_of(workflow, tmp_path)
    targets = write_config(workdir / "local-target.yaml", LOCAL_TARGET)
    args = [f"{LOCAL}/bench.json", "--configfile", str(workflow["config"]), str(targets)]
    status, out, err = Run(workdir, *args).wait()  # provisions, deploys and benchmarks once: its duration
    assert status == 0, out + err
    name = f"targets/local/{VARIANT}/bench"
    duration = measured_seconds(workdir, name)
    bench_log = f"logs/{name}.log"
    tried = []
    for victim, (_, seconds) in zip(("step", "device"), moments("bench", duration, "random")):
        for output in ("bench.json", "parity.json", "parity.log"):
            (workdir / LOCAL / output).unlink(missing_ok=True)
        run = Run(workdir, *args)
        process = run.step_process("bench")
        assert process is not None, "the bench step never started"
        if victim == "device":
            process = device_bench_of(process)
        when = wait_for_moment(process, "random", seconds, [], Progress(workdir / bench_log, None))
        orphans = descendants_of(process) if victim == "step" else []
        killed = kill(process)
        status, out, err = run.wait()
        for orphan in orphans:  # the device side outlives a killed bench step: not the subject here
            kill(orphan)
        tried.append(f"bench {victim} (seed {SEED}): killed {when}" if killed else f"bench {victim}: finished before {when}")
        if killed and victim == "step":
            assert_one_sentence(
                out + err,
                "bench_local failed: its process was killed by SIGKILL (often the kernel's out-of-memory killer); "
                f"nothing partial was kept: re-run the same command to resume (full log: {bench_log})",
            )
        elif killed:  # the step saw the device's process die and said so, naming the signal
            said = "bench failed: the benchmark on local was killed by SIGKILL (often the out-of-memory killer)"
            failure = (out + err).partition(said)[2]
            assert f"(full log: {bench_log})" in failure, out + err
            for noise in NOISE:
                assert noise not in out + err, out + err
            assert terminal.FAILED in out + err
        assert_nothing_partial(workdir)
    rerun_completes(workdir, args, "bench_local", "bench", workdir / bench_log, killed)
    print("; ".join(tried))


def device_bench_of(step: psutil.Process) -> psutil.Process:
    """The benchmark process a local bench step runs, once it runs."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        for child in step.children(recursive=True):
            if "gemma_edge.device.device_bench" in _cmdline(child):
                return child
        assert step.is_running(), "the bench step ended before its benchmark process started"
        time.sleep(0.02)
    raise AssertionError("the benchmark process never started")


def test_a_step_removes_the_temporaries_a_killed_run_left_of_its_own_outputs_only(tmp_path):
    """atomic_output removes `path`'s temporaries whose process is gone, and no other file: not a
    live process's temporary of the same file, not another output's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "stale": f".program.tmp-{dead.pid}.pt2",
            "live": f".program.tmp-{alive.pid}.pt2",
            "other output": f".quantized.tmp-{dead.pid}.pt2",
            "its manifest's": f".program.pt2.manifest.tmp-{dead.pid}.json",
        }
        for name in names.values():
            (tmp_path / name).write_text("half a program")
        with atomic_output(tmp_path / "program.pt2") as tmp:
            tmp.write_text("a whole program")
    finally:
        alive.kill()
        alive.wait(timeout=60)
    left = {path.name for path in tmp_path.iterdir()}
    assert left == {"program.pt2"} | {name for what, name in names.items() if what != "stale"}


def test_a_lock_is_taken_over_only_when_no_snakemake_works_in_the_folder(tmp_path):
    locks = tmp_path / ".snakemake/locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text("results/tiny/fp32/program.pt2\n")
    fake = tmp_path / "bin/snakemake"  # a process whose command line is snakemake's, working in the folder
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(60)\n")
    running = subprocess.Popen([sys.executable, str(fake)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not stale_lock.snakemake_processes_in(tmp_path):
            assert time.monotonic() < deadline, "the stand-in snakemake process was not seen"
            time.sleep(0.05)
        assert stale_lock.take_over(tmp_path) == []
        assert (locks / "0.output.lock").exists()
    finally:
        running.kill()
        running.wait(timeout=60)
    assert stale_lock.take_over(tmp_path) == [locks / "0.output.lock"]
    assert list(locks.iterdir()) == []
    assert stale_lock.is_snakemake(["/usr/bin/python3", "-m", "snakemake", "--cores", "2"])
    assert not stale_lock.is_snakemake(["/usr/bin/python3", "/w/.snakemake/scripts/tmpab12.export.py"])
