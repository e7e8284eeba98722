"""The performance table: the engines' numbers side by side, with the ratio of the .pte to each
peer, and what each workflow step cost (wall time from Snakemake's benchmark files, peak RSS as
each step recorded it)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from gemma_edge.device.files import atomic_output, read_json, write_json
from gemma_edge.device.peer_bench import BUSY_SHARE, ratios
from gemma_edge.measure.perf_projection import parameter_count_of
from gemma_edge.model.checkpoint import read_text_config_dict
from gemma_edge.peers import litertlm_file
from gemma_edge.workflow.manifest import package_versions
from gemma_edge.workflow.table import markdown_table

PEER_ENGINES = ("llamacpp", "eager", "litert")
RATIO_PHASES = ("decode", "prefill", "first_token")  # peer_bench.ratios' figures


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
    """Per prompt length: the .pte's decode and prefill tok/s over each peer's, and the peer's time to
    first token over the .pte's (peer_bench.ratios, the device benchmark's, laid out one row per
    prompt length)."""
    rows = {run["prompt_tokens"]: {"prompt_tokens": run["prompt_tokens"]} for run in results["pte"]["runs"]}
    others = {name: results[name] for name in PEER_ENGINES if name in results}
    for ratio in ratios(results["pte"]["runs"], others):
        for phase in RATIO_PHASES:
            if phase in ratio:
                rows[ratio["prompt_tokens"]][f"{phase}_vs_{ratio['engine']}"] = ratio[phase]
    return list(rows.values())


def build_report(engine_files: dict, step_files: dict, pte_manifest: Path, gguf_manifest: Path, checkpoint: Path) -> dict:
    results = {engine: read_json(path) for engine, path in engine_files.items()}
    steps = {
        name: read_step_cost(files["benchmark"], files["peak_from"])
        for name, files in step_files.items()
        if Path(files["benchmark"]).exists()
    }
    pte, gguf, model = read_json(pte_manifest), read_json(gguf_manifest), read_json(checkpoint)
    text_config = read_text_config_dict(Path(model["path"]))
    return {
        "schema": "gemma-edge.perf/1",
        "model": {
            "repo_id": model["repo_id"],
            "commit": model["commit"],
            "checkpoint_bytes": model["total_bytes"],
            "layers": int(text_config["num_hidden_layers"]),
            "parameters": parameter_count_of(text_config),
        },
        "host": {"machine": os.uname().machine, "cores": os.cpu_count()},
        "steps": steps,
        "pte": {
            "size_bytes": pte["size_bytes"],
            "lowering": pte.get("lowering"),
            "quantization_params": pte.get("program_params"),
        },
        "gguf": {"gguf_type": gguf["params"]["gguf_type"], "size_bytes": gguf["size_bytes"], "sha256": gguf["sha256"]},
        "litert": litert_facts(results.get("litert")),
        "engines": results,
        "ratios": decode_ratio(results),
        "same_greedy_tokens": same_greedy_tokens(results),
        "versions": package_versions(("torch", "executorch", "torchao", "transformers", "llama_cpp_python")),
    }


def litert_facts(result: dict | None) -> dict | None:
    """The .litertlm LiteRT-LM ran: its recipe, size, and whether its prefill signatures return
    logits (None when LiteRT-LM was not timed)."""
    if result is None:
        return None
    artifact = Path(result["artifact"])
    if not artifact.exists():
        return {"recipe": result.get("recipe"), "size_bytes": None, "prefill_logits": None}
    outputs = litertlm_file.signature_outputs(artifact)
    return {
        "recipe": result.get("recipe"),
        "size_bytes": artifact.stat().st_size,
        "prefill_logits": any("logits" in names for key, names in outputs.items() if key.startswith("prefill")),
    }


def same_greedy_tokens(results: dict) -> dict:
    """Per engine: does it generate eager FP32's greedy tokens (None when eager was not timed, or
    for LiteRT-LM, whose benchmark does not decode the same synthetic prompt)?"""
    if "eager" not in results:
        return {engine: None for engine in results}
    return {
        engine: result["greedy_tokens"] == results["eager"]["greedy_tokens"] if "greedy_tokens" in result else None
        for engine, result in results.items()
    }


def render_table(report: dict) -> str:
    """Markdown: steps (wall, RSS), sizes, then tok/s mean ± stddev per engine and prompt length."""
    steps = []
    for name, step in report["steps"].items():
        rss = "" if step["peak_rss_mb"] is None else f"{step['peak_rss_mb']:.0f}"
        steps.append([name, f"{step['wall_s']:.1f}", rss + ("*" if step.get("peak_rss_source") == "sampled" else "")])
    lines = [markdown_table(["step", "wall s", "peak RSS MiB"], steps, "lrr")]
    lines.append("\n\\* sampled by Snakemake's benchmark (may miss short spikes); others recorded by the step itself")
    sizes = (
        f".pte: {report['pte']['size_bytes'] / 1e6:.1f} MB; "
        f"GGUF {report['gguf']['gguf_type']}: {report['gguf']['size_bytes'] / 1e6:.1f} MB"
    )
    litert = report.get("litert")
    if litert and litert["size_bytes"]:
        sizes += f"; .litertlm {litert['recipe']}: {litert['size_bytes'] / 1e6:.1f} MB"
    lines += ["", sizes, ""]
    engines, busy = [], []
    for engine, result in report["engines"].items():
        if not result.get("available", True):
            engines.append([engine, "—", f"not available: {result['reason']}", *[""] * 9])
            continue
        if result.get("load", {}).get("busy"):
            busy.append(engine)
        limit = result.get("bandwidth")
        for run in result["runs"]:
            pre, dec = run["prefill_tps"], run["decode_tps"]
            per_token = run.get("weight_bytes_per_token")
            engines.append(
                [
                    engine,
                    run["prompt_tokens"],
                    f"{pre['avg']:.1f} ± {pre['stddev']:.1f}",
                    f"{dec['avg']:.2f} ± {dec['stddev']:.2f}",
                    _cell(run.get("ttft_s") and 1000 * run["ttft_s"]["avg"]),
                    f"{result['load_s']:.1f}",
                    f"{result['peak_rss_bytes'] / 2**20:.0f}",
                    resident_cell(result.get("resident")),
                    _cell(report["same_greedy_tokens"][engine]),
                    _cell(per_token and per_token / 1e6),
                    _cell(limit and limit["gb_per_s"]["avg"]),
                    _cell(run.get("bandwidth_fraction")),
                ]
            )
    headers = ["engine", "prompt", "prefill tok/s", "decode tok/s", "TTFT ms", "load s", "peak RSS MiB", "anon / file MiB"]
    headers += ["same greedy tokens as eager", "weight MB/token", "bandwidth GB/s", "fraction of bandwidth"]
    lines.append(markdown_table(headers, engines, "lrrrrrrrlrrr"))
    lines.append(
        "\nTTFT: time to first token, the prompt's prefill and the first token's logits. "
        "anon / file: the peaks of the engine's anonymous and file-backed resident memory, sampled "
        "(device/memory.py); a memory limit without swap can reclaim only the file-backed part. "
        "weight MB/token: bytes of weights a decoded token reads (linears and lm_head whole, one row of each "
        "embedding table); bandwidth: this host's memory read bandwidth at the same threads, measured in the "
        "engine's own job just before it; fraction: weight MB/token × decode tok/s over that bandwidth"
    )
    if busy:
        lines += [
            "",
            f"**Busy machine** while timing {', '.join(busy)}: other processes used more than "
            f"{100 * BUSY_SHARE:.0f} % of the CPU around the runs (perf.json `load`); those figures are not clean.",
        ]
    names = {"llamacpp": "llama.cpp", "eager": "eager", "litert": "LiteRT-LM"}
    peers = ["llamacpp", "eager"] + (["litert"] if "litert" in report["engines"] else [])  # eager left out: "—"
    # A phase no peer was timed in (first token, in a report from before TTFT was compared) is left out.
    phases = [phase for phase in RATIO_PHASES if any(f"{phase}_vs_{name}" in row for row in report["ratios"] for name in peers)]
    label = {"decode": "decode", "prefill": "prefill", "first_token": "first token"}
    headers = ["prompt", *(f"{label[phase]} .pte/{names[name]}" for name in peers for phase in phases)]
    ratios = [
        [row["prompt_tokens"], *(_cell(row.get(f"{phase}_vs_{name}")) for name in peers for phase in phases)]
        for row in report["ratios"]
    ]
    lines += ["", markdown_table(headers, ratios, "r" * len(headers))]
    if "first_token" in phases:
        lines.append("\nfirst token: the peer's TTFT over the .pte's (above 1: the .pte's first token comes sooner)")
    if litert and litert.get("prefill_logits") is False:
        lines.append(
            "\nLiteRT-LM's prefill signatures return no logits: its first token's logits come from a decode "
            "call, inside its TTFT but outside its prefill tok/s. The .pte's prefill call ends with them (the "
            "lm_head, once). Their prefill tok/s count different work; TTFT counts the same."
        )
    return "\n".join(lines)


def resident_cell(resident: dict | None) -> str:
    """Anonymous / file-backed peak MiB, or "—" for a result from before they were sampled (or an
    engine that ended before its first sample)."""
    if not resident or resident["anon_peak_bytes"] is None:
        return "—"
    return f"{resident['anon_peak_bytes'] / 2**20:.0f} / {resident['file_peak_bytes'] / 2**20:.0f}"


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
