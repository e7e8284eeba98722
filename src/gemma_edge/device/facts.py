"""What a device is, and whether it can run the benchmark: CPU, memory, OS and runtime versions
as the device reports them, and the pre-flight checks on them.

Standard library only: `python -m gemma_edge.device.device_bench facts` runs on the device's bare
system Python before anything is installed.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from gemma_edge.device import elf


def device_facts() -> dict:
    """CPU, memory, kernel, OS, governor and runtime versions of this machine."""
    facts = {
        "machine": platform.machine(),
        "kernel": platform.release(),
        "os": _os_release(),
        "cores": os.cpu_count(),
        "cpu_model": None,
        "cpu_features": None,
        "memory_bytes": None,
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "python": platform.python_version(),
        "versions": _versions(),
    }
    cpuinfo = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        cpuinfo.setdefault(key.strip().lower(), value.strip())
    # x86 names the CPU in "model name" ("model" is a number there); a Pi names the board in "Model".
    names = [cpuinfo.get("model name"), cpuinfo.get("model"), cpuinfo.get("hardware")]
    facts["cpu_model"] = next((n for n in names if n and not n.isdigit()), None)
    features = cpuinfo.get("flags") or cpuinfo.get("features")
    facts["cpu_features"] = features.split() if features else None
    meminfo = _meminfo()
    facts["memory_bytes"] = meminfo.get("MemTotal")
    facts["memory_available_bytes"] = meminfo.get("MemAvailable")
    facts["libc"] = list(platform.libc_ver())
    facts["page_size"] = os.sysconf("SC_PAGESIZE")
    facts["disk_free_bytes"] = shutil.disk_usage(".").free
    facts["xnnpack_features"] = xnnpack_features(facts["machine"], facts["cpu_features"] or [])
    facts["emulator"] = {"qemu_cpu": os.environ["QEMU_CPU"]} if os.environ.get("QEMU_CPU") else None
    facts["library_alignment"] = runtime_library_alignment()
    facts["llm_runner_libraries"] = runner_libraries(runner_extension(), facts["machine"])
    return facts


def _meminfo() -> dict:
    values = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values


# CPU features XNNPACK's kernels use, by the names /proc/cpuinfo gives them. On aarch64 NEON is
# required; dot-product (the int8 GEMMs of 8da4w), FP16 arithmetic and i8mm select faster kernels.
XNNPACK_FEATURES = {
    "aarch64": {"neon": "asimd", "dotprod": "asimddp", "fp16": "asimdhp", "i8mm": "i8mm", "sve": "sve"},
    "x86_64": {"sse4_1": "sse4_1", "avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512vnni": "avx512_vnni"},
}


REQUIRED_FEATURES = {"aarch64": ("neon",), "x86_64": ("sse4_1",)}


def xnnpack_features(machine: str, cpu_features: list[str]) -> dict:
    """Which of the features XNNPACK's kernels select on this CPU has (empty for other machines)."""
    present = set(cpu_features)
    return {name: flag in present for name, flag in XNNPACK_FEATURES.get(machine, {}).items()}


def runtime_library_alignment() -> dict | None:
    """Smallest segment alignment over the shared libraries of the installed executorch and torch
    (None when neither is installed), and which library has it."""
    from importlib import util

    smallest = None
    for package in ("executorch", "torch"):
        spec = util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for library in sorted(Path(root).rglob("*.so*")):
                align = elf.load_alignment(library) if library.is_file() else None
                if align and (smallest is None or align < smallest["bytes"]):
                    smallest = {"bytes": align, "library": str(library.relative_to(Path(root).parent))}
    if smallest:
        smallest["loads_with_16k_pages"] = smallest["bytes"] >= 16384  # Raspberry Pi OS's Pi 5 kernel
    return smallest


# System libraries ExecuTorch's LLM runner extension links on some platforms and our .pte loop does
# not need, with the Debian (Raspberry Pi OS) package that provides each: the aarch64 executorch
# wheel's _llm_runner links libatomic.so.1, the x86-64 one does not.
RUNNER_SYSTEM_LIBRARIES = {"libatomic.so.1": "libatomic1"}


