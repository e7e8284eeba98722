"""Does a .pte decode on a board with less memory than this host? Its greedy tokens in a process of
its own, once without a limit and once inside a memory cgroup whose limit stands for the board's
memory less its OS (3 GiB for a 4 GB Pi 5), and whether the two agree.

    python -m gemma_edge.measure.memory_limit results/e2b-35l/int4-g128/xnnpack-auto/model.pte --limit-mib 3072

A cgroup's limit counts a process's anonymous pages (heap, packed weights, planned buffers) and
the page cache it touches (the mmapped .pte); without swap, only the page cache can be taken back,
so a program fits when its anonymous peak does and its pages are not locked (device/page_locks.py),
at the cost of re-reading file pages. Creating a
cgroup needs root (cgroup v1's memory controller, or v2 with `memory` enabled): what the kernel
offers is checked first and a missing piece is one sentence. Run it on a quiet machine: the
decode speeds it prints beside each other are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gemma_edge.device.files import write_json
from gemma_edge.device.page_locks import release_page_cache

MIB = 2**20
V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """This host cannot put a process under a memory limit (not root, no memory controller)."""


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup made for one child process: its folder and the controller's version."""

    path: Path
    version: int

    @classmethod
    def create(cls, limit_bytes: int, name: str) -> MemoryCgroup:
        parent, version = find_controller()
        path = parent / name
        try:
            path.mkdir()
        except OSError as error:
            raise CgroupUnavailable(f"a memory cgroup could not be made at {path}: {error.strerror}") from error
        group = cls(path, version)
        try:
            if version == 1:
                group.write("memory.limit_in_bytes", limit_bytes)
                if (path / "memory.memsw.limit_in_bytes").exists():  # no swap to escape to either
                    group.write("memory.memsw.limit_in_bytes", limit_bytes)
            else:
                group.write("memory.max", limit_bytes)
                group.write("memory.swap.max", 0)
        except OSError as error:
            group.remove()
            raise CgroupUnavailable(f"the memory limit could not be set in {path}: {error.strerror}") from error
        return group

    def write(self, name: str, value) -> None:
        (self.path / name).write_text(str(value))

    def join(self) -> None:
        """Move the calling process into the group (a child calls it before it execs)."""
        self.write("cgroup.procs", os.getpid())

    def peak_bytes(self) -> int | None:
        """The most memory the group held, page cache included (v2 before 5.19 keeps no peak)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        peak = self.path / name
        return int(peak.read_text()) if peak.exists() else None

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer took from the group."""
        text = (self.path / ("memory.oom_control" if self.version == 1 else "memory.events")).read_text()
        counts = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        return int(counts.get("oom_kill", 0))

    def remove(self) -> None:
        self.path.rmdir()


def unavailable() -> str | None:
    """Why this host cannot run the check, or None."""
    try:
        find_controller()
    except CgroupUnavailable as error:
        return str(error)
    return None


def find_controller() -> tuple[Path, int]:
    """Where a new memory cgroup goes: below this process's own group where the mount shows it
    (so the new one counts within whatever limits this one already has), else at the mount's root."""
    if os.geteuid() != 0:
        raise CgroupUnavailable("a memory limit needs root (a cgroup is made for the child process)")
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path.lstrip("/")
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        nested = V1_ROOT / own.get("memory", "")
        return (nested if nested.is_dir() else V1_ROOT), 1
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        nested = V2_ROOT / own.get("", "")
        return (nested if nested.is_dir() else V2_ROOT), 2
    raise CgroupUnavailable("this host has no cgroup memory controller (cgroup v1 `memory` or v2 with `memory` enabled)")


def decode(pte: Path, prompt_tokens: int, new_tokens: int) -> dict:
    """In the child: load the .pte, greedy-decode `new_tokens` after a synthetic prompt of
    `prompt_tokens` (the tokens compared), then time one more generation of the same (the speeds
    compared); report them with the resident memory it took."""
    from gemma_edge.device.memory import ResidentPeaks
    from gemma_edge.device.runtime import PteDecoder, greedy_decode
    from gemma_edge.device.timing import synthetic_prompt, time_generation

    with ResidentPeaks() as resident:
        started = time.perf_counter()
        decoder = PteDecoder(pte)
        load_s = time.perf_counter() - started
        meta = decoder.metadata
        prompt = synthetic_prompt(prompt_tokens, int(meta["get_bos_id"]), int(meta["get_vocab_size"]))
        tokens = greedy_decode(decoder.step, prompt, new_tokens)
        timed = time_generation(decoder, prompt, new_tokens)
    return {
        "tokens": tokens,
        "load_s": load_s,
        "prefill_tps": timed["prefill_tps"],
        "decode_tps": timed["decode_tps"],
        "resident": resident.summary(),
    }


