"""The performance benchmark: our .pte, eager FP32 PyTorch, llama.cpp and LiteRT-LM on the same
checkpoint, on this host, and a table that sets them side by side with what each workflow step
cost (wall time from Snakemake's benchmark files, peak RSS as each step recorded it).

The .pte, eager and llama.cpp offer `step(tokens, start_pos) -> logits` and are timed by
`device_bench.timed_runs` (prefill in one call, then one call per decoded token), the device
benchmark's loop, so their numbers differ only by the engine. LiteRT-LM offers no such step: it is
timed by its runtime's own benchmark, as on a device (`peer_bench.bench_litert`). Each engine runs
in a process of its own (one rule each), so one's memory and threads never weigh on another's,
and the machine's load is sampled around each (`peer_bench.timed_with_load`).
"""

from __future__ import annotations

import csv
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .artifacts import atomic_output, package_versions, read_json, write_json
from .artifacts import peak_rss_bytes
from .bandwidth import annotate_runs, measure_in_child
from .device_bench import synthetic_prompt, timed_runs
from .peer_bench import BUSY_SHARE, bench_litert as run_litert_engine, ratios, timed_with_load
from .runtime import greedy_decode
from .weight_bytes import readable_weight_bytes, weight_bytes

log = logging.getLogger(__name__)

ENGINES = ("pte", "eager", "llamacpp")  # timed by our loop; LiteRT-LM by its own (bench_litert)
PEER_ENGINES = ("llamacpp", "eager", "litert")
GGUF_TYPES = {"q4_0": 2, "q4_k_m": 15, "q8_0": 7, "f16": 1}  # llama_ftype values (llama.h)


class EagerDecoder:
    """The eager FP32 transformers model as it ships: its own attention and its own growing cache
    (which keeps a window's worth on sliding layers). A call at position 0 starts a new sequence."""

    def __init__(self, model, max_seq_len: int):
        self.model, self.max_seq_len, self.cache = model, max_seq_len, None

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        from transformers import DynamicCache

        if start_pos == 0:
            self.cache = DynamicCache(config=self.model.config)
        if start_pos + len(tokens) > self.max_seq_len:
            raise ValueError(f"position {start_pos + len(tokens)} is past max_seq_len {self.max_seq_len}")
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(start_pos, start_pos + len(tokens), dtype=torch.long).unsqueeze(0)
        with torch.no_grad():
            output = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        return output.logits[0, -1]


