"""The device's wheels, resolved and downloaded on the host.

pip can download wheels for a foreign platform (`--platform/--python-version/--abi`) but it
evaluates environment markers against the host, so it would pull x86_64-only requirements
(executorch wants coremltools on Linux x86_64) and miss aarch64-only ones. The dependency closure
is therefore resolved here: each level of requirements is downloaded with `--no-deps`, the
wheels' Requires-Dist are evaluated against the device's marker environment, and the new names
form the next level. Each dependency is pinned to the version installed on the host when that
version satisfies the requirement, so the device runs what the host was tested with.

torch comes from `torch_index` (PyTorch's CPU index has aarch64 `+cpu` wheels) when that index
answers; otherwise from PyPI, whose aarch64 torch is a CUDA build that pulls the nvidia-* wheels.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from gemma_edge.reach.device_platform import (
    WheelhouseError,
    _python_minor,
    describe,
    device_requirements,
    platform_tags,
    wheel_metadata,
)

log = logging.getLogger(__name__)


DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0
GPU_PACKAGE = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


def host_version(name: str) -> Version | None:
    """The version of `name` installed in the running interpreter, if any."""
    try:
        return Version(importlib.metadata.version(name))
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return None


def choose_pin(name: str, specifier: SpecifierSet) -> str:
    """A pip requirement for `name`: the host's installed version (its public part: a `+cpu`
    local label is not on PyPI) when it satisfies `specifier`, else the specifier itself."""
    version = host_version(name)
    if version is not None and specifier.contains(version, prereleases=True):
        return f"{name}=={version.public}"
    return f"{name}{specifier}"


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
    """Breadth-first closure of `roots` for the device, downloaded into `dest`.

    Returns {name: {"path", "requires": [Requirement], "extras": [str], "required_by": [names],
    "source"}} keyed by canonical name. One `pip download` per level (plus one for torch when it has
    its own index); a requirement with no wheel for the device is built from its sdist if the
    result is pure Python (omegaconf's antlr4-python3-runtime 4.9.3 is sdist-only). A requirement
    such as `cuda-toolkit[cublas]` also pulls what that extra of cuda-toolkit requires, as pip
    would, even when cuda-toolkit was downloaded at an earlier level.
    """
    nodes: dict[str, dict] = {}
    required_by: dict[str, set[str]] = {}
    wanted: dict[str, list[Requirement]] = {}  # every requirement met so far, per name
    extras_wanted: dict[str, set[str]] = {}
    built: set[str] = set()  # names built here from a source distribution
    level = {}
    for name, version in roots.items():
        requirement = Requirement(f"{name}=={version}")
        wanted.setdefault(canonicalize_name(name), []).append(requirement)
        level[canonicalize_name(name)] = str(requirement)
    while level:
        torch_batch = [pin for name, pin in level.items() if name == "torch" and torch_index]
        other_batch = [pin for name, pin in level.items() if not (name == "torch" and torch_index)]
        missing = []
        if other_batch:
            missing += pip_download(other_batch, platform, dest, python)
        if torch_batch:
            missing += pip_download(torch_batch, platform, dest, python, index_url=torch_index)
        for pin in missing:
            build_pure_wheel(pin, platform, dest, python)
            built.add(canonicalize_name(Requirement(pin).name))
        present = _wheels_by_name(dest)
        for name in level:
            if name not in present:
                raise WheelhouseError(f"pip reported success for {level[name]} but left no wheel of it in {dest}")
            requires_dist = wheel_metadata(present[name]).get_all("Requires-Dist") or []
            nodes[name] = {"path": present[name], "requires_dist": requires_dist, "extras_done": set(), "requires": []}
        next_level: dict[str, list[Requirement]] = {}
        queue = deque(level)  # names whose requirements (for newly asked extras) are still to be read
        while queue:
            name = queue.popleft()
            node = nodes[name]
            todo = ({""} | extras_wanted.get(name, set())) - node["extras_done"]
            node["extras_done"] |= todo
            known = {str(requirement) for requirement in node["requires"]}
            for requirement in device_requirements(node["requires_dist"], platform, sorted(todo)):
                if str(requirement) in known:
                    continue
                node["requires"].append(requirement)
                dep = canonicalize_name(requirement.name)
                required_by.setdefault(dep, set()).add(name)
                wanted.setdefault(dep, []).append(requirement)
                new_extras = {canonicalize_name(extra) for extra in requirement.extras} - extras_wanted.get(dep, set())
                extras_wanted.setdefault(dep, set()).update(new_extras)
                if dep in nodes:
                    if new_extras:
                        queue.append(dep)
                else:
                    next_level.setdefault(dep, []).append(requirement)
        level = {}
        for dep, requirements in sorted(next_level.items()):
            specifier = SpecifierSet()
            for requirement in requirements:
                specifier &= requirement.specifier
            level[dep] = choose_pin(requirements[0].name, specifier)
    _check_consistent(nodes, wanted, required_by)

    def source(name):
        return "sdist built on host" if name in built else (torch_index if name == "torch" and torch_index else "index")

    return {
        name: {
            "path": node["path"],
            "requires": node["requires"],
            "extras": sorted(extras_wanted.get(name, ())),
            "required_by": sorted(required_by.get(name, ())),
            "source": source(name),
        }
        for name, node in nodes.items()
    }


def _check_consistent(graph: dict, wanted: dict, required_by: dict) -> None:
    """Every requirement met during the walk must accept the version chosen for its name (the walk
    picks a version when a name first appears; a later, stricter requirement is caught here)."""
    for name, requirements in wanted.items():
        version = Version(str(parse_wheel_filename(graph[name]["path"].name)[1]))
        for requirement in requirements:
            if not requirement.specifier.contains(version, prereleases=True):
                who = ", ".join(sorted(required_by.get(name, ()))) or "the roots"
                raise WheelhouseError(
                    f"the wheelhouse took {name} {version}, but {who} requires {requirement}: "
                    "pin a version of it that fits both as a root and rebuild"
                )


def unmet_requirements(wheel_paths, roots: dict[str, str], platform: dict) -> list[str]:
    """Walk the closure again from the wheel files alone, as the device's pip would: every root
    and every requirement that applies on the device (with the extras asked for) must be met by
    a wheel present. Returns "requirement (needed by X)" for each that is not."""
    wheels = {canonicalize_name(parse_wheel_filename(Path(p).name)[0]): Path(p) for p in wheel_paths}
    problems = []
    queue = deque((Requirement(f"{name}=={version}"), "the roots") for name, version in roots.items())
    done: set[tuple[str, str]] = set()
    while queue:
        requirement, needed_by = queue.popleft()
        name = canonicalize_name(requirement.name)
        path = wheels.get(name)
        if path is None or not requirement.specifier.contains(parse_wheel_filename(path.name)[1], prereleases=True):
            problems.append(f"{requirement} (needed by {needed_by})")
            continue
        extras = {""} | {canonicalize_name(extra) for extra in requirement.extras}
        todo = {extra for extra in extras if (name, extra) not in done}
        done |= {(name, extra) for extra in todo}
        if todo:
            for dep in device_requirements(wheel_metadata(path).get_all("Requires-Dist"), platform, sorted(todo)):
                queue.append((dep, name))
    return problems


def gpu_closure(graph: dict) -> set[str]:
    """The names present only because torch requires GPU packages (nvidia-*, triton, cuda-*)."""
    if "torch" not in graph:
        return set()
    gpu_roots = {canonicalize_name(r.name) for r in graph["torch"]["requires"] if GPU_PACKAGE.match(canonicalize_name(r.name))}
    if not gpu_roots:
        return set()

    def reachable(skip_gpu: bool) -> set[str]:
        seen, queue = set(), deque(name for name, node in graph.items() if not node["required_by"])
        while queue:
            name = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            for requirement in graph[name]["requires"]:
                dep = canonicalize_name(requirement.name)
                if not (skip_gpu and name == "torch" and dep in gpu_roots):
                    queue.append(dep)
        return seen

    return reachable(False) - reachable(True)
