"""Build a wheelhouse on the host for a device of another platform (a Raspberry Pi 5: aarch64,
CPython 3.11, glibc 2.36), so a device without internet installs from it with

    pip install --no-index --find-links <wheelhouse> executorch==1.5.1 torch==2.13.0

and every device gets the same bytes.

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

import argparse
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .artifacts import sha256_file, write_json

log = logging.getLogger(__name__)

SCHEMA = "gemma-edge.wheelhouse/1"
MANIFEST_NAME = "wheelhouse.json"
LOCK_NAME = "requirements.lock"
DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
DEFAULT_ROOTS = {"executorch": "1.5.1", "torch": "2.13.0"}
PROBE_TIMEOUT_S = 5.0
# The oldest manylinux glibc per architecture (aarch64 wheels start at manylinux2014 = 2_17).
OLDEST_GLIBC_MINOR = {"x86_64": 5, "i686": 5}
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
GPU_PACKAGE = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


class WheelhouseError(RuntimeError):
    """The wheelhouse cannot be built, or does not fit the device."""


# --- the device's platform ---------------------------------------------------------------------


def device_platform(facts: dict) -> dict:
    """{"machine", "python", "glibc"} from device facts with keys `machine` ("aarch64"), `python`
    ("3.11.2") and `libc` (["glibc", "2.36"] as platform.libc_ver() gives, or "glibc 2.36")."""
    machine = str(facts.get("machine") or "").strip()
    if not machine:
        raise WheelhouseError("device facts name no machine architecture (platform.machine()), so no wheels can be chosen for it")
    libc = facts.get("libc")
    if isinstance(libc, str):
        libc = libc.replace("-", " ").split()
    libc = [str(part) for part in (libc or []) if str(part)]
    if len(libc) < 2 or libc[0].lower() != "glibc" or not re.fullmatch(r"2\.\d+(\.\d+)?", libc[1]):
        raise WheelhouseError(
            f"device libc is {' '.join(libc) or 'unknown'}, not glibc 2.x, so manylinux wheels do not fit it "
            "(musllinux devices are not supported)"
        )
    glibc = ".".join(libc[1].split(".")[:2])
    python = str(facts.get("python") or "").strip()
    implementation = str(facts.get("implementation", "CPython"))
    if implementation != "CPython" or not re.fullmatch(r"3\.\d+\.\d+\S*", python):
        raise WheelhouseError(
            f"device Python is {implementation} {python or 'unknown'}, not CPython 3.x, "
            "which is the only Python this wheelhouse supports"
        )
    return {"machine": machine, "python": python, "glibc": glibc}


def _python_minor(platform: dict) -> tuple[int, int]:
    major, minor = platform["python"].split(".")[:2]
    return int(major), int(minor)


def _glibc_minor(platform: dict) -> int:
    return int(platform["glibc"].split(".")[1])


def describe(platform: dict) -> str:
    major, minor = _python_minor(platform)
    return f"{platform['machine']}, CPython {major}.{minor}, glibc {platform['glibc']}"


def platform_tags(platform: dict) -> list[str]:
    """Every platform tag the device accepts, newest first: manylinux_2_<its glibc> down to the
    oldest manylinux for its architecture, the legacy aliases, and linux_<arch>. pip download does
    not widen `--platform` tags itself, so each is passed."""
    arch = platform["machine"]
    tags = []
    for minor in range(_glibc_minor(platform), OLDEST_GLIBC_MINOR.get(arch, 17) - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[minor]}_{arch}")
    tags.append(f"linux_{arch}")
    return tags


def supported_tags(platform: dict) -> list[Tag]:
    """The interpreter/ABI/platform tags the device's pip accepts, in its order of preference."""
    version = _python_minor(platform)
    platforms = platform_tags(platform)
    return [*cpython_tags(version, platforms=platforms), *compatible_tags(version, f"cp{version[0]}{version[1]}", platforms)]


def marker_environment(platform: dict) -> dict:
    """PEP 508 marker variables as the device's interpreter reports them."""
    major, minor = _python_minor(platform)
    return {
        "implementation_name": "cpython",
        "implementation_version": platform["python"],
        "os_name": "posix",
        "platform_machine": platform["machine"],
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": platform["python"],
        "python_version": f"{major}.{minor}",
        "sys_platform": "linux",
        "extra": "",
    }


