"""A device's platform as wheels see it (CPython version, glibc, machine): its tags, and whether a
wheel fits it."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from gemma_edge.device.files import sha256_file

# The oldest manylinux glibc per architecture (aarch64 wheels start at manylinux2014 = 2_17).
OLDEST_GLIBC_MINOR = {"x86_64": 5, "i686": 5}
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


class WheelhouseError(RuntimeError):
    """The wheelhouse cannot be built, or does not fit the device."""


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
