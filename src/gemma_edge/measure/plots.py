"""The sweep's plots: prefill and decode per variant and engine, and the speed-quality trade-off."""

from __future__ import annotations

from pathlib import Path

from gemma_edge.device.files import atomic_output


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
