"""The measuring steps, one function per rule: quality, the host benchmark's engines, its table
and projection, and the sweep's summary."""

from __future__ import annotations

import logging
from pathlib import Path

from gemma_edge.device.files import atomic_output, read_json, sha256_file, write_json
from gemma_edge.workflow.manifest import package_versions, portable_path, verify_against_manifest, write_manifest

log = logging.getLogger(__name__)


def quality(
    engine: str,
    artifact: Path,
    checkpoint_manifest: Path,
    text_path: Path,
    text_name: str,
    settings: dict,
    gates: dict,
    synthetic: bool,
    threads: int,
    out: Path,
    out_manifest: Path,
) -> dict:
    """Perplexity and KL divergence of the .pte (engine `pte`) or a GGUF (`llamacpp`) against eager
    FP32 on a held-out text (gemma_edge.measure.quality); the gates apply to the .pte only. `settings`:
    max_tokens, scored_positions and, for a GGUF, context (the .pte's is its own metadata)."""
    from gemma_edge.measure.perf_engines import set_threads
    from gemma_edge.measure.quality import SCHEMA, SYNTHETIC_REASON, Gates, gate_failures, measure, render
    from gemma_edge.measure.summary import peer_variant
    from gemma_edge.model.checkpoint import load_checkpoint, read_text_config_dict
    from gemma_edge.workflow.variant import label as variant_label

    recorded = verify_against_manifest(artifact)
    checkpoint = read_json(checkpoint_manifest)
    if engine == "pte":
        variant = variant_label(recorded["program_params"].get("group_size"), recorded["lowering"]["per_op_mode_used"])
    else:
        variant = peer_variant({"engine": engine, "gguf_type": recorded["params"]["gguf_type"]})
    text = Path(text_path).read_text(encoding="utf-8")
    report = {
        "schema": SCHEMA,
        "engine": engine,
        "variant": variant,
        "artifact": {
            "path": portable_path(artifact),
            "sha256": recorded["sha256"],
            "size_bytes": recorded["size_bytes"],
            **({"gguf_type": recorded["params"]["gguf_type"]} if engine == "llamacpp" else {}),
        },
        "checkpoint": {"repo_id": checkpoint["repo_id"], "commit": checkpoint["commit"]},
        # As configured (relative to the workflow folder): the sha256 says which text it was.
        "text": {"configured": text_name, "sha256": sha256_file(text_path), "characters": len(text)},
        "settings": settings,
        "gates": gates if engine == "pte" else None,
        "versions": package_versions(("torch", "executorch", "transformers", "tokenizers", "llama_cpp_python")),
    }
    failures = []
    if synthetic:
        report.update(meaningful=False, reason=SYNTHETIC_REASON)
        log.warning("quality of %s not measured: %s", variant, SYNTHETIC_REASON)
    else:
        set_threads(threads)
        model, _ = load_checkpoint(checkpoint_manifest, bf16_tables=True)
        folder = Path(checkpoint["path"])
        bos_id = int(read_text_config_dict(folder).get("bos_token_id", 2))
        report.update(
            meaningful=True,
            threads=threads,
            **measure(
                engine,
                artifact,
                model,
                folder / "tokenizer.json",
                bos_id,
                text,
                settings["max_tokens"],
                settings["scored_positions"],
                threads,
                settings.get("context"),
            ),
        )
        if engine == "pte":
            failures = gate_failures(report["summary"], Gates(**gates))
        report.update(passed=not failures, failures=failures)
    log.info("quality: %s", render(report))
    if failures:
        rejected = Path(out).with_name(Path(out).stem + ".rejected.json")
        write_json(rejected, report)
        raise RuntimeError(f"quality gates missed by {variant}: {'; '.join(failures)} (details in {rejected})")
    write_json(out, report)
    params = {"engine": engine, "text": text_name, "settings": settings, "gates": report["gates"], "synthetic": synthetic}
    write_manifest(
        out,
        {"artifact": artifact, "checkpoint": checkpoint_manifest},
        params,
        {"text_sha256": report["text"]["sha256"]},
        manifest=out_manifest,
    )
    return report


def perf_engine(engine: str, artifact: Path, checkpoint_manifest: Path, spec: dict, out: Path) -> dict:
    from gemma_edge.measure.perf_engines import bench_engine
    from gemma_edge.model.checkpoint import read_text_config_dict

    if engine != "eager":
        verify_against_manifest(artifact)
    text_config = read_text_config_dict(Path(read_json(checkpoint_manifest)["path"]))
    return bench_engine(
        engine, Path(artifact), spec, int(text_config["vocab_size"]), int(text_config.get("bos_token_id", 2)), Path(out)
    )


def perf_litert(model: Path, spec: dict, requirements: Path, out: Path) -> dict:
    """LiteRT-LM's own benchmark of the .litertlm on this host, as on a device."""
    from gemma_edge.measure.perf_engines import bench_litert

    return bench_litert(Path(model), spec, Path(requirements), Path(out))


def perf_table(
    engine_files: dict,
    step_benchmarks: dict,
    pte_manifest: Path,
    gguf_manifest: Path,
    checkpoint_manifest: Path,
    out_json: Path,
    out_table: Path,
) -> dict:
    from gemma_edge.measure.perf_table import build_report, write_report

    report = build_report(engine_files, step_benchmarks, pte_manifest, gguf_manifest, checkpoint_manifest)
    table = write_report(report, Path(out_json), Path(out_table))
    log.info("performance:\n%s", table)
    print(table, flush=True)
    return report


def perf_projection(report_files: list[Path], shape: str, layers: int, out_json: Path, out_table: Path) -> dict:
    """Each step's cost on the benchmarked models, extrapolated to the `shape` model at `layers`."""
    from gemma_edge.measure.perf_projection import parameter_count_of, project_steps, render_projection
    from gemma_edge.model.e2b_shape import synthetic_config

    reports = [read_json(path) for path in report_files]
    target = parameter_count_of(synthetic_config(shape, layers).to_dict())
    rows = project_steps(reports, target)
    table = render_projection(rows, target, layers)
    with atomic_output(out_table) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    result = {
        "schema": "gemma-edge.projection/1",
        "shape": shape,
        "layers": layers,
        "parameters": target,
        "steps": rows,
        "models": [{k: r["model"][k] for k in ("repo_id", "layers", "parameters")} for r in reports],
    }
    write_json(out_json, result)
    log.info("projection to %s at %d layers (%.2f B parameters):\n%s", shape, layers, target / 1e9, table)
    return result


def summary(
    bench_paths: list[Path], quality_paths: list[Path], out_csv: Path, out_json: Path, plots: dict[str, Path]
) -> list[dict]:
    """Every swept variant's benchmarks and quality in one table, and its plots."""
    from gemma_edge.measure.plots import plot_all
    from gemma_edge.measure.summary import summarise

    rows = summarise(list(bench_paths), out_csv, out_json, list(quality_paths))
    plot_all(rows, plots)
    return rows
