"""Collect the benchmarks of a sweep into one table and the plots that answer
"which group size, which device, fused or per-op"."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from gemma_edge.device.files import atomic_output, read_json, write_json
from gemma_edge.measure.quality_table import quality_columns, quality_index, quality_table, render_quality_table
from gemma_edge.workflow import variant

log = logging.getLogger(__name__)


COLUMNS = [
    "target",
    "emulated",
    "model",
    "engine",
    "variant",
    "group_size",
    "per_op_mode_used",
    "pte_mb",
    "prompt_tokens",
    "new_tokens",
    "prefill_tps",
    "prefill_tps_stddev",
    "decode_tps",
    "decode_tps_stddev",
    "pte_decode_ratio",
    "pte_prefill_ratio",
    "pte_first_token_ratio",
    "ttft_ms",
    "load_s",
    "warm_load_s",
    "peak_rss_mb",
    "anon_peak_mb",
    "file_peak_mb",
    "fully_connected_kernels",
    "kleidiai",
    "host_teacher_forced_top1",
    "host_logits_cosine",
    "device_identical_to_host_pte",
    "busy",
    "available",
    "cpu_model",
    "executorch",
    "measured_beside",
    "weight_bytes_per_token",
    "bandwidth_gb_per_s",
    "bandwidth_fraction",
    "runner_decode_tps",
    "runner_tokens_equal",
    "perplexity",
    "fp32_perplexity",
    "ppl_ratio",
    "kl_mean",
    "kl_median",
    "kl_p99",
    "top1_agreement",
    "quality_tokens",
    "quality_note",
]


def variant_name(bench: dict) -> str:
    return variant.label(bench["quantization"].get("group_size"), bench["pte"]["per_op_mode_used"])


def speeds(run: dict, bench: dict | None = None) -> dict:
    """A run's speeds; with its benchmark, also the weight bytes its decode reads per token, the
    device's measured memory read bandwidth and the share of it that decode achieved."""
    limit = (bench or {}).get("bandwidth")
    return {
        "weight_bytes_per_token": run.get("weight_bytes_per_token"),
        "bandwidth_gb_per_s": round(limit["gb_per_s"]["avg"], 2) if limit else None,
        "bandwidth_fraction": _round(run.get("bandwidth_fraction")),
        "prompt_tokens": run["prompt_tokens"],
        "new_tokens": run["new_tokens"],
        "prefill_tps": round(run["prefill_tps"]["avg"], 2),
        "prefill_tps_stddev": round(run["prefill_tps"]["stddev"], 2),
        "decode_tps": round(run["decode_tps"]["avg"], 2),
        "decode_tps_stddev": round(run["decode_tps"]["stddev"], 2),
    }


def rows_of(bench: dict, qualities: dict | None = None) -> list[dict]:
    """The .pte's rows (one per prompt length), then each peer engine's measured in the same run,
    with the .pte's speed over theirs; a peer that could not run gets one row saying so. With
    `qualities` (quality_index), each row also gets its engine's quality against FP32."""
    qualities = qualities or {}
    host = bench.get("host_parity", {})
    common = {
        "target": bench["target"],
        "emulated": bool(bench.get("emulated")),
        "model": bench["model"]["repo_id"],
        "cpu_model": bench["device"].get("cpu_model"),
        "measured_beside": variant_name(bench),
    }
    rows = []
    runner = runner_columns(bench.get("executorch_runner"))
    for run in bench["runs"]:
        rows.append(
            {
                **common,
                "engine": "pte",
                "variant": variant_name(bench),
                "group_size": bench["quantization"].get("group_size"),
                "per_op_mode_used": bench["pte"]["per_op_mode_used"],
                "pte_mb": round(bench["pte"]["size_bytes"] / 1e6, 3),
                **speeds(run, bench),
                "ttft_ms": round(1000 * run["ttft_s"]["avg"], 2),
                "load_s": round(bench["load_s"], 3),
                "warm_load_s": _round(bench.get("warm_load_s")),
                "peak_rss_mb": round(bench["peak_rss_bytes"] / 1e6, 1),
                **resident_columns(bench.get("resident")),
                **kernel_columns(bench.get("xnnpack_kernels")),
                "host_teacher_forced_top1": host.get("teacher_forced_top1"),
                "host_logits_cosine": host.get("logits_cosine"),
                "device_identical_to_host_pte": f"{bench['parity']['identical_to_host_pte']}/{bench['parity']['prompts']}",
                "busy": (bench.get("load") or {}).get("busy"),
                "available": True,
                "executorch": bench["versions"]["device"].get("executorch"),
                **runner,
                **quality_columns(qualities.get(("pte", bench["pte"].get("sha256")))),
            }
        )
    ratios = {(r["engine"], r["prompt_tokens"]): r for r in bench.get("ratios", [])}
    for name, engine in bench.get("engines", {}).items():
        peer = {
            **common,
            "engine": name,
            "variant": peer_variant(engine),
            "available": engine["available"],
            **quality_columns(qualities.get((name, bench["model"].get("commit")))),
        }
        if not engine["available"]:
            rows.append(peer)
            continue
        for run in engine["runs"]:
            ratio = ratios.get((name, run["prompt_tokens"]), {})
            rows.append(
                {
                    **peer,
                    **speeds(run, bench),
                    "busy": engine["load"]["busy"],
                    **resident_columns(engine.get("resident")),
                    "pte_decode_ratio": _round(ratio.get("decode")),
                    "pte_prefill_ratio": _round(ratio.get("prefill")),
                    "pte_first_token_ratio": _round(ratio.get("first_token")),
                }
            )
    return rows


