"""The device's wheels: resolved by uv for the device's platform, downloaded by pip on the host.

uv resolves for another platform (`uv pip compile --python-platform aarch64-manylinux_2_36
--python-version 3.11`), evaluating environment markers as the device would: executorch's
coremltools (Linux x86_64 only) stays out, aarch64-only requirements come in. The versions
installed on this host are uv's preferences (handed to it as the existing output file), so the
device runs what the host was tested with wherever those fit. uv has no download command, so
pip downloads each pinned wheel for the device (`pip download --no-deps --platform ...`) and, where
an index has only a source distribution, builds it here if the result is pure Python. The same uv
resolution run offline against the finished folder (`--no-index --find-links`) checks that the
wheelhouse alone satisfies the roots on the device.

torch comes from `torch_index` (PyTorch's CPU index has aarch64 `+cpu` wheels) when that index
answers; otherwise from PyPI, whose aarch64 torch is a CUDA build that pulls the nvidia-* wheels.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from gemma_edge.reach.device_platform import WheelhouseError, _python_minor, describe, platform_tags

log = logging.getLogger(__name__)


DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0
GPU_PACKAGE = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")
# The newest manylinux glibc uv 0.13 resolves for; a newer device glibc runs those wheels too.
UV_NEWEST_GLIBC_MINOR = 40


def uv_binary() -> str:
    """uv's executable: the one beside this interpreter (pip's `uv` wheel puts it there), else on PATH."""
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise WheelhouseError("uv is not installed beside this Python (pip install uv, pinned in requirements.txt)")
    return found


def uv_platform(platform: dict) -> list[str]:
    """uv's arguments for resolving as the device would."""
    major, minor = _python_minor(platform)
    glibc = min(int(platform["glibc"].split(".")[1]), UV_NEWEST_GLIBC_MINOR)
    return ["--python-platform", f"{platform['machine']}-manylinux_2_{glibc}", "--python-version", f"{major}.{minor}"]


def host_preferences() -> str:
    """`name==version` of every distribution installed here (public versions: a `+cpu` label is
    not on PyPI), as uv reads an earlier output file: the versions it keeps where they fit."""
    pins = set()
    for distribution in importlib.metadata.distributions():
        try:
            pins.add(f"{canonicalize_name(distribution.metadata['Name'])}=={Version(distribution.version).public}")
        except (InvalidVersion, TypeError):
            continue
    return "".join(f"{pin}\n" for pin in sorted(pins))


def uv_compile(roots: dict[str, str], platform: dict, *options: str, preferences: str = "") -> dict[str, dict]:
    """uv's resolution of `roots` for the device: {name: {"pin", "version", "required_by"}}."""
    with tempfile.TemporaryDirectory(prefix="gemma-edge-uv-") as scratch:
        requirements, output = Path(scratch) / "roots.txt", Path(scratch) / "resolved.txt"
        requirements.write_text("".join(f"{name}=={version}\n" for name, version in roots.items()))
        output.write_text(preferences)
        command = [uv_binary(), "pip", "compile", str(requirements), "--output-file", str(output), *uv_platform(platform)]
        command += ["--no-header", "--annotation-style", "line", "--quiet", "--no-progress", *options]
        result = subprocess.run(command, capture_output=True, text=True, env=_uv_env())
        if result.returncode != 0:
            wanted = " ".join(f"{name}=={version}" for name, version in roots.items())
            reason = _uv_reason(result.stderr)
            raise WheelhouseError(f"uv found no set of wheels of {wanted} for this device ({describe(platform)}): {reason}")
        return parse_resolution(output.read_text(), requirements.name)


def _uv_env() -> dict:
    # uv's cache stays where the user keeps it; nothing of the host's uv configuration changes the resolution.
    return {**os.environ, "UV_NO_CONFIG": "1"}


def _uv_reason(stderr: str) -> str:
    lines = [line.strip(" ×╰─▶") for line in stderr.strip().splitlines() if line.strip()]
    return " ".join(line for line in lines if not line.startswith("hint:"))[-600:] or "(no output)"