def wheel_fits(filename: str, platform: dict) -> bool:
    """Whether the device's pip would install this wheel file (by its filename tags)."""
    try:
        _, _, _, tags = parse_wheel_filename(Path(filename).name)
    except InvalidWheelFilename:
        return False
    return not tags.isdisjoint(supported_tags(platform))


def check_wheels_fit(filenames, platform: dict) -> None:
    """Raise WheelhouseError naming the first file the device cannot install."""
    supported = set(supported_tags(platform))
    for filename in filenames:
        name = Path(filename).name
        try:
            _, _, _, tags = parse_wheel_filename(name)
        except InvalidWheelFilename:
            raise WheelhouseError(
                f"wheelhouse holds {name}, which is not a wheel (a source distribution would have to be built on the device): "
                "rebuild the wheelhouse with binary wheels only"
            ) from None
        if tags.isdisjoint(supported):
            built_for = ".".join(sorted({tag.platform for tag in tags}))
            raise WheelhouseError(
                f"wheelhouse holds {name}, built for {built_for}, which this device ({describe(platform)}) "
                "cannot install: rebuild the wheelhouse for it"
            )


# --- reading wheels ----------------------------------------------------------------------------


def wheel_metadata(path: Path):
    """The parsed METADATA of a wheel file."""
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise WheelhouseError(
                f"{Path(path).name} has {len(names)} .dist-info/METADATA files, not one, so its dependencies cannot be read"
            )
        return HeaderParser().parsestr(archive.read(names[0]).decode("utf-8", "replace"))


def device_requirements(requires_dist, platform: dict, extras=("",)) -> list[Requirement]:
    """The Requires-Dist entries that apply on the device when these extras are asked for: ""
    alone gives the base requirements, so a package's own optional extras are left out."""
    environment = marker_environment(platform)
    requirements, seen = [], set()
    for line in requires_dist or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            raise WheelhouseError(f"cannot parse the requirement {line!r}: {error}") from None
        if requirement.marker is None:
            applies = "" in extras
        else:
            applies = any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in extras)
        if applies and str(requirement) not in seen:
            seen.add(str(requirement))
            requirements.append(requirement)
    return requirements


def installed_bytes(path: Path) -> int:
    """The sum of a wheel's uncompressed member sizes: about what it takes installed."""
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist())


def wheel_record(path: Path) -> dict:
    name, version, _, _ = parse_wheel_filename(path.name)
    return {
        "filename": path.name,
        "name": str(name),
        "version": str(version),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "installed_bytes": installed_bytes(path),
    }


# --- resolving and downloading -----------------------------------------------------------------


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