def run_child(pte: Path, prompt_tokens: int, new_tokens: int, group: MemoryCgroup | None) -> dict:
    """`decode` in a process of its own (inside `group` from its first instruction on, if given):
    its report, or how it ended (`exit`: a negative number is the signal that ended it)."""
    argv = [sys.executable, "-m", "gemma_edge.measure.memory_limit", str(pte), "--decode-only"]
    argv += ["--prompt", str(prompt_tokens), "--tokens", str(new_tokens)]
    # Each child reads the .pte from disk, so its cgroup is charged for what it reads (a page is
    # charged to the group that first reads it; libraries other processes cached stay theirs).
    release_page_cache(pte)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=group.join if group else None)
    report = {"exit": done.returncode, "wall_s": time.perf_counter() - started}
    if done.returncode == 0:
        report.update(json.loads(done.stdout.strip().splitlines()[-1]))
    else:
        report["stderr_tail"] = done.stderr.strip().splitlines()[-5:]
    return report


def check(pte: Path, limit_bytes: int, prompt_tokens: int = 64, new_tokens: int = 16) -> dict:
    """The .pte's greedy tokens without a limit, then under `limit_bytes`; whether they agree."""
    unlimited = run_child(pte, prompt_tokens, new_tokens, None)
    if unlimited["exit"] != 0:
        raise RuntimeError(f"{pte} did not decode even without a limit: {' | '.join(unlimited['stderr_tail'])}")
    group = MemoryCgroup.create(limit_bytes, f"gemma-edge-limit-{os.getpid()}")
    try:
        limited = run_child(pte, prompt_tokens, new_tokens, group)
        limited["cgroup_peak_bytes"] = group.peak_bytes()
        limited["oom_kills"] = group.oom_kills()
    finally:
        group.remove()
    return {
        "pte": str(pte),
        "limit_bytes": limit_bytes,
        "cgroup_version": group.version,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "unlimited": unlimited,
        "limited": limited,
        "fits": limited["exit"] == 0 and limited["tokens"] == unlimited["tokens"],
    }


def verdict(result: dict) -> str:
    """One sentence on the check."""
    limit = f"{result['limit_bytes'] / MIB:,.0f} MiB"
    limited, unlimited = result["limited"], result["unlimited"]
    if limited["exit"] != 0:
        how = "by the kernel's OOM killer" if limited["oom_kills"] else f"with exit status {limited['exit']}"
        return (
            f"{result['pte']} does not fit in {limit}: it was ended {how}; without a limit its anonymous memory "
            f"peaked at {unlimited['resident']['anon_peak_bytes'] / MIB:,.0f} MiB, and that part cannot be reclaimed"
        )
    same = "the same" if result["fits"] else "DIFFERENT"
    return (
        f"{result['pte']} decodes in {limit} with {same} {result['new_tokens']} tokens as without a limit; "
        f"the group peaked at {(limited['cgroup_peak_bytes'] or 0) / MIB:,.0f} MiB, anonymous "
        f"{limited['resident']['anon_peak_bytes'] / MIB:,.0f} MiB; decode {limited['decode_tps']:.2f} tok/s against "
        f"{unlimited['decode_tps']:.2f}, prefill {limited['prefill_tps']:.1f} against {unlimited['prefill_tps']:.1f}, "
        f"load {limited['load_s']:.1f} s against {unlimited['load_s']:.1f} s without it"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pte", type=Path)
    parser.add_argument("--limit-mib", type=int, default=3072, help="the memory limit (default 3072: a 4 GB Pi 5 less its OS)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens compared (default 16)")
    parser.add_argument("--out", type=Path, help="also write the whole result as JSON here")
    parser.add_argument("--decode-only", action="store_true", help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args(argv)
    if args.decode_only:
        print(json.dumps(decode(args.pte, args.prompt, args.tokens)))
        return 0
    try:
        result = check(args.pte, args.limit_mib * MIB, args.prompt, args.tokens)
    except (CgroupUnavailable, RuntimeError) as error:
        print(f"memory_limit: {error}", file=sys.stderr)
        return 2
    if args.out:
        write_json(args.out, result)
    print(verdict(result))
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