def parse_resolution(text: str, roots_file: str) -> dict[str, dict]:
    """uv's output, one `name==version  # via a, b` line per package."""
    resolved = {}
    for line in text.splitlines():
        requirement, _, comment = line.partition("#")
        if "==" not in requirement:
            continue
        name, version = (part.strip() for part in requirement.split("==", 1))
        via = comment.strip().removeprefix("via").strip()
        parents = [canonicalize_name(v.strip()) for v in via.split(",") if v.strip() and roots_file not in v]
        resolved[canonicalize_name(name)] = {"pin": f"{name}=={version}", "version": version, "required_by": sorted(parents)}
    return resolved


def probe_index(url: str, package: str = "torch", timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, reason): GET <index>/<package>/ with a short timeout."""
    target = url.rstrip("/") + f"/{package}/"
    try:
        with urllib.request.urlopen(urllib.request.Request(target, method="GET"), timeout=timeout) as response:
            response.read(1)
        return True, f"{target} answered"
    except urllib.error.HTTPError as error:
        return False, f"{target} answered HTTP {error.code}"
    except urllib.error.URLError as error:
        return False, f"{target} is unreachable ({error.reason})"
    except (OSError, ValueError) as error:
        return False, f"{target} is unreachable ({error})"


def _download_command(platform: dict, dest: Path, python: str, index_url: str | None) -> list[str]:
    major, minor = _python_minor(platform)
    command = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        "--python-version",
        f"{major}.{minor}",
        "--implementation",
        "cp",
        "--abi",
        f"cp{major}{minor}",
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in platform_tags(platform):
        command += ["--platform", tag]
    if index_url:
        command += ["--index-url", index_url]
    return command


def pip_download(requirements: list[str], platform: dict, dest: Path, python: str, index_url: str | None = None) -> list[str]:
    """Download exactly these requirements (no dependencies) as wheels for the device into `dest`.
    Returns those of which the index has no wheel for the device (pip stops at the first, so the
    rest are retried without it); any other failure raises."""
    remaining, missing = list(requirements), []
    while remaining:
        log.info(
            "downloading %d wheel(s) for %s%s: %s",
            len(remaining),
            platform["machine"],
            f" from {index_url}" if index_url else "",
            " ".join(remaining),
        )
        result = subprocess.run(
            [*_download_command(platform, dest, python, index_url), *remaining], capture_output=True, text=True
        )
        if result.returncode == 0:
            break
        absent = {
            canonicalize_name(Requirement(found).name)
            for found in re.findall(r"No matching distribution found for (\S+)", result.stderr)
        }
        stuck = [pin for pin in remaining if canonicalize_name(Requirement(pin).name) in absent]
        if not stuck:
            raise WheelhouseError(_pip_failure(remaining, platform, result.stderr))
        missing += stuck
        remaining = [pin for pin in remaining if pin not in stuck]
    return missing


def build_pure_wheel(requirement: str, platform: dict, dest: Path, python: str) -> Path:
    """Build a wheel from the sdist of a requirement that publishes no wheel for the device. Only
    a pure-Python result (py*-none-any) is kept: a compiled one would be for the host."""
    name = Requirement(requirement).name
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".sdist-build-") as scratch:
        command = [
            python,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-binary",
            name,
            "--wheel-dir",
            scratch,
            requirement,
        ]
        log.info("%s publishes no wheel for %s; building one from its source distribution", requirement, describe(platform))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise WheelhouseError(
                f"pip found no wheel of {requirement} for this device ({describe(platform)}), and building one "
                f"from its source distribution failed: {_last_error(result.stderr)}"
            )
        [built] = list(Path(scratch).glob("*.whl"))
        tags = parse_wheel_filename(built.name)[3]
        if not all(tag.abi == "none" and tag.platform == "any" for tag in tags):
            raise WheelhouseError(
                f"{requirement} publishes no wheel for this device ({describe(platform)}) and its source builds "
                f"{built.name}, which is compiled for this host: build that wheel on the device's platform and add it"
            )
        return Path(shutil.move(str(built), dest / built.name))


def _last_error(stderr: str) -> str:
    errors = [line.strip() for line in stderr.splitlines() if line.startswith("ERROR")]
    return errors[-1] if errors else (stderr.strip().splitlines() or ["(no output)"])[-1].strip()


def _pip_failure(requirements: list[str], platform: dict, stderr: str) -> str:
    return f"pip could not download {' '.join(requirements)} for this device ({describe(platform)}): {_last_error(stderr)}"


def _wheels_by_name(folder: Path) -> dict[str, Path]:
    found = {}
    for path in folder.iterdir():
        if path.suffix == ".whl":
            found[canonicalize_name(parse_wheel_filename(path.name)[0])] = path
        elif path.is_file():
            raise WheelhouseError(
                f"pip downloaded {path.name}, which is not a wheel; the device could not install it without building it"
            )
    return found


def resolve_and_download(roots: dict[str, str], platform: dict, dest: Path, torch_index: str | None, python: str) -> dict:
    """The device's closure of `roots`, resolved by uv and downloaded into `dest` by pip.

    Returns {name: {"path", "required_by": [names], "source"}} keyed by canonical name. One `pip
    download` for PyPI's wheels and one for torch's when it has its own index; a requirement with
    no wheel for the device is built from its sdist if the result is pure Python."""
    options = ["--extra-index-url", torch_index, "--index-strategy", "unsafe-best-match"] if torch_index else []
    resolved = uv_compile(roots, platform, *options, preferences=host_preferences())
    log.info("uv resolved %d packages for %s", len(resolved), describe(platform))
    torch_batch = [node["pin"] for name, node in resolved.items() if name == "torch" and torch_index]
    other_batch = [node["pin"] for name, node in resolved.items() if not (name == "torch" and torch_index)]
    missing = pip_download(other_batch, platform, dest, python) if other_batch else []
    if torch_batch:
        missing += pip_download(torch_batch, platform, dest, python, index_url=torch_index)
    built = set()
    for pin in missing:
        build_pure_wheel(pin, platform, dest, python)
        built.add(canonicalize_name(Requirement(pin).name))
    present = _wheels_by_name(dest)
    absent = sorted(set(resolved) - set(present))
    if absent:
        raise WheelhouseError(f"pip reported success but left no wheel of {', '.join(absent)} in {dest}")

    def source(name):
        return "sdist built on host" if name in built else (torch_index if name == "torch" and torch_index else "index")

    return {
        name: {"path": present[name], "required_by": node["required_by"], "source": source(name)}
        for name, node in resolved.items()
    }


def unmet_requirements(wheel_paths, roots: dict[str, str], platform: dict) -> str | None:
    """Why these wheel files alone do not install `roots` on the device (uv resolving offline
    against them, as the device's pip would), or None when they do."""
    wheels = [Path(path) for path in wheel_paths]
    with tempfile.TemporaryDirectory(prefix="gemma-edge-wheels-") as folder:
        for wheel in wheels:  # only these files, whatever else their folder holds
            (Path(folder) / wheel.name).symlink_to(wheel.resolve())
        try:
            resolved = uv_compile(roots, platform, "--no-index", "--find-links", folder, "--offline")
        except WheelhouseError as error:
            return str(error).split(": ", 1)[-1]
    names = {canonicalize_name(parse_wheel_filename(wheel.name)[0]): wheel for wheel in wheels}
    outside = sorted(name for name in resolved if name not in names)
    return f"uv took {', '.join(outside)} from outside the wheelhouse" if outside else None


def gpu_closure(graph: dict) -> set[str]:
    """The names present only because torch requires GPU packages (nvidia-*, triton, cuda-*)."""
    children: dict[str, set[str]] = {}
    for name, node in graph.items():
        for parent in node["required_by"]:
            children.setdefault(parent, set()).add(name)
    gpu_roots = {name for name in children.get("torch", ()) if GPU_PACKAGE.match(name)}
    if not gpu_roots:
        return set()

    def reachable(skip_gpu: bool) -> set[str]:
        seen, queue = set(), deque(name for name, node in graph.items() if not node["required_by"])
        while queue:
            name = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            queue.extend(dep for dep in children.get(name, ()) if not (skip_gpu and name == "torch" and dep in gpu_roots))
        return seen

    return reachable(False) - reachable(True)