def build_wheelhouse(
    roots: dict[str, str],
    platform: dict,
    out_dir: Path,
    torch_index: str | None = DEFAULT_TORCH_INDEX,
    python: str = sys.executable,
) -> dict:
    """Resolve and download the device's closure of `roots` into a temporary sibling of `out_dir`,
    check every wheel fits the device, write its manifest (wheelhouse.json) and a hash-pinned
    requirements.lock inside, then put it in place of `out_dir`. Returns the manifest record."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torch_info = {"index": torch_index, "index_reachable": None, "build": None, "note": None}
    index_for_torch = None
    if torch_index:
        reachable, reason = probe_index(torch_index)
        torch_info["index_reachable"] = reachable
        if reachable:
            index_for_torch = torch_index
            torch_info["note"] = f"torch from {torch_index}"
        else:
            log.warning(
                "torch index %s is not usable (%s), so torch comes from PyPI, whose aarch64 build may bring CUDA wheels",
                torch_index,
                reason,
            )
            torch_info["note"] = f"{reason}; torch taken from PyPI"
    else:
        torch_info["note"] = "no torch index configured; torch taken from PyPI"

    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        graph = resolve_and_download(roots, platform, staging, index_for_torch, python)
        check_wheels_fit([node["path"].name for node in graph.values()], platform)
        unmet = unmet_requirements([node["path"] for node in graph.values()], roots, platform)
        if unmet:
            raise WheelhouseError(f"the wheelhouse for {describe(platform)} would leave unmet: {'; '.join(unmet)}")
        wheels = []
        for _name, node in sorted(graph.items()):
            wheels.append(
                {
                    **wheel_record(node["path"]),
                    "required_by": node["required_by"],
                    "extras": node["extras"],
                    "source": node["source"],
                }
            )
        by_name = {canonicalize_name(wheel["name"]): wheel for wheel in wheels}
        if "torch" not in graph:
            torch_info["note"] = "torch is not in the closure"
        else:
            gpu = gpu_closure(graph)
            torch_info["build"] = "cuda" if gpu else "cpu"
            torch_info["version"] = by_name["torch"]["version"]
            if gpu:
                torch_info["cuda_wheels"] = sorted(by_name[name]["filename"] for name in gpu)
                torch_info["cuda_download_bytes"] = sum(by_name[name]["size_bytes"] for name in gpu)
                torch_info["cuda_installed_bytes"] = sum(by_name[name]["installed_bytes"] for name in gpu)
                log.warning(
                    "torch %s is a CUDA build for %s: it brings %d more wheels, %.2f GB to download and %.2f GB installed",
                    torch_info["version"],
                    platform["machine"],
                    len(gpu),
                    torch_info["cuda_download_bytes"] / 1e9,
                    torch_info["cuda_installed_bytes"] / 1e9,
                )
        record = {
            "schema": SCHEMA,
            "platform": dict(platform),
            "roots": dict(roots),
            "torch": torch_info,
            "wheels": wheels,
            "download_bytes": sum(wheel["size_bytes"] for wheel in wheels),
            "installed_bytes": sum(wheel["installed_bytes"] for wheel in wheels),
            "seconds": round(time.monotonic() - started, 1),
        }
        write_json(staging / MANIFEST_NAME, record)
        (staging / LOCK_NAME).write_text("".join(f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n" for w in wheels))
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` in place of `target`. The old folder is renamed aside first, so `target` is the
    old or the new complete wheelhouse, never a mix (between the two renames it is briefly absent:
    a non-empty directory cannot be replaced in one rename)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def read_wheelhouse(folder: Path, platform: dict | None = None) -> dict:
    """The manifest of a built wheelhouse, its files checked against it (and the device)."""
    from .artifacts import read_json

    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        raise WheelhouseError(f"{folder} has no {MANIFEST_NAME}: build it with python -m gemma_edge.wheelhouse")
    record = read_json(manifest)
    for wheel in record["wheels"]:
        path = folder / wheel["filename"]
        if not path.exists() or path.stat().st_size != wheel["size_bytes"] or sha256_file(path) != wheel["sha256"]:
            raise WheelhouseError(f"{path} is missing or differs from {manifest}: rebuild the wheelhouse")
    if platform is not None:
        check_wheels_fit([wheel["filename"] for wheel in record["wheels"]], platform)
    unmet = unmet_requirements(
        [folder / wheel["filename"] for wheel in record["wheels"]], record["roots"], platform or record["platform"]
    )
    if unmet:
        raise WheelhouseError(f"{folder} would leave unmet: {'; '.join(unmet)}: rebuild the wheelhouse")
    return record


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


# --- command line ------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_edge.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--machine", required=True, help="device platform.machine(), e.g. aarch64")
    parser.add_argument("--python", required=True, help="device Python version, e.g. 3.11.2")
    parser.add_argument("--glibc", required=True, help="device glibc version, e.g. 2.36")
    parser.add_argument("--out", required=True, type=Path, help="wheelhouse folder (replaced)")
    parser.add_argument("--torch-index", default=DEFAULT_TORCH_INDEX, help="index with CPU torch wheels; '' for PyPI")
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="NAME==VERSION",
        help="a root requirement (repeatable); default " + " ".join(f"{n}=={v}" for n, v in DEFAULT_ROOTS.items()),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    roots = {}
    for root in args.root:
        name, sep, version = root.partition("==")
        if not sep or not name or not version:
            parser.error(f"--root {root!r} is not NAME==VERSION")
        roots[name.strip()] = version.strip()
    try:
        platform = device_platform({"machine": args.machine, "python": args.python, "libc": ["glibc", args.glibc]})
        record = build_wheelhouse(roots or dict(DEFAULT_ROOTS), platform, args.out, args.torch_index or None)
    except WheelhouseError as error:
        log.error("%s", error)
        return 1
    print(
        f"{args.out}: {len(record['wheels'])} wheels for {describe(platform)}, {_size(record['download_bytes'])} download, "
        f"{_size(record['installed_bytes'])} installed, torch {record['torch'].get('build') or '-'} build, "
        f"{record['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
