"""llama.cpp's `llama-bench` built on this host for a device's CPU, so llama.cpp runs beside the
.pte on every target from the same source release the host's GGUF converter comes from.

The source is the `vendor/llama.cpp` tree of the pinned llama-cpp-python source distribution
(bench/setup-llamacpp.sh downloads it). The binary is linked statically (glibc, libstdc++ and
libgomp included), so it needs nothing on the device, and it is compiled for the device's own
instruction set, read from its /proc/cpuinfo features: AVX2/AVX-512 flags for an x86-64 device,
`-march=armv8.2-a+dotprod+fp16` for a Pi 5's Cortex-A76 (cross-compiled with Debian's
g++-aarch64-linux-gnu when this host is x86-64). Builds are cached per source release, machine
and flag set under ~/.cache/gemma-edge/llama-bench: the first one takes several minutes on two
cores, later ones copy the cached binary.

A device llama.cpp cannot be built for gets a record that says why (`available: false`), never a
failed run: the benchmark reports the engine as not available with that reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform as host_platform
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from gemma_edge.device.files import atomic_output, sha256_file, write_json

log = logging.getLogger(__name__)

BINARY = "llama-bench"
BUILD_TIMEOUT_S = 3600

# /proc/cpuinfo flag -> ggml's CMake option, for an x86-64 device (ggml/CMakeLists.txt).
X86_OPTIONS = {
    "sse4_2": "GGML_SSE42",
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "bmi2": "GGML_BMI2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}
# /proc/cpuinfo feature -> -march extension, for an aarch64 device.
ARM_EXTENSIONS = {"asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm", "sve": "sve"}
CROSS_PREFIX = {"aarch64": "aarch64-linux-gnu-"}
CROSS_PACKAGE = {"aarch64": "g++-aarch64-linux-gnu"}


class BuildUnavailable(RuntimeError):
    """llama-bench cannot be built for this device here; the message says why and what would fix it."""


def cpu_options(machine: str, features: list[str]) -> list[str]:
    """The CMake options that compile ggml for exactly this CPU's instruction set."""
    present = set(features)
    if machine == "x86_64":
        return [f"-D{option}={'ON' if flag in present else 'OFF'}" for flag, option in sorted(X86_OPTIONS.items())]
    if machine == "aarch64":
        extensions = [ext for flag, ext in ARM_EXTENSIONS.items() if flag in present]
        base = "armv8.2-a" if extensions else "armv8-a"
        return [f"-DGGML_CPU_ARM_ARCH={'+'.join([base, *extensions])}"]
    raise BuildUnavailable(f"building llama.cpp for a {machine} CPU is not supported here (x86_64 and aarch64 are)")


def compilers(machine: str) -> tuple[str, str]:
    """C and C++ compilers producing `machine` code on this host (a cross toolchain if they differ)."""
    prefix = "" if machine == host_platform.machine() else CROSS_PREFIX.get(machine)
    if prefix is None:
        raise BuildUnavailable(f"no cross compiler for {machine} on this {host_platform.machine()} host")
    c, cxx = f"{prefix}gcc", f"{prefix}g++"
    for tool in (c, cxx, "cmake"):
        if not shutil.which(tool):
            package = CROSS_PACKAGE.get(machine, "g++") if tool != "cmake" else "cmake"
            raise BuildUnavailable(f"{tool} is not installed on this host: apt-get install {package}")
    return c, cxx


def cmake_arguments(machine: str, features: list[str], c: str, cxx: str, toolchain: Path | None) -> list[str]:
    """Configure options: llama-bench only, static, no network code, ggml for the device's CPU."""
    gomp = subprocess.run([c, "-print-file-name=libgomp.a"], capture_output=True, text=True, check=True).stdout.strip()
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_C_COMPILER={c}",
        f"-DCMAKE_CXX_COMPILER={cxx}",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DCMAKE_EXE_LINKER_FLAGS=-static",
        f"-DOpenMP_gomp_LIBRARY={gomp}",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DGGML_CCACHE=OFF",
        "-DGGML_NATIVE=OFF",
        *cpu_options(machine, features),
    ]
    if toolchain:
        args.append(f"-DCMAKE_TOOLCHAIN_FILE={toolchain}")
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return args


def cache_key(version: str, machine: str, options: list[str]) -> str:
    digest = hashlib.sha256("\n".join(options).encode()).hexdigest()[:12]
    return f"{version}-{machine}-{digest}"


def default_cache() -> Path:
    return Path(os.environ.get("GEMMA_EDGE_CACHE", Path.home() / ".cache" / "gemma-edge")) / "llama-bench"


