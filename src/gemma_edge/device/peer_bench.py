"""The peers on the device: llama.cpp's own `llama-bench` on the GGUFs and LiteRT-LM on its
.litertlm beside the .pte, and how busy the machine was around each engine's run. Standard
library only: it runs on the device.

llama-bench is run twice per GGUF, so that its figures line up with the .pte's loop (a prefill of
the prompt, then single-token decode steps after it):

    llama-bench -p L1,L2 -n 0          prefill: prompt-processing tok/s of an L-token prompt
    llama-bench -p 0 -n N -d L1,L2     decode: N single-token steps after a context of L tokens

each with `-r repetitions -t threads -o json` and llama-bench's own single warm-up run.

LiteRT-LM runs in a process of its own (`litert_bench`, the runtime's own timers, see there), with
the litert-lm-api wheel the deploy step pushed unpacked into a scratch folder on its
`PYTHONPATH`: nothing is installed on the device, and the runtime's memory is gone when it ends.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from gemma_edge.device.memory import ResidentPeaks, highest

LOAD_WINDOW_S = 1.0
# Other processes using more than this share of the machine's CPU time around a run make it busy:
# llama.cpp's decode collapses when its threads are oversubscribed (1.45 against 32.65 tok/s).
BUSY_SHARE = 0.10


def _process_cpu_ticks(own: set[int]) -> dict[int, tuple[str, int]]:
    """utime + stime (clock ticks) and name of every process but `own`."""
    ticks = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name = text[text.find("(") + 1 : text.rfind(")")]
        fields = text[text.rfind(")") + 2 :].split()
        ticks[int(entry.name)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def machine_load(window_s: float = LOAD_WINDOW_S) -> dict:
    """How busy the machine is while this process idles for `window_s`: load average, the share of
    all CPU time other processes took, and the busiest of them (pyperf checks the same before it
    trusts a run)."""
    own = {os.getpid()}
    before = _process_cpu_ticks(own)
    started = time.monotonic()
    time.sleep(window_s)
    after = _process_cpu_ticks(own)
    elapsed = time.monotonic() - started
    hertz = os.sysconf("SC_CLK_TCK")
    cores = os.cpu_count() or 1
    used = {pid: (name, (ticks - before[pid][1]) / hertz) for pid, (name, ticks) in after.items() if pid in before}
    busiest = sorted(((seconds, name, pid) for pid, (name, seconds) in used.items() if seconds > 0), reverse=True)[:3]
    # Clock ticks are coarse (10 ms): a saturated machine can add up to a little over all its cores.
    share = min(sum(seconds for _, seconds in used.values()) / (elapsed * cores), 1.0)
    return {
        "loadavg_1m": os.getloadavg()[0],
        "other_cpu_share": round(share, 4),
        "busiest": [{"pid": pid, "name": name, "cpu_share": round(seconds / elapsed, 3)} for seconds, name, pid in busiest],
    }


def timed_with_load(run) -> tuple[object, dict]:
    """`run()`'s result, and the machine's load sampled just before and just after it."""
    before = machine_load()
    result = run()
    after = machine_load()
    busy = max(before["other_cpu_share"], after["other_cpu_share"]) > BUSY_SHARE
    return result, {"before": before, "after": after, "busy": busy}


def summarise(samples: list[float]) -> dict:
    """Mean, spread and the samples themselves, as llama-bench reports them (avg_ts, stddev_ts, samples_ts)."""
    return {
        "avg": statistics.fmean(samples),
        "stddev": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def llama_bench_argv(binary: str, gguf: str, spec: dict, phase: str) -> list[str]:
    lengths = ",".join(str(n) for n in spec["prompt_lengths"])
    argv = [binary, "-m", gguf, "-r", str(spec["repetitions"]), "-o", "json"]
    if spec.get("threads"):
        argv += ["-t", str(spec["threads"])]
    if phase == "prefill":
        return argv + ["-p", lengths, "-n", "0"]
    return argv + ["-p", "0", "-n", str(spec["new_tokens"]), "-d", lengths]


def run_llama_bench(argv: list[str], timeout_s: float) -> tuple[list[dict], dict]:
    """llama-bench's JSON rows and its resident memory's peaks (memory.ResidentPeaks, sampled from
    outside); RuntimeError with its stderr's last lines if it fails."""
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as error:
        raise RuntimeError(f"llama-bench could not be started: {error}") from error
    with ResidentPeaks(process.pid) as resident:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            process.kill()
            process.communicate()
            raise RuntimeError(f"llama-bench did not finish within {timeout_s:.0f} s") from error
    tail = " | ".join(line for line in stderr.strip().splitlines()[-3:])
    if process.returncode != 0:
        raise RuntimeError(f"llama-bench exited with status {process.returncode}: {tail or 'no output'}")
    try:
        return json.loads(stdout), resident.summary()
    except json.JSONDecodeError as error:
        raise RuntimeError(f"llama-bench printed no JSON results ({error}): {tail or 'no output'}") from error