class LlamaCppDecoder:
    """A GGUF model in llama.cpp (llama-cpp-python's bindings); `step` returns the last token's
    logits, and with `all_logits` `logits_of` returns every position's (the quality step's)."""

    def __init__(self, gguf_path: Path, max_seq_len: int, threads: int, all_logits: bool = False):
        import llama_cpp
        from llama_cpp import Llama

        # Prompts go in batches of up to 512 tokens, llama-bench's default micro-batch: a long context
        # then costs llama.cpp no more scratch memory than a short one.
        batch = min(max_seq_len, 512)
        self.llm = Llama(model_path=str(gguf_path), n_ctx=max_seq_len, n_batch=batch, n_ubatch=batch,
                         n_threads=threads, n_threads_batch=threads, logits_all=all_logits, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        # The CPU features llama.cpp was built with and uses (AVX2, NEON, REPACK, ...).
        self.info = {"system_info": llama_cpp.llama_print_system_info().decode().strip()}

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        import numpy as np

        if start_pos != self.llm.n_tokens:
            if start_pos != 0:
                raise ValueError(f"llama.cpp context holds {self.llm.n_tokens} tokens, asked to continue at {start_pos}")
            self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab_size,)))

    def logits_of(self, tokens: list[int]) -> torch.Tensor:
        """Logits at every position of `tokens`, fed from position 0 in one batch (needs all_logits)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(self.llm.scores[: len(tokens)].copy())

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (from the GGUF's vocabulary), without BOS."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def set_threads(threads: int) -> None:
    """One thread count for every engine: torch's intra-op pool and ExecuTorch's threadpool."""
    torch.set_num_threads(threads)
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


def open_engine(engine: str, artifact: Path, max_seq_len: int, threads: int):
    if engine == "pte":
        from .runtime import PteDecoder

        return PteDecoder(artifact)
    if engine == "eager":
        from .pipeline import load_checkpoint

        model, _ = load_checkpoint(artifact)
        return EagerDecoder(model, max_seq_len)
    if engine == "llamacpp":
        return LlamaCppDecoder(artifact, max_seq_len, threads)
    raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")


def bench_engine(engine: str, artifact: Path, spec: dict, vocab_size: int, bos_id: int, out: Path) -> dict:
    """llama-bench's shape: a warm-up, then `repetitions` timed generations per prompt length."""
    threads = int(spec["threads"])
    set_threads(threads)
    # This host's memory read bandwidth at the same threads, just before the engine holds any memory,
    # and the weight bytes a decoded token of its artifact reads (eager's FP32 checkpoint: not counted).
    limit = measure_in_child(threads)
    log.info("%s: memory read bandwidth at %d threads: %.1f ± %.1f GB/s (%s)", engine, threads,
             limit["gb_per_s"]["avg"], limit["gb_per_s"]["stddev"], limit["method"])
    weights = weight_bytes(Path(artifact)) if engine in ("pte", "llamacpp") else None
    started = time.perf_counter()
    decoder = open_engine(engine, Path(artifact), int(spec["max_seq_len"]), threads)
    load_s = time.perf_counter() - started
    log.info("%s: loaded %s in %.1f s", engine, artifact, load_s)
    def all_lengths():
        runs = []
        for length in spec["prompt_lengths"]:
            def progress(index, sample, length=length):
                log.info("%s: prompt %d, repetition %d/%d: prefill %.1f tok/s, decode %.2f tok/s", engine, length,
                         index + 1, spec["repetitions"], sample["prefill_tps"], sample["decode_tps"])

            runs.append(timed_runs(decoder, synthetic_prompt(length, bos_id, vocab_size), spec, progress))
        return runs

    runs, load = timed_with_load(all_lengths)
    warn_if_busy(engine, load)
    annotate_runs(runs, weights, limit)
    # A few greedy tokens, so the table can say whether two engines computed the same thing.
    greedy = greedy_decode(decoder.step, synthetic_prompt(spec["prompt_lengths"][0], bos_id, vocab_size), 8)
    result = {
        "engine": engine,
        "artifact": str(artifact),
        "threads": threads,
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "runs": runs,
        "load": load,
        "bandwidth": limit,
        "weight_bytes": weights,
        "greedy_tokens": greedy,
        "engine_info": getattr(decoder, "info", None),
        "versions": package_versions(("torch", "executorch", "transformers", "llama_cpp_python")),
    }
    write_json(out, result)
    return result


def warn_if_busy(engine: str, load: dict) -> None:
    if load["busy"]:
        log.warning("%s: other processes used more than %.0f %% of the CPU around its runs (load average %.1f): "
                    "its figures are not clean; re-run on a quiet machine", engine, 100 * BUSY_SHARE,
                    load["after"]["loadavg_1m"])


def bench_litert(model: Path, spec: dict, requirements: Path, out: Path) -> dict:
    """LiteRT-LM on `model` (.litertlm) with the litert-lm-api wheel for this host, timed by its
    runtime's own benchmark as on a device; a LiteRT-LM that cannot run here is recorded with the
    reason, as on a device, and the table says so."""
    import platform

    from . import litert_runtime
    from .artifacts import manifest_path

    recipe = read_json(manifest_path(model))["params"]
    peer = {"recipe": f"{recipe['quantization']}" + (f"-g{recipe['group_size']}" if recipe.get("group_size") else ""),
            "model": str(model), "max_seq_len": int(spec["max_seq_len"])}
    try:
        version = litert_runtime.pinned_version(requirements)
        wheel, _ = litert_runtime.fetch_cached(version, platform.machine(), litert_runtime.default_cache(),
                                               ".".join(platform.python_version_tuple()[:2]))
        peer["binary"] = str(wheel)
    except litert_runtime.RuntimeUnavailable as error:
        peer.update(available=False, reason=str(error))
    limit = measure_in_child(int(spec["threads"]))
    result = {**run_litert_engine(peer, {**spec, "threads": int(spec["threads"])}, 3600), "bandwidth": limit}
    if result["available"]:
        result["weight_bytes"] = readable_weight_bytes(Path(model))
        annotate_runs(result["runs"], result["weight_bytes"], limit)
        warn_if_busy("litert", result["load"])
        first = result["runs"][0]
        log.info("litert: prompt %d: prefill %.1f tok/s, decode %.2f tok/s", first["prompt_tokens"],
                 first["prefill_tps"]["avg"], first["decode_tps"]["avg"])
    else:
        log.warning("litert: not available: %s", result["reason"])
    write_json(out, {**result, "artifact": str(model)})
    return result


