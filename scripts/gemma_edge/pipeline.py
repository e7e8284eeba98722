"""One function per workflow step, taking paths and values (never the snakemake object)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from . import artifacts, hub
from .artifacts import read_json, verify_against_manifest, write_json, write_manifest
from .steplog import log_memory

log = logging.getLogger(__name__)

# What the quantize and lower steps build, named in their manifests (the only ones there are, so
# the config has no key for either).
SCHEME = "8da4w"  # INT8 dynamic activations + INT4 per-group weights (gemma_edge.quantize)
BACKEND = "xnnpack"  # ExecuTorch's XNNPACK delegate (gemma_edge.lower)


def build_demo(
    corpus: Path, hub_cache: Path, repo_id: str, train_steps: int, seed: int, marker: Path, synthetic: dict | None = None
) -> dict:
    """Build a local Gemma 4 and seed it into a local hub cache as `repo_id`: the trained tiny demo
    model, or with `synthetic` ({shape, layers}) a randomly initialised one of that shape."""
    from .demo_model import build_demo_checkpoint
    from .e2b_shape import build_synthetic_checkpoint

    with tempfile.TemporaryDirectory(dir=Path(marker).parent) as scratch:
        if synthetic:
            facts = build_synthetic_checkpoint(Path(corpus), Path(scratch), synthetic["shape"], synthetic["layers"], seed)
        else:
            facts = build_demo_checkpoint(Path(corpus), Path(scratch), train_steps, seed)
        commit = hub.seed_hub_cache(Path(scratch), Path(hub_cache), repo_id)
    facts.update(
        {
            "repo_id": repo_id,
            "commit": commit,
            "hub_cache": artifacts.portable_path(hub_cache),
            "versions": artifacts.package_versions(),
            "peak_rss_mb": artifacts.peak_rss_mb(),
        }
    )
    write_json(marker, facts)
    log.info("local model seeded as %s@%s", repo_id, commit[:12])
    return facts


def download(
    repo_id: str, revision: str, cache_dir: str | None, offline: bool, local_path: str | None, out: Path, demo: bool = False
) -> dict:
    """Resolve the checkpoint, check the cached files against the hub's hashes and write a
    manifest of its files (sha256 each)."""
    verified = {}
    if local_path:
        folder, commit = Path(local_path).resolve(), None
        if not folder.is_dir():
            raise hub.DownloadError(f"models.<name>.local_path {local_path} is not a directory")
    else:
        folder = hub.download_checkpoint(repo_id, revision, cache_dir, offline)
        commit = folder.name
        verified = hub.check_cached_files(folder, hub.repair_command(repo_id, commit, cache_dir, demo))
    files = hub.describe_checkpoint(folder, verified)
    total = sum(f["size_bytes"] for f in files.values())
    # The checkpoint folder relative to the working directory when inside it (the demo's hub cache,
    # which snapshot_download reports as an absolute path), so a moved working directory still finds it.
    manifest = {
        "repo_id": repo_id,
        "revision": revision,
        "commit": commit,
        "path": artifacts.portable_path(folder),
        "files": files,
        "total_bytes": total,
        "versions": artifacts.package_versions(),
    }
    write_json(out, manifest)
    log.info("checkpoint %s@%s: %d files, %.1f MB at %s", repo_id, (commit or "local")[:12], len(files), total / 1e6, folder)
    return manifest


def export(checkpoint_manifest: Path, max_seq_len: int, dtype: str, attention: str, out: Path, out_manifest: Path) -> dict:
    from .checkpoint import load_checkpoint
    from .export import check_reloaded, export_decoder, max_abs_diff_on_prompt, saved_bytes, write_program

    if dtype != "float32":
        raise ValueError(f"export.dtype {dtype!r} is not supported yet; use float32")
    model, _ = load_checkpoint(checkpoint_manifest, bf16_tables=True)
    tables = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    log_memory(f"loading the checkpoint (embedding tables in {tables})")
    program = export_decoder(model, max_seq_len, attention=attention)
    log_memory("torch.export")
    drift = max_abs_diff_on_prompt(program, model, max_seq_len, attention)
    log.info("exported program vs eager: max |logits diff| %.3g", drift)
    if drift > 1e-3:
        raise RuntimeError(f"the exported program disagrees with the eager model (max |logits diff| {drift:.3g})")
    with artifacts.atomic_output(out, min_bytes=saved_bytes(program)) as tmp:
        fingerprint = write_program(program, tmp)
        del program, model  # one copy of the weights at a time: the reload below is the second
        check_reloaded(tmp, fingerprint)
    return write_manifest(
        out,
        {"checkpoint": checkpoint_manifest},
        {"max_seq_len": max_seq_len, "dtype": dtype, "attention": attention},
        {"eager_max_abs_diff": drift, "embedding_tables_dtype": tables},
        manifest=out_manifest,
    )


def quantize(program_path: Path, group_size: int, embeddings: str, out: Path, out_manifest: Path) -> dict:
    from .export import check_reloaded, load_program, saved_bytes, write_program
    from .quantize import quantize_program

    verify_against_manifest(program_path)
    quantized, report = quantize_program(load_program(program_path), group_size, embeddings)
    log_memory("quantizing and re-exporting")
    with artifacts.atomic_output(out, min_bytes=saved_bytes(quantized)) as tmp:
        fingerprint = write_program(quantized, tmp)
        del quantized
        check_reloaded(tmp, fingerprint)
    params = {"scheme": SCHEME, "group_size": group_size, "embeddings": embeddings}
    return write_manifest(out, {"program": program_path}, params, {"quantization": report}, manifest=out_manifest)


def lower(
    program_path: Path,
    checkpoint_manifest: Path,
    per_op_mode: str | bool,
    decode_method: str | bool,
    out: Path,
    out_manifest: Path,
) -> dict:
    from .checkpoint import read_text_config_dict
    from .export import context_length_of, kv_cache_bytes_of, load_program, tokens_per_call_of
    from .lower import lower_with_fallback, runner_metadata

    program_manifest = verify_against_manifest(program_path)
    text_config = read_text_config_dict(Path(read_json(checkpoint_manifest)["path"]))
    loaded = [load_program(program_path)]
    metadata = runner_metadata(text_config, context_length_of(loaded[0]), tokens_per_call_of(loaded[0]))
    kv_cache_bytes = kv_cache_bytes_of(loaded[0])
    # The first attempt lowers the program just loaded (handed over, not kept); a fallback loads afresh.
    record = lower_with_fallback(
        lambda: loaded.pop() if loaded else load_program(program_path), per_op_mode, metadata, Path(out), decode_method
    )
    log_memory("lowering, writing and loading the .pte")
    extra = {
        "lowering": record,
        "runner_metadata": metadata,
        "kv_cache_bytes": kv_cache_bytes,
        "program_params": program_manifest["params"],
        "quantization": program_manifest.get("quantization"),
    }
    params = {"backend": BACKEND, "per_op_mode": per_op_mode, "decode_method": decode_method}
    return write_manifest(out, {"program": program_path, "checkpoint": checkpoint_manifest}, params, extra, manifest=out_manifest)


def verify(
    pte_path: Path, checkpoint_manifest: Path, prompts: list[str], max_new_tokens: int, gates: dict, out_json: Path, out_log: Path
) -> dict:
    from .checkpoint import load_checkpoint
    from .config import check_prompts_fit
    from .parity import Gates, compare_prompt, encode_prompts, render_table, summarise
    from .runtime import PteDecoder

    pte_manifest = verify_against_manifest(pte_path)
    bos_id = pte_manifest["runner_metadata"]["get_bos_id"]
    prompt_ids = encode_prompts(Path(read_json(checkpoint_manifest)["path"]) / "tokenizer.json", prompts, bos_id)
    check_prompts_fit(
        prompts, [len(ids) for ids in prompt_ids], max_new_tokens, pte_manifest["runner_metadata"]["get_max_context_len"]
    )
    # The reference's logits are the FP32 model's either way; bf16 tables keep the real E2B's
    # reference (about 13 GiB instead of 18.5) beside its .pte on a 24 GiB host.
    model, checkpoint = load_checkpoint(checkpoint_manifest, bf16_tables=True)
    decoder = PteDecoder(pte_path)
    results = []
    for ids in prompt_ids:
        results.append(compare_prompt(decoder.step, model, ids, max_new_tokens))
        log.info("prompt %d/%d: %d/%d greedy tokens matched", len(results), len(prompts), results[-1]["matched"], max_new_tokens)
    for text, result in zip(prompts, results):
        result["prompt"] = text
        result["bos_included"] = result["prompt_ids"][:1] == [bos_id]
    summary = summarise(results, Gates(**gates))
    report = {
        "pte": {
            "path": artifacts.portable_path(pte_path),
            "sha256": pte_manifest["sha256"],
            "lowering": pte_manifest["lowering"],
        },
        "checkpoint": {"repo_id": checkpoint["repo_id"], "commit": checkpoint["commit"]},
        "reference": "eager FP32 transformers model, greedy, full recompute per token",
        "max_new_tokens": max_new_tokens,
        "gates": gates,
        "summary": summary,
        "prompts": results,
        "versions": artifacts.package_versions(),
    }
    table = render_table(prompts, results, summary)
    log.info("parity:\n%s", table)
    if not summary["passed"]:
        rejected = Path(out_json).with_name(Path(out_json).stem + ".rejected.json")
        write_json(rejected, report)
        raise RuntimeError(f"parity gates missed: {'; '.join(summary['failures'])} (details in {rejected})")
    with artifacts.atomic_output(out_log) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    write_json(out_json, report)
    return report


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
    FP32 on a held-out text (gemma_edge.quality); the gates apply to the .pte only. `settings`:
    max_tokens, scored_positions and, for a GGUF, context (the .pte's is its own metadata)."""
    from .checkpoint import load_checkpoint, read_text_config_dict
    from .perf_engines import set_threads
    from .quality import SCHEMA, SYNTHETIC_REASON, Gates, gate_failures, measure, render
    from .summary import peer_variant
    from .variant import label as variant_label

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
            "path": artifacts.portable_path(artifact),
            "sha256": recorded["sha256"],
            "size_bytes": recorded["size_bytes"],
            **({"gguf_type": recorded["params"]["gguf_type"]} if engine == "llamacpp" else {}),
        },
        "checkpoint": {"repo_id": checkpoint["repo_id"], "commit": checkpoint["commit"]},
        # As configured (relative to the workflow folder): the sha256 says which text it was.
        "text": {"configured": text_name, "sha256": artifacts.sha256_file(text_path), "characters": len(text)},
        "settings": settings,
        "gates": gates if engine == "pte" else None,
        "versions": artifacts.package_versions(("torch", "executorch", "transformers", "tokenizers", "llama_cpp_python")),
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


