"""Shared fixtures: a demo checkpoint seeded into a private Hugging Face cache, and one real
workflow run on it whose artifacts the tests share (lowering takes a minute or two).

The suite runs on two pytest-xdist workers (pytest.ini). The demo checkpoint, its hub cache and
the workflow run are built once per session whichever worker needs them first (`built_once`);
every worker then works on its own copy of the workflow's folder, so no test sees another
worker's changes. Modules that share a later fixture run on one worker (`SAME_WORKER`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gemma_edge.model import hub  # noqa: E402
from gemma_edge.model.demo_model import build_demo_checkpoint  # noqa: E402
from gemma_edge.reach import loopback_sshd  # noqa: E402
from gemma_edge.reach.qemu import QEMU  # noqa: E402
from gemma_edge.workflow.config import requirement_pins  # noqa: E402
from sshd import SshServer  # noqa: E402

TEST_REPO_ID = "tests/gemma4-tiny"
CONVERTER = REPO / ".bench/llama.cpp/convert_hf_to_gguf.py"
# Skipped only outside CI: .ci/run installs llama.cpp, so there a missing converter fails the tests.
needs_llamacpp = pytest.mark.skipif(
    not CONVERTER.exists() and not os.environ.get("CI"),
    reason="llama.cpp's converter is not unpacked: run bench/setup-llamacpp.sh (.ci/run does)",
)
LITERT_PYTHON = REPO / ".venv-litert/bin/python"
# Skipped only outside CI, as llama.cpp: .ci/run makes LiteRT-LM's virtualenv.
needs_litert = pytest.mark.skipif(
    not LITERT_PYTHON.exists() and not os.environ.get("CI"),
    reason="LiteRT-LM's virtualenv .venv-litert is missing: run bench/setup-litert.sh (.ci/run does)",
)
DEFAULT_CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
PINS = requirement_pins(REPO / "requirements.txt")  # what the tests expect installed, from the pins


def require(unavailable: str | None) -> None:
    """What a test needs from the machine (Debian packages, root), given as the reason it is
    missing, or None: outside CI the test is skipped with that reason; under CI, whose .ci/run
    installs all of it, the test fails."""
    if unavailable is None:
        return
    message = f"{unavailable}; .ci/run installs what the whole suite needs"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# Test modules that must share one pytest-xdist worker: they build on one session fixture (the
# deployed targets; the emulated Pi, set up and served once per machine). Every other module is
# its own unit of work.
SAME_WORKER = {
    "test_deploy.py": "deployed",
    "test_sweep.py": "deployed",
    "test_slurm.py": "deployed",
    "test_device_storage.py": "deployed",
    "test_emulated.py": "emulator",
    "test_emulator.py": "emulator",
}


# The modules that start first (pytest.ini turns off xdist's largest-unit-first order): the
# longest chain (deploy, sweep, SLURM; it builds the workflow run) on one worker and the
# performance benchmark, which needs none of it, on the other; then the emulated Pi, then the
# second build from nothing and the README's own default run.
START_FIRST = ["test_deploy.py", "test_perf.py", "test_emulated.py", "test_reproducible.py", "test_readme.py"]


# What a test needs beyond the virtualenv, by the fixture that needs it (pytest.ini names the
# markers): `pytest -m "not needs_sshd"` runs the suite without root and Debian's openssh-server.
NEEDS = {"sshd": "needs_sshd", "cluster": "needs_slurm", "pi5_emulator": "needs_emulator", "built_root": "needs_emulator"}

# The fixtures that make a test end-to-end (marker `e2e`), and why: the fast lane,
# `pytest -m "not e2e"`, runs every other test. A fixture's users include every test that uses a
# fixture built on it (`workflow` on `demo_checkpoint`, ...), and a test with a NEEDS marker is
# end-to-end too. A test that does such work inline carries `@pytest.mark.e2e` itself.
E2E_FIXTURES = {
    "demo_checkpoint": "trains the demo model",
    "perf_run": "builds a model and runs `snakemake perf` with the peers",
    "small_filesystem": "mounts a filesystem (root)",
}


def qemu_unavailable() -> str | None:
    """Why the emulated Pi 5 cannot run here, or None."""
    if not shutil.which(QEMU):
        return f"{QEMU} is not installed (Debian: qemu-user-static)"
    return None if shutil.which("mmdebstrap") else "mmdebstrap is not installed (Debian: mmdebstrap), which builds its sysroot"


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = Path(item.nodeid.split("::", 1)[0]).name
        return START_FIRST.index(name) if name in START_FIRST else len(START_FIRST)

    items.sort(key=rank)
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, marker in NEEDS.items():
            if fixture in fixtures:
                item.add_marker(marker)
        needs = any(item.get_closest_marker(marker) for marker in set(NEEDS.values()))
        if needs or fixtures & E2E_FIXTURES.keys():
            item.add_marker("e2e")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: known only while it is loaded
def pytest_xdist_make_scheduler(config, log):
    """Schedule whole modules, with the SAME_WORKER modules as one unit each. (xdist's own
    `--dist loadgroup` relies on rewriting node ids, which pytest 9.2 no longer honours:
    pytest-xdist issue 1386.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SAME_WORKER.get(Path(module).name, module)

    return ModuleGroups(config, log)


def snakemake_argv(workdir: Path, *args: str) -> list[str]:
    """The documented snakemake command for this checkout's Snakefile, run in `workdir`."""
    return [str(Path(sys.executable).with_name("snakemake")), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the workflow's Snakefile the documented way, in `workdir`."""
    command = snakemake_argv(workdir, *args)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def write_config(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return path


def built_once(tmp_path_factory, name: str, build) -> tuple[Path, object]:
    """The folder `name` filled by `build(folder)`, and what `build` returned (JSON), once per
    test session: under pytest-xdist the first worker to ask builds it while holding a lock, and
    the others wait for it and reuse it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        return folder, build(folder)
    root = tmp_path_factory.getbasetemp().parent  # one per session, shared by its workers
    folder, done = root / name, root / f"{name}.done.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
    return folder, json.loads(done.read_text())


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    folder, _ = built_once(
        tmp_path_factory,
        "demo-checkpoint",
        lambda folder: build_demo_checkpoint(
            REPO / "resources/demo_corpus.txt", folder, DEFAULT_CONFIG["demo"]["train_steps"], DEFAULT_CONFIG["demo"]["seed"]
        ),
    )
    return folder


@pytest.fixture(scope="session")
def seeded_hub(tmp_path_factory, demo_checkpoint) -> tuple[Path, str]:
    """A Hugging Face cache holding the demo checkpoint as tests/gemma4-tiny; returns (cache, commit)."""
    return built_once(tmp_path_factory, "hf-cache", lambda folder: hub.seed_hub_cache(demo_checkpoint, folder, TEST_REPO_ID))


QUALITY_TOKENS = 8 * 127  # eight chunks of the 128-token context (BOS + 127 text tokens)
WORKFLOW_TARGETS = ["results/tiny/int4-g128/xnnpack-auto/parity.json", "results/tiny/fp32/xnnpack-auto/parity.json"]


@pytest.fixture(scope="session")
def workflow(tmp_path_factory, seeded_hub):
    """Run the workflow once, offline, on the seeded cache: the INT4 target and the FP32 .pte.
    Under pytest-xdist each worker gets its own copy of the finished folder (timestamps and
    Snakemake's records kept, so nothing reruns in it)."""
    cache, commit = seeded_hub

    def build(workdir: Path) -> None:
        config = write_config(
            workdir / "test-config.yaml",
            {
                "model": "tiny",
                "models": {"tiny": {"repo_id": TEST_REPO_ID, "revision": "main", "hub_cache": str(cache), "offline": True}},
                # The demo checkpoint under another name: the quality step gets the demo's held-out text, 8 chunks.
                "quality": {"text": "resources/quality/demo_heldout.txt", "max_tokens": QUALITY_TOKENS},
                # At 128 tokens `auto` leaves the one-token method out; forced here, so that verify, the
                # device benchmarks and the emulated Pi decode with it (the perf tests keep `auto`).
                "lowering": {"decode_method": True},
            },
        )
        snakemake(workdir, "--cores", "2", *WORKFLOW_TARGETS, "--configfile", str(config), env={"HF_HUB_OFFLINE": "1"})

    built, _ = built_once(tmp_path_factory, "workflow", build)
    workdir = built
    if "PYTEST_XDIST_WORKER" in os.environ:
        workdir = tmp_path_factory.mktemp("workflow")
        shutil.copytree(built, workdir, symlinks=True, dirs_exist_ok=True)
    return {"workdir": workdir, "config": workdir / "test-config.yaml", "commit": commit, "cache": cache}


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on loopback standing in for the Pi, stopped after the session."""
    require(loopback_sshd.unavailable())
    server = SshServer.create(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def deployed(workflow, sshd, tmp_path_factory):
    """The workflow run on, deployed and benchmarked through, the loopback sshd and the local target."""
    remote = tmp_path_factory.mktemp("remote-home")
    config = write_config(
        workflow["workdir"] / "targets.yaml",
        {
            "targets": {"loopback": sshd.target(remote / "gemma-edge"), "local": {"kind": "local", "threads": 2}},
            "bench": {"prompt_lengths": [8, 32], "new_tokens": 8, "repetitions": 2, "warmup": 1},
        },
    )
    configs = [str(workflow["config"]), str(config)]
    snakemake(
        workflow["workdir"], "--cores", "2", "results/loopback/bench.json", "results/local/bench.json", "--configfile", *configs
    )
    return {"workdir": workflow["workdir"], "remote": remote / "gemma-edge", "configs": configs, "targets_config": config}


def compact(table: str) -> str:
    """A Markdown table with the padding around its cells removed, so a test can look for a row."""
    return re.sub(r" *\| *", " | ", table)
