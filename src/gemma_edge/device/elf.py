"""Reading 64-bit ELF shared libraries, and finding a library the way the dynamic loader would.
Standard library only: it runs on the device, on its bare system Python too.

- `load_alignment`: the smallest alignment of a loadable segment (a kernel whose page size exceeds
  it cannot map the library: a Pi 5 runs 16 KiB pages).
- `needed`: the sonames a library links (DT_NEEDED), read through its program headers as the
  loader reads them.
- `find_library`: where a soname would be found in the loader's folders (LD_LIBRARY_PATH, the
  folders /etc/ld.so.conf names, glibc's defaults with Debian's multiarch folders), counting only a
  file built for this machine. `root` lets a sysroot stand for the device.
"""

from __future__ import annotations

import glob
import os
import struct
from pathlib import Path

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5
# e_machine of the platforms the workflow runs on, by platform.machine().
MACHINES = {"aarch64": 183, "x86_64": 62}
MULTIARCH = {"aarch64": "aarch64-linux-gnu", "x86_64": "x86_64-linux-gnu"}


def _header(path: Path) -> tuple[str, int, list[tuple[int, int, int, int, int]]] | None:
    """(byte order, e_machine, program headers as (type, offset, vaddr, filesz, align)) of a 64-bit
    ELF file, or None if it is not one."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return None
        order = "<" if header[5] == 1 else ">"
        (machine,) = struct.unpack_from(order + "H", header, 18)
        (phoff,) = struct.unpack_from(order + "Q", header, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", header, 54)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    segments = []
    for index in range(phnum):
        base = index * phentsize
        (kind,) = struct.unpack_from(order + "I", table, base)
        offset, vaddr = struct.unpack_from(order + "QQ", table, base + 8)
        (filesz,) = struct.unpack_from(order + "Q", table, base + 32)
        (align,) = struct.unpack_from(order + "Q", table, base + 48)
        segments.append((kind, offset, vaddr, filesz, align))
    return order, machine, segments


def load_alignment(path: Path) -> int | None:
    """The smallest alignment of a loadable segment of a 64-bit ELF file (None if not ELF64)."""
    parsed = _header(path)
    aligns = [align for kind, _, _, _, align in parsed[2] if kind == PT_LOAD] if parsed else []
    return min(aligns) if aligns else None


def machine(path: Path) -> int | None:
    """The e_machine of a 64-bit ELF file (MACHINES), or None if it is not one."""
    parsed = _header(path)
    return parsed[1] if parsed else None


def needed(path: Path) -> list[str]:
    """The sonames a 64-bit ELF file links (its DT_NEEDED entries, in order); [] if none or not ELF64."""
    parsed = _header(path)
    if not parsed:
        return []
    order, _, segments = parsed
    dynamic = next((s for s in segments if s[0] == PT_DYNAMIC), None)
    if dynamic is None:
        return []
    with open(path, "rb") as handle:
        handle.seek(dynamic[1])
        entries = handle.read(dynamic[3])
        names, strtab = [], None
        for tag, value in struct.iter_unpack(order + "qQ", entries[: len(entries) // 16 * 16]):
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                names.append(value)
            elif tag == DT_STRTAB:
                strtab = value
        # DT_STRTAB is an address: the loadable segment that maps it gives its place in the file.
        segment = next((s for s in segments if s[0] == PT_LOAD and s[2] <= (strtab or 0) < s[2] + s[3]), None)
        if strtab is None or segment is None:
            return []
        start = strtab - segment[2] + segment[1]
        sonames = []
        for name in names:
            handle.seek(start + name)
            sonames.append(handle.read(256).split(b"\0", 1)[0].decode(errors="replace"))
    return sonames


def _ld_so_conf(root: Path, conf: str, seen: set[str]) -> list[str]:
    """The folders `conf` (a device path) names, following its `include` lines (globs, relative
    ones from the including file's folder)."""
    if conf in seen:
        return []
    seen.add(conf)
    try:
        text = (root / conf.lstrip("/")).read_text(errors="replace")
    except OSError:
        return []
    folders = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["include"]:
            for pattern in words[1:]:
                pattern = pattern if pattern.startswith("/") else f"{os.path.dirname(conf)}/{pattern}"
                for match in sorted(glob.glob(str(root / pattern.lstrip("/")))):
                    folders += _ld_so_conf(root, "/" + str(Path(match).relative_to(root)), seen)
        elif words:
            folders.append(words[0])
    return folders


def library_folders(machine_name: str, root: Path = Path("/"), environ: dict | None = None) -> list[str]:
    """The folders (device paths) the dynamic loader searches for a soname, in its order:
    LD_LIBRARY_PATH, /etc/ld.so.conf's (its cache), then glibc's defaults with Debian's multiarch ones."""
    environ = os.environ if environ is None else environ
    folders = [f for f in environ.get("LD_LIBRARY_PATH", "").split(":") if f]
    folders += _ld_so_conf(Path(root), "/etc/ld.so.conf", set())
    triplet = MULTIARCH.get(machine_name)
    if triplet:
        folders += [f"/lib/{triplet}", f"/usr/lib/{triplet}"]
    folders += ["/lib", "/usr/lib", "/lib64", "/usr/lib64"]
    return list(dict.fromkeys(folders))


def find_library(soname: str, machine_name: str, root: Path = Path("/"), environ: dict | None = None) -> str | None:
    """Where the loader of a `machine_name` device with its files under `root` finds `soname` (a
    device path), or None: a file built for another machine does not count, as the loader skips it."""
    wanted = MACHINES.get(machine_name)
    for folder in library_folders(machine_name, root, environ):
        candidate = Path(root) / folder.lstrip("/") / soname
        if candidate.is_file() and (wanted is None or machine(candidate) == wanted):
            return f"{folder.rstrip('/')}/{soname}"
    return None