def resident_columns(resident: dict | None) -> dict:
    """An engine's anonymous and file-backed resident peaks (device/memory.py), in MB as peak_rss_mb;
    empty for a bench.json from before they were sampled; None for an engine that ended before its
    first sample."""
    if not resident:
        return {}
    return {
        f"{part}_peak_mb": None if resident[f"{part}_peak_bytes"] is None else round(resident[f"{part}_peak_bytes"] / 1e6, 1)
        for part in ("anon", "file")
    }


def kernel_columns(kernels: dict | None) -> dict:
    """The fully-connected operators XNNPACK created on the device for one decode call, by kind
    ("44× (NC, QD8, F32, QB4W) GEMM; ..."), and whether KleidiAI's kernels run any; the reason
    where the device could not trace them."""
    if not kernels:
        return {}
    if not kernels["traced"]:
        return {"fully_connected_kernels": f"not traced: {kernels['reason']}"}
    kinds = "; ".join(f"{count}× {kind.removeprefix('Fully Connected ')}" for kind, count in kernels["fully_connected"].items())
    return {"fully_connected_kernels": kinds, "kleidiai": kernels["kleidiai"]}


def runner_columns(runner: dict | None) -> dict:
    """The .pte under ExecuTorch's own LLM runner (on the parity prompts, not the rows' prompt
    lengths): its mean decode rate and whether its tokens equal our loop's; empty when it did not run."""
    if not runner or not runner.get("available"):
        return {}
    decode = runner["stats"]["decode_tps"]
    return {"runner_decode_tps": round(decode["avg"], 2) if decode else None, "runner_tokens_equal": runner["tokens_equal_loop"]}


def peer_variant(engine: dict) -> str:
    """A peer's bar label: the engine and its GGUF type or LiteRT-LM recipe."""
    if engine["engine"] == "llamacpp":
        return f"llama.cpp {engine['gguf_type']}"
    if engine["engine"] == "litert":
        return f"LiteRT-LM {engine['recipe']}"
    return engine["engine"]


def _round(value):
    return None if value is None else round(value, 3)


def summarise(bench_paths: list[Path], out_csv: Path, out_json: Path, quality_paths: list[Path] = ()) -> list[dict]:
    benches = [read_json(p) for p in bench_paths]
    qualities = [read_json(p) for p in quality_paths]
    index = quality_index(qualities)
    rows = [row for bench in benches for row in rows_of(bench, index)]
    rows.sort(
        key=lambda r: (r["target"], r["engine"] != "pte", r.get("group_size") or 0, r["variant"], r.get("prompt_tokens") or 0)
    )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(out_csv) as tmp:
        tmp.write_text(buffer.getvalue())
    table = quality_table(qualities)
    write_json(
        out_json,
        {
            "rows": rows,
            "sources": [str(p) for p in bench_paths],
            "quality": table,
            "quality_sources": [str(p) for p in quality_paths],
            "versions": benches[0]["versions"]["host"] if benches else {},
        },
    )
    log.info("summary of %d benchmark(s), %d rows", len(benches), len(rows))
    if table:
        log.info("quality against eager FP32:\n%s", render_quality_table(table))
    if any(e.get("same_ids_as_first") is False for e in table):
        log.warning(
            "the quality results did not all score the same token ids (text, max_tokens or context differ): "
            "their figures are not comparable"
        )
    return rows