def unpack_source(sdist: Path, into: Path) -> Path:
    """llama.cpp's source tree from the llama-cpp-python source distribution."""
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name]
        if not members:
            raise BuildUnavailable(f"{sdist} holds no vendor/llama.cpp source tree")
        archive.extractall(into, members=members, filter="data")
    return next(into.glob("*/vendor/llama.cpp"))


def _toolchain_file(machine: str, c: str, cxx: str, folder: Path) -> Path:
    path = folder / "toolchain.cmake"
    path.write_text(
        f"set(CMAKE_SYSTEM_NAME Linux)\nset(CMAKE_SYSTEM_PROCESSOR {machine})\n"
        f"set(CMAKE_C_COMPILER {c})\nset(CMAKE_CXX_COMPILER {cxx})\n"
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)\nset(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)\n"
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)\n"
    )
    return path


def _run_logged(argv: list[str], cwd: Path, what: str) -> None:
    """Run a build command, logging a line of progress every tenth of the way (ninja's [n/m])."""
    started = time.monotonic()
    with subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        tail, shown = [], -1
        for line in process.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith("[") and "/" in line.split("]", 1)[0]:
                done, _, total = line[1:].split("]", 1)[0].partition("/")
                if done.isdigit() and total.isdigit() and int(done) * 10 // int(total) > shown:
                    shown = int(done) * 10 // int(total)
                    log.info("%s: %s/%s (%.0f s)", what, done, total, time.monotonic() - started)
            if time.monotonic() - started > BUILD_TIMEOUT_S:
                process.kill()
                raise RuntimeError(f"{what} took longer than {BUILD_TIMEOUT_S} s")
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {process.returncode}):\n" + "\n".join(tail))


def build_cached(sdist: Path, version: str, machine: str, features: list[str], cache: Path) -> tuple[Path, dict]:
    """The cached llama-bench for this CPU, built first if missing (atomically: a failed or
    interrupted build leaves nothing in the cache)."""
    c, cxx = compilers(machine)
    options = cpu_options(machine, features)
    folder = cache / cache_key(version, machine, options)
    binary = folder / BINARY
    facts = {"version": version, "machine": machine, "cpu_options": options, "compiler": cxx, "static": True}
    if binary.is_file():
        return binary, {**facts, "cached": True, "build_seconds": None}
    log.info(
        "building llama-bench %s for %s (%s) with %s, several minutes on two cores; cached in %s",
        version,
        machine,
        " ".join(options),
        cxx,
        folder,
    )
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as scratch:
        scratch = Path(scratch)
        source = unpack_source(sdist, scratch / "src")
        toolchain = _toolchain_file(machine, c, cxx, scratch) if machine != host_platform.machine() else None
        build = scratch / "build"
        _run_logged(
            ["cmake", "-S", str(source), "-B", str(build), *cmake_arguments(machine, features, c, cxx, toolchain)],
            scratch,
            "configure",
        )
        _run_logged(
            ["cmake", "--build", str(build), "--target", BINARY, "-j", str(os.cpu_count() or 1)], scratch, f"build {BINARY}"
        )
        ready = scratch / "ready"
        ready.mkdir()
        shutil.copy2(build / "bin" / BINARY, ready / BINARY)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(ready, folder)
    return binary, {**facts, "cached": False, "build_seconds": time.monotonic() - started}


def build_for_device(sdist: Path, version: str, device: dict, out_dir: Path, out_record: Path, cache: Path | None = None) -> dict:
    """Put a llama-bench for `device` (its probed facts) in `out_dir` and describe it in
    `out_record`; a device it cannot be built for gets `available: false` and the reason."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine, features = device.get("machine"), device.get("cpu_features") or []
    try:
        if not Path(sdist).is_file():
            raise BuildUnavailable(f"llama.cpp's source ({sdist}) is missing: run bench/setup-llamacpp.sh once")
        cached, facts = build_cached(Path(sdist), version, machine, features, cache or default_cache())
    except BuildUnavailable as error:
        log.warning("llama.cpp will be reported as not available on this device: %s", error)
        record = {"engine": "llamacpp", "available": False, "reason": str(error), "machine": machine}
        write_json(out_record, record)
        return record
    with atomic_output(out_dir / BINARY) as tmp:
        shutil.copy2(cached, tmp)
    binary = out_dir / BINARY
    record = {
        "engine": "llamacpp",
        "available": True,
        "binary": str(binary),
        "sha256": sha256_file(binary),
        "size_bytes": binary.stat().st_size,
        **facts,
    }
    write_json(out_record, record)
    log.info(
        "llama-bench for %s: %s (%.1f MB, %s)",
        machine,
        binary,
        record["size_bytes"] / 1e6,
        "from the cache" if facts["cached"] else f"built in {facts['build_seconds']:.0f} s",
    )
    return record