def runs_from_rows(prefill_rows: list[dict], decode_rows: list[dict], spec: dict) -> list[dict]:
    """Per prompt length, the .pte loop's shape: prefill tok/s of the prompt, decode tok/s after it."""
    prefill = {row["n_prompt"]: row for row in prefill_rows if row["n_gen"] == 0}
    decode = {row["n_depth"]: row for row in decode_rows if row["n_prompt"] == 0}
    runs = []
    for length in spec["prompt_lengths"]:
        if length not in prefill or length not in decode:
            raise RuntimeError(f"llama-bench reported no prefill of {length} tokens or no decode after them")
        runs.append(
            {
                "prompt_tokens": length,
                "new_tokens": spec["new_tokens"],
                "repetitions": spec["repetitions"],
                "prefill_tps": summarise(prefill[length]["samples_ts"]),
                "decode_tps": summarise(decode[length]["samples_ts"]),
            }
        )
    return runs


def bench_llamacpp(peer: dict, spec: dict, timeout_s: float) -> dict:
    """One GGUF under llama-bench: its runs, llama-bench's own description of the build and model,
    and the machine's load around it; `available: false` with the reason if it cannot run."""
    if not peer.get("available", True):
        return {"engine": "llamacpp", "gguf_type": peer.get("gguf_type"), "available": False, "reason": peer["reason"]}

    def both_phases():
        prefill = run_llama_bench(llama_bench_argv(peer["binary"], peer["model"], spec, "prefill"), timeout_s)
        decode = run_llama_bench(llama_bench_argv(peer["binary"], peer["model"], spec, "decode"), timeout_s)
        return prefill, decode

    started = time.perf_counter()
    try:
        ((prefill, prefill_resident), (decode, decode_resident)), load = timed_with_load(both_phases)
        runs = runs_from_rows(prefill, decode, spec)
    except RuntimeError as error:
        return {"engine": "llamacpp", "gguf_type": peer["gguf_type"], "available": False, "reason": str(error)}
    first = decode[0]
    return {
        "engine": "llamacpp",
        "gguf_type": peer["gguf_type"],
        "available": True,
        "runs": runs,
        "threads": first.get("n_threads"),
        "seconds": time.perf_counter() - started,
        "load": load,
        "resident": highest(prefill_resident, decode_resident),
        "llama_bench": {
            key: first.get(key)
            for key in (
                "build_commit",
                "build_number",
                "cpu_info",
                "backends",
                "model_type",
                "model_size",
                "model_n_params",
                "n_batch",
            )
        },
        "rows": prefill + decode,
    }


LITERT_SPEC_KEYS = ("threads", "prompt_lengths", "new_tokens", "repetitions", "warmup", "parity_prompt_ids", "max_new_tokens")


