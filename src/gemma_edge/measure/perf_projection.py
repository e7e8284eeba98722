"""Every step's wall time and peak memory, measured on models cut to a few depths, projected to
the full model: per step, a straight line against parameter count."""

from __future__ import annotations

import statistics

import torch

from gemma_edge.workflow.table import markdown_table


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
    target = f"{layers} layers, {target_parameters / 1e9:.2f} B"
    headers = ["step", *(f"RSS MiB @{n / 1e9:.2f} B" for n in sizes), "MiB per B params"]
    headers += [f"projected RSS MiB ({target})", f"projected wall s ({target})"]
    cells = [
        [
            row["step"],
            *(f"{row['measured']['peak_rss_mb'][str(n)]:.0f}" for n in sizes),
            f"{row['peak_rss_mb_per_billion_parameters']:.0f}",
            f"{row['peak_rss_mb_projected']:.0f}",
            f"{row['wall_s_projected']:.0f}",
        ]
        for row in rows
    ]
    return markdown_table(headers, cells, "l" + "r" * (len(headers) - 1))


def parameter_count_of(text_config: dict) -> int:
    """Parameters of the Gemma 4 text decoder a config describes, counted on the meta device."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from gemma_edge.model.e2b_shape import parameter_count

    config = Gemma4TextConfig(**{k: v for k, v in text_config.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        return parameter_count(Gemma4ForCausalLM(config))