# --- GGUF: llama.cpp's own converter on the same checkpoint, then llama.cpp's quantizer ---------


def convert_to_gguf(converter: Path, checkpoint_manifest: Path, gguf_type: str, threads: int, out: Path) -> dict:
    """Write `out` (GGUF at `gguf_type`) from the checkpoint the workflow downloaded."""
    converter = Path(converter)
    if not converter.is_file():
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {converter}: run bench/setup-llamacpp.sh once (it builds "
            "llama-cpp-python from source and unpacks its convert_hf_to_gguf.py)")
    checkpoint = read_json(checkpoint_manifest)
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".gguf-") as scratch:
        f32 = Path(scratch) / "model-f32.gguf"
        command = [sys.executable, str(converter), checkpoint["path"], "--outtype", "f32", "--outfile", str(f32)]
        log.info("converting: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        log.info("converter output:\n%s", done.stdout[-4000:] + done.stderr[-8000:])
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        with atomic_output(out) as tmp:
            quantize_gguf(f32, tmp, gguf_type, threads)
    # The converter by name and release, not by path: manifests never name this checkout.
    return {"gguf_type": gguf_type, "converter": converter.name, "checkpoint_commit": checkpoint.get("commit"),
            "llama_cpp_python": package_versions(("llama_cpp_python",))["llama_cpp_python"]}


def quantize_gguf(source: Path, out: Path, gguf_type: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[gguf_type]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to {gguf_type} failed with status {status}")


# --- the table ----------------------------------------------------------------------------------


def read_step_cost(benchmark: Path, peak_from: Path | None) -> dict:
    """Wall seconds from the step's Snakemake `benchmark:` file; peak RSS (MB) as the step itself
    recorded it (`peak_rss_mb`/`peak_rss_bytes` in its manifest or result), else Snakemake's
    sampled max_rss, which can miss a short spike."""
    with open(benchmark, newline="", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    cost = {"wall_s": float(row["s"]), "peak_rss_mb": _number(row.get("max_rss")), "peak_rss_source": "sampled"}
    recorded = read_json(peak_from) if peak_from and Path(peak_from).exists() else {}
    if "peak_rss_mb" in recorded or "peak_rss_bytes" in recorded:
        cost["peak_rss_mb"] = recorded.get("peak_rss_mb") or recorded["peak_rss_bytes"] / 2**20
        cost["peak_rss_source"] = "recorded"
    return cost


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def decode_ratio(results: dict) -> list[dict]:
    """Per prompt length: the .pte's decode and prefill tok/s over llama.cpp's and over eager's
    (peer_bench.ratios, the device benchmark's, laid out one row per prompt length)."""
    rows = {run["prompt_tokens"]: {"prompt_tokens": run["prompt_tokens"]} for run in results["pte"]["runs"]}
    others = {name: results[name] for name in PEER_ENGINES if name in results}
    for ratio in ratios(results["pte"]["runs"], others):
        rows[ratio["prompt_tokens"]][f"decode_vs_{ratio['engine']}"] = ratio["decode"]
        rows[ratio["prompt_tokens"]][f"prefill_vs_{ratio['engine']}"] = ratio["prefill"]
    return list(rows.values())


def build_report(engine_files: dict, step_files: dict, pte_manifest: Path, gguf_manifest: Path, checkpoint: Path) -> dict:
    results = {engine: read_json(path) for engine, path in engine_files.items()}
    steps = {name: read_step_cost(files["benchmark"], files["peak_from"])
             for name, files in step_files.items() if Path(files["benchmark"]).exists()}
    pte, gguf, model = read_json(pte_manifest), read_json(gguf_manifest), read_json(checkpoint)
    from .checkpoint import read_text_config_dict

    text_config = read_text_config_dict(Path(model["path"]))
    return {
        "schema": "gemma-edge.perf/1",
        "model": {"repo_id": model["repo_id"], "commit": model["commit"], "checkpoint_bytes": model["total_bytes"],
                  "layers": int(text_config["num_hidden_layers"]), "parameters": parameter_count_of(text_config)},
        "host": {"machine": os.uname().machine, "cores": os.cpu_count()},
        "steps": steps,
        "pte": {"size_bytes": pte["size_bytes"], "lowering": pte.get("lowering"), "quantization_params": pte.get("program_params")},
        "gguf": {"gguf_type": gguf["params"]["gguf_type"], "size_bytes": gguf["size_bytes"], "sha256": gguf["sha256"]},
        "litert": litert_facts(results.get("litert")),
        "engines": results,
        "ratios": decode_ratio(results),
        "same_greedy_tokens": same_greedy_tokens(results),
        "versions": package_versions(("torch", "executorch", "torchao", "transformers", "llama_cpp_python")),
    }


def litert_facts(result: dict | None) -> dict | None:
    """The .litertlm LiteRT-LM ran: its recipe and size (None when LiteRT-LM was not timed)."""
    if result is None:
        return None
    artifact = Path(result["artifact"])
    return {"recipe": result.get("recipe"), "size_bytes": artifact.stat().st_size if artifact.exists() else None}


def same_greedy_tokens(results: dict) -> dict:
    """Per engine: does it generate eager FP32's greedy tokens (None when eager was not timed, or
    for LiteRT-LM, whose benchmark does not decode the same synthetic prompt)?"""
    if "eager" not in results:
        return {engine: None for engine in results}
    return {engine: result["greedy_tokens"] == results["eager"]["greedy_tokens"] if "greedy_tokens" in result else None
            for engine, result in results.items()}


def render_table(report: dict) -> str:
    """Markdown: steps (wall, RSS), sizes, then tok/s mean ± stddev per engine and prompt length."""
    lines = ["| step | wall s | peak RSS MiB |", "|---|---:|---:|"]
    for name, step in report["steps"].items():
        rss = "" if step["peak_rss_mb"] is None else f"{step['peak_rss_mb']:.0f}"
        mark = "*" if step.get("peak_rss_source") == "sampled" else ""
        lines.append(f"| {name} | {step['wall_s']:.1f} | {rss}{mark} |")
    lines.append("\n\\* sampled by Snakemake's benchmark (may miss short spikes); others recorded by the step itself")
    sizes = f".pte: {report['pte']['size_bytes'] / 1e6:.1f} MB; GGUF {report['gguf']['gguf_type']}: {report['gguf']['size_bytes'] / 1e6:.1f} MB"
    litert = report.get("litert")
    if litert and litert["size_bytes"]:
        sizes += f"; .litertlm {litert['recipe']}: {litert['size_bytes'] / 1e6:.1f} MB"
    lines += ["", sizes, ""]
    lines += ["| engine | prompt | prefill tok/s | decode tok/s | load s | peak RSS MiB | same greedy tokens as eager | "
              "weight MB/token | bandwidth GB/s | fraction of bandwidth |",
              "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    busy = []
    for engine, result in report["engines"].items():
        if not result.get("available", True):
            lines.append(f"| {engine} | — | not available: {result['reason']} | | | | | | | |")
            continue
        if result.get("load", {}).get("busy"):
            busy.append(engine)
        limit = result.get("bandwidth")
        for run in result["runs"]:
            pre, dec = run["prefill_tps"], run["decode_tps"]
            per_token = run.get("weight_bytes_per_token")
            lines.append(f"| {engine} | {run['prompt_tokens']} | {pre['avg']:.1f} ± {pre['stddev']:.1f} | "
                         f"{dec['avg']:.2f} ± {dec['stddev']:.2f} | {result['load_s']:.1f} | "
                         f"{result['peak_rss_bytes'] / 2**20:.0f} | {_cell(report['same_greedy_tokens'][engine])} | "
                         f"{_cell(per_token and per_token / 1e6)} | "
                         f"{_cell(limit and limit['gb_per_s']['avg'])} | {_cell(run.get('bandwidth_fraction'))} |")
    lines.append("\nweight MB/token: bytes of weights a decoded token reads (linears and lm_head whole, one row of each "
                 "embedding table); bandwidth: this host's memory read bandwidth at the same threads, measured in the "
                 "engine's own job just before it; fraction: weight MB/token × decode tok/s over that bandwidth")
    if busy:
        lines += ["", f"**Busy machine** while timing {', '.join(busy)}: other processes used more than "
                      f"{100 * BUSY_SHARE:.0f} % of the CPU around the runs (perf.json `load`); those figures are not clean."]
    names = {"llamacpp": "llama.cpp", "eager": "eager", "litert": "LiteRT-LM"}
    peers = ["llamacpp", "eager"] + (["litert"] if "litert" in report["engines"] else [])  # eager left out: "—"
    header = " | ".join(f"{phase} .pte/{names[name]}" for name in peers for phase in ("decode", "prefill"))
    lines += ["", f"| prompt | {header} |", "|---:|" + "---:|" * (2 * len(peers))]
    for row in report["ratios"]:
        cells = [row.get(f"{phase}_vs_{name}") for name in peers for phase in ("decode", "prefill")]
        lines.append(f"| {row['prompt_tokens']} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    """A table cell: ratios to two decimals, an engine left out as "—"."""
    if value is None:
        return "—"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_report(report: dict, out_json: Path, out_table: Path) -> str:
    table = render_table(report)
    with atomic_output(out_table) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    write_json(out_json, report)
    return table


# --- projecting to full depth ---------------------------------------------------------------------


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) through (x, y) points; at least two distinct x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(set(xs)) < 2:
        raise ValueError(f"a projection needs benchmarks at two or more depths, got layers {sorted(set(xs))}")
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def project_steps(reports: list[dict], target_parameters: int) -> list[dict]:
    """Per step: peak RSS and wall time measured on each model, their growth per parameter (least
    squares), and the straight-line projection to `target_parameters` (E2B's). Parameters, not
    layers, are the axis: a cut model's layers are not an average E2B layer (E2B's 20 KV-shared
    layers have double-wide MLPs), but every byte of weights is a byte to hold."""
    sizes = [r["model"]["parameters"] for r in reports]
    rows = []
    for name in reports[0]["steps"]:
        if not all(name in r["steps"] and r["steps"][name]["peak_rss_mb"] is not None for r in reports):
            continue
        row = {"step": name, "measured": {}}
        for quantity in ("peak_rss_mb", "wall_s"):
            points = [(n, r["steps"][name][quantity]) for n, r in zip(sizes, reports)]
            intercept, slope = fit_line(points)
            row["measured"][quantity] = {str(n): v for n, v in points}
            row[f"{quantity}_per_billion_parameters"] = slope * 1e9
            row[f"{quantity}_projected"] = intercept + slope * target_parameters
        rows.append(row)
    return rows


def render_projection(rows: list[dict], target_parameters: int, layers: int) -> str:
    sizes = sorted({int(n) for row in rows for n in row["measured"]["peak_rss_mb"]})
    head = " | ".join(f"RSS MiB @{n / 1e9:.2f} B" for n in sizes)
    target = f"{layers} layers, {target_parameters / 1e9:.2f} B"
    lines = [f"| step | {head} | MiB per B params | projected RSS MiB ({target}) | projected wall s ({target}) |",
             "|---|" + "---:|" * (len(sizes) + 3)]
    for row in rows:
        measured = " | ".join(f"{row['measured']['peak_rss_mb'][str(n)]:.0f}" for n in sizes)
        lines.append(f"| {row['step']} | {measured} | {row['peak_rss_mb_per_billion_parameters']:.0f} | "
                     f"{row['peak_rss_mb_projected']:.0f} | {row['wall_s_projected']:.0f} |")
    return "\n".join(lines)


def parameter_count_of(text_config: dict) -> int:
    """Parameters of the Gemma 4 text decoder a config describes, counted on the meta device."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from .e2b_shape import parameter_count

    config = Gemma4TextConfig(**{k: v for k, v in text_config.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        return parameter_count(Gemma4ForCausalLM(config))
