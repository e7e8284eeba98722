"""A full host disk: with `results/` on a small filesystem, export and lowering each stop with one
sentence naming the folder, its free space and what the program needs, and leave nothing partial
(no temporary file, no output). Needs root: it mounts a tmpfs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require, snakemake, write_config
from gemma_edge.device.files import DiskFull, atomic_output
from gemma_edge.workflow.manifest import MANIFEST_SUFFIX
from gemma_edge.workflow.steplog import EXIT_REPORTED

FP32 = "results/tiny/fp32"
# What export needs: the download's record (and the prompt check's, where the workflow has one).
BEFORE_EXPORT = ["results/tiny/checkpoint.json", "results/tiny/context_check.json"]
NOISE = ("Traceback", "RuleException", "CalledProcessError", "Error in rule", "WorkflowError", "terminate called")


@pytest.fixture
def small_filesystem(tmp_path):
    """`mount(size_bytes)`: a tmpfs of that size, unmounted after the test."""
    require(None if os.geteuid() == 0 else "mounting a small filesystem needs root")
    mounted = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"small-{len(mounted)}"
        point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        require(None if result.returncode == 0 else f"cannot mount a small tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False, timeout=60)


def free_mb(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 1e6


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir())


WRITE = """
import torch
from gemma_edge.device.files import atomic_output
from gemma_edge.build.export import write_program
from gemma_edge.workflow.steplog import rule_log

class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(1024, 1024))  # 4 MB

    def forward(self, x):
        return x @ self.weight

with rule_log({log!r}, "export"):
    program = torch.export.export(Linear(), (torch.randn(2, 1024),))
    with atomic_output({out!r}) as tmp:
        write_program(program, tmp)
"""


def test_a_disk_filling_while_torch_writes_a_program_is_one_sentence(tmp_path, small_filesystem):
    """torch.export.save's zip writer, handed the full disk's error, aborts the whole process
    when it is freed; write_program holds the error back, so the step says it in one sentence."""
    small = small_filesystem(1_000_000)
    log, out = tmp_path / "export.log", small / "program.pt2"
    script = WRITE.format(log=str(log), out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_REPORTED, result.stderr
    assert result.stdout == ""
    expected = (
        rf"export failed: {re.escape(str(small))} has 1\.0 MB free but program\.pt2 needs more than that "
        rf"\(the disk filled after 1\.0 MB of it\): free space there, then re-run the same command "
        rf"\(full log: {re.escape(str(log))}\)"
    )
    assert re.fullmatch(expected, result.stderr.strip()), result.stderr
    assert files_in(small) == []


def on_small_results(workflow, tmp_path, mount, size_bytes: int, keep: list[str]) -> tuple[Path, Path]:
    """A copy of the workflow folder whose `results` is a symlink to a new tmpfs of `size_bytes`
    holding only the files `keep` (with their manifests, timestamps kept); (workdir, mount point)."""
    source = workflow["workdir"]
    workdir = tmp_path / "work"
    shutil.copytree(source, workdir, symlinks=True, ignore=shutil.ignore_patterns("results"))
    small = mount(size_bytes)
    (workdir / "results").symlink_to(small)
    for name in keep:
        for path in (name, name + MANIFEST_SUFFIX):
            if (source / path).exists():
                (workdir / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / path, workdir / path)
    return workdir, small


def kept_files(workflow, kept: list[str]) -> list[str]:
    """The files `on_small_results` put on the small filesystem, relative to it."""
    source = workflow["workdir"]
    names = [name + suffix for name in kept for suffix in ("", MANIFEST_SUFFIX) if (source / (name + suffix)).exists()]
    return sorted(name.removeprefix("results/") for name in names)


def assert_one_full_disk_sentence(output: str, step: str, folder: str, name: str, log: str, small: Path) -> float:
    """The run's one sentence for the full disk; the MB it says the file needs (None: more than free)."""
    lines = [line for line in output.splitlines() if "(full log: " in line]
    assert len(lines) == 1, output
    match = re.fullmatch(
        rf"{step} failed: {re.escape(folder)} has (\d+\.\d) MB free but {re.escape(name)} needs "
        rf"(at least (\d+\.\d) MB|more than that)( \(the disk filled after \d+\.\d MB of it\))?: free space there, "
        rf"then re-run the same command \(full log: {re.escape(log)}\)",
        lines[0],
    )
    assert match, lines[0]
    assert abs(float(match.group(1)) - free_mb(small)) <= 0.1, (lines[0], free_mb(small))
    for noise in NOISE:
        assert noise not in output, output
    print(lines[0])
    return float(match.group(3)) if match.group(3) else None


def test_a_full_disk_during_export_is_one_sentence_and_leaves_nothing(workflow, tmp_path, small_filesystem):
    """Room for the checkpoint's records and 90 % of the FP32 program."""
    program = workflow["workdir"] / f"{FP32}/program.pt2"
    size = program.stat().st_size
    workdir, small = on_small_results(workflow, tmp_path, small_filesystem, int(size * 0.9), BEFORE_EXPORT)
    result = snakemake(workdir, f"{FP32}/program.pt2", "--configfile", str(workflow["config"]), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    needs = assert_one_full_disk_sentence(output, "export", FP32, "program.pt2", "logs/tiny/fp32/export.log", small)
    assert needs is None or needs <= size / 1e6  # the least it takes: never more than it took
    assert files_in(small) == kept_files(workflow, BEFORE_EXPORT)


def test_a_full_disk_during_lowering_is_one_sentence_and_leaves_nothing(workflow, tmp_path, small_filesystem):
    """Room for the FP32 program and half of the .pte lowered from it (with the default
    `decode_method`, one method: half the fixture's lowering time)."""
    source = workflow["workdir"]
    kept = [*BEFORE_EXPORT, f"{FP32}/program.pt2"]
    taken = sum((source / name).stat().st_size for name in kept if (source / name).exists()) + 64_000  # and the manifests
    pte = source / FP32 / "xnnpack-auto/model.pte"
    workdir, small = on_small_results(workflow, tmp_path, small_filesystem, taken + pte.stat().st_size // 2, kept)
    default = write_config(tmp_path / "decode-default.yaml", {"lowering": {"decode_method": "auto"}})
    result = snakemake(
        workdir, f"{FP32}/xnnpack-auto/model.pte", "--configfile", str(workflow["config"]), str(default), check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    needs = assert_one_full_disk_sentence(
        output, "lower", f"{FP32}/xnnpack-auto", "model.pte", "logs/tiny/fp32/xnnpack-auto/lower.log", small
    )
    # The serialized program's own size: one method, so no more than the fixture's two-method .pte.
    assert needs is not None and needs <= pte.stat().st_size / 1e6 + 0.05
    assert files_in(small) == kept_files(workflow, kept)
    log = (workdir / "logs/tiny/fp32/xnnpack-auto/lower.log").read_text()
    assert "falling back" not in log  # a full disk is no rejection of the fused program


def test_a_file_that_cannot_fit_is_refused_before_a_byte_is_written(tmp_path):
    """atomic_output's check against the least the file takes, when the step knows it."""
    out = tmp_path / "model.pte"
    with pytest.raises(DiskFull) as refused, atomic_output(out, min_bytes=10**18) as tmp:
        tmp.write_bytes(b"never")
    assert re.fullmatch(
        rf"{re.escape(str(tmp_path))} has \d+\.\d MB free but model\.pte needs at least 1000000000000\.0 MB: "
        "free space there, then re-run the same command",
        str(refused.value),
    )
    assert list(tmp_path.iterdir()) == []
