"""Virtualenvs made from one environment file's package list alone, and Snakemake run so that a
rule's step sees only that environment, the way `snakemake --sdm conda` runs it.

No conda channel is reachable from the test machines, so an `envs/*.yaml` file becomes a
virtualenv with its pip list, installed by uv from the package sources pip is configured with on
this machine (the file's own index options left out, as pip's configuration decides them). Each
is built once per machine and kept under ~/.cache/gemma-edge/envs, keyed by its list and the
interpreter.

Under `--sdm conda` a rule's Python step runs with its environment's interpreter, and Snakemake's
script preamble appends Snakemake's own `sys.path`: the step sees its environment first, then the
packages of the environment Snakemake runs from. Here that second one is a virtualenv holding only
what the process running Snakemake needs (`DRIVER_PACKAGES`), so a step that imports anything its
environment file does not list (beyond Snakemake and its dependencies) fails here as for a user.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GEMMA_EDGE_CACHE", Path.home() / ".cache/gemma-edge")) / "envs"
# What the process running Snakemake imports itself: Snakemake, and tokenizers for the early
# prompt-length check as jobs are built (rules/common.smk). docs/running.md says the same.
DRIVER_PACKAGES = ("snakemake", "tokenizers")
# How an environment is made, in its cache key: a change here makes each one again.
MADE_BY = "uv venv --seed"


def env_packages(env_file: Path) -> list[str]:
    """The pip requirements an environment file lists (options such as --extra-index-url left out)."""
    spec = yaml.safe_load(Path(env_file).read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    return [entry for entry in pip if not entry.startswith("-")]


def llamacpp_wheels() -> list[Path]:
    """The per-machine folders bench/setup-llamacpp.sh keeps its llama-cpp-python wheel in (pip
    would otherwise build the pinned source distribution again, several minutes)."""
    return sorted(Path(CACHE.parent, "llama-cpp-python").glob(f"*-{platform.machine()}-*"))


def pip_sources() -> list[str]:
    """This machine's package sources as pip is configured with them (`pip config list`: a local
    wheel folder or index mirror, as CI machines have), as uv options: uv reads no pip
    configuration. Sources that are not there (pip ignores those with a warning) are left out."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    options = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = {"find-links": "--find-links", "extra-index-url": "--extra-index-url", "index-url": "--index-url"}.get(
            key.rsplit(".", 1)[-1]
        )
        for source in value.strip().strip("'\"").split() if option else ():
            local = source.removeprefix("file://")
            if ("://" in local or Path(local).exists()) and source not in options:
                options += [option, source]
    # pip takes each package's best match across all its sources; uv's default stops at the first
    # index that has the package at all.
    return [*options, "--index-strategy", "unsafe-best-match"]


def venv_with(name: str, packages: list[str]) -> Path:
    """A virtualenv holding `packages` and what they depend on, nothing else; built once.

    Made with uv (requirements.txt) rather than pip: its cache links a package's files into
    each environment, so the seven environments cost seconds each on a fresh machine where pip
    took about two minutes apiece unpacking torch again."""
    key = hashlib.sha256("\n".join([sys.version, MADE_BY, *sorted(packages)]).encode()).hexdigest()[:12]
    folder = CACHE / f"{name}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    uv = str(Path(sys.executable).with_name("uv"))
    with FileLock(str(folder) + ".lock"):
        if (folder / "bin/python").exists():
            return folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        # --seed: pip in it, as each environment file lists it (the wheelhouse step runs pip);
        # --relocatable: the rename below leaves its scripts' interpreter paths right.
        subprocess.run([uv, "venv", "-q", "--seed", "--relocatable", "--python", sys.executable, str(partial)], check=True)
        links = [arg for wheels in llamacpp_wheels() for arg in ("--find-links", str(wheels))]
        result = subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(partial / "bin/python"), *pip_sources(), *links, *packages],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if result.returncode != 0:
            raise AssertionError(f"uv could not make the {name} environment:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        partial.rename(folder)
    return folder


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def driver_venv(pins: dict[str, str]) -> Path:
    """The virtualenv Snakemake runs from: the DRIVER_PACKAGES at their requirements.txt pins."""
    return venv_with("snakemake", [f"{name}=={pins[name]}" for name in DRIVER_PACKAGES])


def snakemake_in_env(driver: Path, env: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake from `driver` run by the `env` virtualenv's interpreter, so that every step runs in
    `env` (Snakemake runs Python steps with its own interpreter) and finds Snakemake's packages only
    after the environment's own, as under --sdm conda. The project's src/ comes last, as its
    editable install puts it on the user's path: the profiles' logger plugin is found there."""
    bootstrap = (
        "import runpy, site, sys; site.addsitedir(sys.argv.pop(1)); sys.path.append(sys.argv.pop(1)); "
        "sys.argv[0] = 'snakemake'; runpy.run_module('snakemake', run_name='__main__')"
    )
    command = [
        str(env / "bin/python"),
        "-c",
        bootstrap,
        str(site_packages(driver)),
        str(REPO / "src"),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
