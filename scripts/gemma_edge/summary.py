"""Collect the benchmarks of a sweep into one table and the plots that answer
"which group size, which device, fused or per-op"."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from . import variant
from .artifacts import atomic_output, read_json, write_json

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
    "ttft_ms",
    "load_s",
    "peak_rss_mb",
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
                "peak_rss_mb": round(bench["peak_rss_bytes"] / 1e6, 1),
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
                    "pte_decode_ratio": _round(ratio.get("decode")),
                    "pte_prefill_ratio": _round(ratio.get("prefill")),
                }
            )
    return rows


def quality_index(qualities: list[dict]) -> dict:
    """quality.json results by what a summary row names: ("pte", the .pte's sha256), or (the peer's
    engine name, e.g. "llamacpp-q4_0", the checkpoint's commit)."""
    index = {}
    for quality in qualities:
        if quality["engine"] == "pte":
            index[("pte", quality["artifact"]["sha256"])] = quality
        else:
            index[(f"{quality['engine']}-{quality['artifact']['gguf_type']}", quality["checkpoint"]["commit"])] = quality
    return index


def quality_columns(quality: dict | None) -> dict:
    """A row's quality against eager FP32 (gemma_edge.quality), or why it has none."""
    if quality is None:
        return {}
    if not quality["meaningful"]:
        return {"quality_note": "not measured: " + quality["reason"].split(":")[0]}
    q = quality["summary"]
    return {
        "perplexity": round(q["perplexity"], 4),
        "fp32_perplexity": round(q["fp32_perplexity"], 4),
        "ppl_ratio": round(q["ppl_ratio"], 5),
        "kl_mean": round(q["kl"]["mean"], 6),
        "kl_median": round(q["kl"]["median"], 6),
        "kl_p99": round(q["kl"]["p99"], 5),
        "top1_agreement": round(q["top1_agreement"], 4),
        "quality_tokens": q["tokens"],
        "quality_note": "FP32 perplexity above a uniform guess: read KL and top-1, not perplexity"
        if quality.get("note")
        else None,
    }


def quality_table(qualities: list[dict]) -> list[dict]:
    """One entry per scored engine, eager FP32 (the reference) first; each says whether it scored
    the same token ids as the first, so the table compares at equal text."""
    scored = [q for q in qualities if q["meaningful"]]
    first = scored[0] if scored else None
    table = []
    if first:
        table.append(
            {
                "variant": "eager FP32 (reference)",
                "engine": "eager",
                "perplexity": first["summary"]["fp32_perplexity"],
                "ppl_ratio": 1.0,
                "kl_mean": 0.0,
                "top1_agreement": 1.0,
                "tokens": first["summary"]["tokens"],
            }
        )
    for quality in qualities:
        entry = {"variant": quality["variant"], "engine": quality["engine"], "meaningful": quality["meaningful"]}
        if quality["meaningful"]:
            s = quality["summary"]
            entry.update(
                perplexity=s["perplexity"],
                ppl_ratio=s["ppl_ratio"],
                kl_mean=s["kl"]["mean"],
                kl_stderr=s["kl"]["stderr"],
                kl_median=s["kl"]["median"],
                kl_p99=s["kl"]["p99"],
                top1_agreement=s["top1_agreement"],
                tokens=s["tokens"],
                same_ids_as_first=quality["tokens"]["ids_sha256"] == first["tokens"]["ids_sha256"],
            )
        else:
            entry["reason"] = quality["reason"]
        table.append(entry)
    return table


def render_quality_table(table: list[dict]) -> str:
    lines = [f"{'variant':<24} {'PPL':>9} {'PPL/FP32':>9} {'KL mean':>9} {'KL med':>9} {'KL p99':>8} {'top-1':>7} {'tokens':>6}"]
    for e in table:
        if e.get("meaningful") is False:
            lines.append(f"{e['variant']:<24} not measured: {e['reason'].split(':')[0]}")
            continue
        cell = lambda key, spec, e=e: format(e[key], spec) if e.get(key) is not None else "-"  # noqa: E731
        lines.append(
            f"{e['variant']:<24} {cell('perplexity', '9.4f')} {cell('ppl_ratio', '9.4f')} {cell('kl_mean', '9.5f')} "
            f"{cell('kl_median', '9.5f')} {cell('kl_p99', '8.4f')} {cell('top1_agreement', '7.4f')} {e['tokens']:>6}"
        )
    return "\n".join(lines)


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


def plot_metric(rows: list[dict], metric: str, ylabel: str, title: str, out_png: Path, error: str | None = None) -> None:
    """Grouped bars: one group per variant, one bar per target (at the longest prompt length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = {}
    for row in rows:
        key = (row["variant"], row["target"])
        if key not in longest or row["prompt_tokens"] > longest[key]["prompt_tokens"]:
            longest[key] = row
    variants = sorted({v for v, _ in longest})
    targets = sorted({t for _, t in longest})
    width = 0.8 / max(len(targets), 1)
    figure, axes = plt.subplots(figsize=(1.6 + 1.4 * len(variants) * max(len(targets), 1) ** 0.5, 3.6), dpi=110)
    busy_seen = False
    for index, target in enumerate(targets):
        xs, ys, errs, busy = [], [], [], []
        for position, name in enumerate(variants):
            row = longest.get((name, target))
            if row is None or row[metric] is None:
                continue
            xs.append(position + (index - (len(targets) - 1) / 2) * width)
            ys.append(row[metric])
            errs.append(row[error] if error else 0)
            busy.append(bool(row.get("busy")))
        bars = axes.bar(xs, ys, width=width, yerr=errs if error else None, capsize=3, label=target)
        for bar, was_busy in zip(bars, busy):
            if was_busy:  # measured while other processes used the CPU: not a clean figure
                bar.set_hatch("//")
                busy_seen = True
    axes.set_xticks(range(len(variants)), variants, rotation=15)
    axes.set_ylabel(ylabel)
    lengths = sorted({row["prompt_tokens"] for row in longest.values()})
    note = "; hatched: machine busy during the run" if busy_seen else ""
    axes.set_title(f"{title}\nprompt of {'/'.join(map(str, lengths))} tokens{note}", fontsize=10)
    axes.legend(title="target", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_output(out_png) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


# Speeds measured under emulation say nothing about a device: the speed plots leave them out.
SPEED_PLOTS = ("decode", "prefill")
PLOTS = {
    "decode": ("decode_tps", "decode tokens/s", "Decode speed (mean ± stddev)", "decode_tps_stddev"),
    "prefill": ("prefill_tps", "prefill tokens/s", "Prefill speed (mean ± stddev)", "prefill_tps_stddev"),
    "size": ("pte_mb", ".pte size (MB)", "Program size", None),
    "parity": ("host_teacher_forced_top1", "teacher-forced top-1 vs FP32", "Parity with eager FP32", None),
}


def plot_tradeoff(rows: list[dict], out_png: Path) -> None:
    """Decode speed against mean KL divergence from FP32: one point per variant or engine and
    target (at the longest prompt length), so the trade-off of a group size is one picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = {}
    for row in rows:
        key = (row["variant"], row["target"])
        if (
            row.get("kl_mean") is not None
            and row.get("decode_tps") is not None
            and (key not in longest or row["prompt_tokens"] > longest[key]["prompt_tokens"])
        ):
            longest[key] = row
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    colours = {target: f"C{i}" for i, target in enumerate(sorted({t for _, t in longest}))}
    busy_seen = False
    for (name, target), row in sorted(longest.items()):
        busy = bool(row.get("busy"))
        busy_seen |= busy
        marker = "o" if row["engine"] == "pte" else "s" if row["engine"].startswith("llamacpp") else "^"
        axes.errorbar(
            row["kl_mean"],
            row["decode_tps"],
            yerr=row.get("decode_tps_stddev") or 0,
            fmt=marker,
            capsize=3,
            color=colours[target],
            markerfacecolor="none" if busy else colours[target],
            markersize=7,
        )
        axes.annotate(name, (row["kl_mean"], row["decode_tps"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if longest and all(row["kl_mean"] > 0 for row in longest.values()):
        axes.set_xscale("log")
    for target, colour in colours.items():
        axes.plot([], [], "o", color=colour, label=target)
    axes.set_xlabel("mean KL divergence from eager FP32 per token (nats; lower is better)")
    axes.set_ylabel("decode tokens/s")
    lengths = sorted({row["prompt_tokens"] for row in longest.values()})
    note = "; hollow: machine busy during the run" if busy_seen else ""
    heading = (
        f"prompt of {'/'.join(map(str, lengths))} tokens; ○ .pte, □ llama.cpp{note}"
        if longest
        else "no engine has both a speed and a quality figure (see quality_note in summary.csv)"
    )
    axes.set_title(f"Decode speed against quality loss\n{heading}", fontsize=10)
    if colours:
        axes.legend(title="target", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_output(out_png) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def plot_all(rows: list[dict], outputs: dict[str, Path]) -> None:
    for name, path in outputs.items():
        if name == "quality":  # a speed plot too: emulated targets and repeated peer rows left out
            plot_tradeoff(rows_for_plot("decode", rows), Path(path))
            continue
        metric, ylabel, title, error = PLOTS[name]
        plot_metric(rows_for_plot(name, rows), metric, ylabel, title, Path(path), error)


def rows_for_plot(name: str, rows: list[dict]) -> list[dict]:
    """The rows plot `name` shows: emulated targets never appear in a speed plot; peers appear in
    the speed plots only (once per target, from the first run they were measured beside)."""
    shown, first_beside = [], {}
    for row in rows:
        if name in SPEED_PLOTS and row["emulated"]:
            continue
        if row["engine"] != "pte":
            beside = first_beside.setdefault((row["target"], row["engine"]), row["measured_beside"])
            if name not in SPEED_PLOTS or not row["available"] or row["measured_beside"] != beside:
                continue
        shown.append(row)
    return shown