def gguf(converter: Path, checkpoint_manifest: Path, gguf_type: str, threads: int, out: Path, out_manifest: Path) -> dict:
    """llama.cpp's own converter on the downloaded checkpoint, then llama.cpp's quantizer."""
    from .gguf_convert import convert_to_gguf

    hub.verify_checkpoint(read_json(checkpoint_manifest))
    facts = convert_to_gguf(Path(converter), Path(checkpoint_manifest), gguf_type, threads, Path(out))
    manifest = write_manifest(
        out,
        {"checkpoint": checkpoint_manifest},
        {"gguf_type": gguf_type},
        {"converter": facts["converter"]},
        manifest=out_manifest,
    )
    log.info("GGUF %s: %.1f MB", gguf_type, manifest["size_bytes"] / 1e6)
    return manifest


def perf_engine(engine: str, artifact: Path, checkpoint_manifest: Path, spec: dict, out: Path) -> dict:
    from .checkpoint import read_text_config_dict
    from .perf_engines import bench_engine

    if engine != "eager":
        verify_against_manifest(artifact)
    text_config = read_text_config_dict(Path(read_json(checkpoint_manifest)["path"]))
    return bench_engine(
        engine, Path(artifact), spec, int(text_config["vocab_size"]), int(text_config.get("bos_token_id", 2)), Path(out)
    )


def perf_litert(model: Path, spec: dict, requirements: Path, out: Path) -> dict:
    """LiteRT-LM's own benchmark of the .litertlm on this host, as on a device."""
    from .perf_engines import bench_litert

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
    from .perf_table import build_report, write_report

    report = build_report(engine_files, step_benchmarks, pte_manifest, gguf_manifest, checkpoint_manifest)
    table = write_report(report, Path(out_json), Path(out_table))
    log.info("performance:\n%s", table)
    print(table, flush=True)
    return report


def perf_projection(report_files: list[Path], shape: str, layers: int, out_json: Path, out_table: Path) -> dict:
    """Each step's cost on the benchmarked models, extrapolated to the `shape` model at `layers`."""
    from .e2b_shape import synthetic_config
    from .perf_projection import parameter_count_of, project_steps, render_projection

    reports = [read_json(path) for path in report_files]
    target = parameter_count_of(synthetic_config(shape, layers).to_dict())
    rows = project_steps(reports, target)
    table = render_projection(rows, target, layers)
    with artifacts.atomic_output(out_table) as tmp:
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