def runner_extension() -> Path | None:
    """The installed executorch's LLM runner extension (`_llm_runner*.so`), or None."""
    from importlib import util

    spec = util.find_spec("executorch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(root, "extension/llm/runner").glob("_llm_runner*.so"))
        if found:
            return found[0]
    return None


def runner_libraries(extension: Path | None, machine: str, root: Path = Path("/")) -> dict | None:
    """Which of RUNNER_SYSTEM_LIBRARIES the runner `extension` links, each with where this device's
    loader finds it (None: nowhere); `root` is where the device's files are (a sysroot stands for
    one). None without an extension."""
    if extension is None:
        return None
    linked = elf.needed(extension)
    return {
        "extension": Path(extension).name,
        "needs": {soname: elf.find_library(soname, machine, root) for soname in RUNNER_SYSTEM_LIBRARIES if soname in linked},
    }


def runner_preflight(facts: dict) -> str | None:
    """Why ExecuTorch's LLM runner cannot load on this device, in one sentence naming the fix, or
    None. Not a failed check: our loop does not need these libraries, so the benchmark goes on."""
    needs = (facts.get("llm_runner_libraries") or {}).get("needs") or {}
    missing = [soname for soname, found in needs.items() if found is None]
    if not missing:
        return None
    packages = " ".join(RUNNER_SYSTEM_LIBRARIES[soname] for soname in missing)
    return (
        f"ExecuTorch's LLM runner links {', '.join(missing)}, which this device does not have (our loop does "
        f"not need it): install it with `sudo apt install {packages}`"
    )


class DeviceCheckFailed(RuntimeError):
    """The device cannot run the benchmark; the message names the number that fails."""


def preflight(facts: dict, needs: dict | None = None) -> list[str]:
    """Check the device against what the runtime and the benchmark need; raise DeviceCheckFailed
    with one sentence naming the number, else return what was checked.

    `needs` may give `memory_bytes` (the .pte plus its planned KV cache and activations), of which
    `kv_cache_bytes` at `max_context_len` positions, and `disk_bytes` (what is about to be written)."""
    needs = needs or {}
    checked = []
    machine = facts.get("machine")
    missing = [name for name in REQUIRED_FEATURES.get(machine, ()) if not (facts.get("xnnpack_features") or {}).get(name)]
    if missing:
        raise DeviceCheckFailed(
            f"the device's {machine} CPU lacks {', '.join(missing)}, which XNNPACK's kernels need "
            f"(its features: {' '.join(facts.get('cpu_features') or []) or 'none reported'})"
        )
    enabled = ", ".join(n for n, on in (facts.get("xnnpack_features") or {}).items() if on)
    checked.append(f"CPU features for XNNPACK: {enabled or 'none known'}")
    alignment = facts.get("library_alignment")
    if alignment:
        if alignment["bytes"] < facts["page_size"]:
            raise DeviceCheckFailed(
                f"{alignment['library']} is aligned to {alignment['bytes'] // 1024} KiB but the device's kernel uses "
                f"{facts['page_size'] // 1024} KiB pages, so it cannot be loaded: install a build aligned to at least "
                f"{facts['page_size'] // 1024} KiB"
            )
        checked.append(f"libraries aligned to >= {alignment['bytes'] // 1024} KiB, kernel pages {facts['page_size'] // 1024} KiB")
    available = facts.get("memory_available_bytes")
    if needs.get("memory_bytes") and available is not None:
        cache = (
            f" (the KV cache {needs['kv_cache_bytes'] / 2**20:.1f} MiB of it, at {needs['max_context_len']} positions)"
            if needs.get("kv_cache_bytes")
            else ""
        )
        if available < needs["memory_bytes"]:
            raise DeviceCheckFailed(
                f"the device has {available / 2**20:.0f} MiB of memory available but the .pte and its KV "
                f"cache and activations need {needs['memory_bytes'] / 2**20:.0f} MiB{cache}"
            )
        checked.append(f"memory: {needs['memory_bytes'] / 2**20:.0f} MiB needed{cache}, {available / 2**20:.0f} MiB available")
    free = facts.get("disk_free_bytes")
    if needs.get("disk_bytes") and free is not None:
        if free < needs["disk_bytes"]:
            raise DeviceCheckFailed(
                f"the device has {free / 1e6:.0f} MB of free disk but needs {needs['disk_bytes'] / 1e6:.0f} MB"
            )
        checked.append(f"disk: {needs['disk_bytes'] / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free")
    return checked


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _os_release() -> str | None:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.platform()


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("executorch", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