class ModuleFailed(RuntimeError):
    """A `run_module` child timed out or failed: the message names it with its last lines, `stderr`
    holds all it printed there (empty after a timeout)."""

    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


def run_module(module: str, args: list[str], timeout_s: float, what: str, path: tuple[str, ...] = ()) -> str:
    """`python -m gemma_edge.device.<module> args` in a process of its own, with this package (and `path`)
    on its PYTHONPATH: its standard output, or ModuleFailed naming `what` with its last lines."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*path, package_parent, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            [sys.executable, "-m", f"gemma_edge.device.{module}", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired as error:
        raise ModuleFailed(f"{what} did not finish within {timeout_s:.0f} s") from error
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.strip().splitlines()[-3:])
        raise ModuleFailed(f"{what} exited with status {done.returncode}: {tail or 'no output'}", done.stderr)
    return done.stdout


def run_litert_bench(wheel: str, model: str, spec: dict, timeout_s: float) -> dict:
    """`litert_bench` on `model` in a child process with `wheel` unpacked on its path; its result,
    or RuntimeError with the last lines it printed."""
    with tempfile.TemporaryDirectory(prefix="litert-") as scratch:
        site = Path(scratch, "site")
        try:
            zipfile.ZipFile(wheel).extractall(site)
        except (OSError, zipfile.BadZipFile) as error:
            raise RuntimeError(f"the litert-lm-api wheel could not be unpacked: {error}") from error
        spec_path, out_path = Path(scratch, "spec.json"), Path(scratch, "bench.json")
        spec_path.write_text(json.dumps({**spec, "cache_dir": str(Path(scratch, "cache"))}))
        run_module(
            "litert_bench",
            ["--model", model, "--spec", str(spec_path), "--out", str(out_path)],
            timeout_s,
            "LiteRT-LM's benchmark",
            path=(str(site),),
        )
        return json.loads(out_path.read_text())


def bench_litert(peer: dict, spec: dict, timeout_s: float) -> dict:
    """The .litertlm under LiteRT-LM: its runs (the runtime's own timers), greedy tokens of the
    parity prompts and the machine's load around it; `available: false` with the reason if it
    cannot run."""
    head = {"engine": "litert", "recipe": peer.get("recipe")}
    if not peer.get("available", True):
        return {**head, "available": False, "reason": peer["reason"]}
    litert_spec = {key: spec[key] for key in LITERT_SPEC_KEYS if key in spec}
    litert_spec["max_seq_len"] = peer.get("max_seq_len")
    started = time.perf_counter()
    try:
        result, load = timed_with_load(lambda: run_litert_bench(peer["binary"], peer["model"], litert_spec, timeout_s))
    except RuntimeError as error:
        return {**head, "available": False, "reason": str(error)}
    return {**result, **head, "available": True, "seconds": time.perf_counter() - started, "load": load}


def ratios(pte_runs: list[dict], engines: dict) -> list[dict]:
    """Per available engine and prompt length: the .pte's decode and prefill tok/s over the engine's,
    and where both timed it, `first_token`: the engine's time to first token over the .pte's (above
    1, the .pte's first token comes sooner). llama-bench times no first token."""
    rows = []
    for name, engine in engines.items():
        if not engine.get("available", True):
            continue
        theirs = {run["prompt_tokens"]: run for run in engine["runs"]}
        for ours in pte_runs:
            other = theirs.get(ours["prompt_tokens"])
            if other:
                row = {
                    "engine": name,
                    "prompt_tokens": ours["prompt_tokens"],
                    "decode": ours["decode_tps"]["avg"] / other["decode_tps"]["avg"],
                    "prefill": ours["prefill_tps"]["avg"] / other["prefill_tps"]["avg"],
                }
                if "ttft_s" in ours and "ttft_s" in other:
                    row["first_token"] = other["ttft_s"]["avg"] / ours["ttft_s"]["avg"]
                rows.append(row)
    return rows
