"""The host's build steps, one function per rule: the demo checkpoint, download, the context check,
export, quantize, lower and verify. Each takes paths and values, never the snakemake object."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from gemma_edge.device.files import atomic_output, peak_rss_mb, read_json, write_json
from gemma_edge.model import hub
from gemma_edge.workflow.manifest import package_versions, portable_path, verify_against_manifest, write_manifest
from gemma_edge.workflow.steplog import log_memory

log = logging.getLogger(__name__)

# What the quantize and lower steps build, named in their manifests (the only ones there are, so
# the config has no key for either).
SCHEME = "8da4w"  # INT8 dynamic activations + INT4 per-group weights (gemma_edge.build.quantize)
BACKEND = "xnnpack"  # ExecuTorch's XNNPACK delegate (gemma_edge.build.lower)


def build_demo(
    corpus: Path, hub_cache: Path, repo_id: str, train_steps: int, seed: int, marker: Path, synthetic: dict | None = None
) -> dict:
    """Build a local Gemma 4 and seed it into a local hub cache as `repo_id`: the trained tiny demo
    model, or with `synthetic` ({shape, layers}) a randomly initialised one of that shape."""
    from gemma_edge.model.demo_model import build_demo_checkpoint
    from gemma_edge.model.e2b_shape import build_synthetic_checkpoint

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
            "hub_cache": portable_path(hub_cache),
            "versions": package_versions(),
            "peak_rss_mb": peak_rss_mb(),
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
        "path": portable_path(folder),
        "files": files,
        "total_bytes": total,
        "versions": package_versions(),
    }
    write_json(out, manifest)
    log.info("checkpoint %s@%s: %d files, %.1f MB at %s", repo_id, (commit or "local")[:12], len(files), total / 1e6, folder)
    return manifest


def export(checkpoint_manifest: Path, max_seq_len: int, attention: str, out: Path, out_manifest: Path) -> dict:
    from gemma_edge.build.export import check_reloaded, export_decoder, max_abs_diff_on_prompt, saved_bytes, write_program
    from gemma_edge.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint_manifest, bf16_tables=True)
    tables = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    log_memory(f"loading the checkpoint (embedding tables in {tables})")
    program = export_decoder(model, max_seq_len, attention=attention)
    log_memory("torch.export")
    drift = max_abs_diff_on_prompt(program, model, max_seq_len, attention)
    log.info("exported program vs eager: max |logits diff| %.3g", drift)
    if drift > 1e-3:
        raise RuntimeError(f"the exported program disagrees with the eager model (max |logits diff| {drift:.3g})")
    with atomic_output(out, min_bytes=saved_bytes(program)) as tmp:
        fingerprint = write_program(program, tmp)
        del program, model  # one copy of the weights at a time: the reload below is the second
        check_reloaded(tmp, fingerprint)
    return write_manifest(
        out,
        {"checkpoint": checkpoint_manifest},
        {"max_seq_len": max_seq_len, "dtype": "float32", "attention": attention},  # always FP32: quantize makes INT4
        {"eager_max_abs_diff": drift, "embedding_tables_dtype": tables},
        manifest=out_manifest,
    )


def quantize(program_path: Path, group_size: int, embeddings: str, out: Path, out_manifest: Path) -> dict:
    from gemma_edge.build.export import check_reloaded, load_program, saved_bytes, write_program
    from gemma_edge.build.quantize import quantize_program

    verify_against_manifest(program_path)
    quantized, report = quantize_program(load_program(program_path), group_size, embeddings)
    log_memory("quantizing and re-exporting")
    with atomic_output(out, min_bytes=saved_bytes(quantized)) as tmp:
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
    from gemma_edge.build.export import context_length_of, kv_cache_bytes_of, load_program, tokens_per_call_of
    from gemma_edge.build.lower import lower_with_fallback, runner_metadata
    from gemma_edge.model.checkpoint import read_text_config_dict

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
    from gemma_edge.build.parity import Gates, compare_prompt, encode_prompts, render_table, summarise
    from gemma_edge.device.runtime import PteDecoder
    from gemma_edge.model.checkpoint import load_checkpoint
    from gemma_edge.workflow.config import check_prompts_fit

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
            "path": portable_path(pte_path),
            "sha256": pte_manifest["sha256"],
            "lowering": pte_manifest["lowering"],
        },
        "checkpoint": {"repo_id": checkpoint["repo_id"], "commit": checkpoint["commit"]},
        "reference": "eager FP32 transformers model, greedy, full recompute per token",
        "max_new_tokens": max_new_tokens,
        "gates": gates,
        "summary": summary,
        "prompts": results,
        "versions": package_versions(),
    }
    table = render_table(prompts, results, summary)
    log.info("parity:\n%s", table)
    if not summary["passed"]:
        rejected = Path(out_json).with_name(Path(out_json).stem + ".rejected.json")
        write_json(rejected, report)
        raise RuntimeError(f"parity gates missed: {'; '.join(summary['failures'])} (details in {rejected})")
    with atomic_output(out_log) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    write_json(out_json, report)
    return report


def context_check(checkpoint_manifest: Path, prompts: list[str], max_new_tokens: int, max_seq_len: int, out: Path) -> dict:
    """The verify prompts plus their new tokens against the context, counted with the checkpoint's
    tokenizer as soon as it exists (before export); without one, the verify step counts them."""
    from gemma_edge.workflow.config import check_prompts_fit, checkpoint_prompt_counts

    counts = checkpoint_prompt_counts(checkpoint_manifest, prompts)
    if counts is None:
        log.info("the checkpoint has no tokenizer.json: the verify step counts the prompts with the .pte's")
    else:
        log.info("positions per prompt, BOS included: %s; max_new_tokens %d; max_seq_len %d", counts, max_new_tokens, max_seq_len)
    check_prompts_fit(prompts, counts, max_new_tokens, max_seq_len)
    tokenizer = f"{read_json(checkpoint_manifest)['path']}/tokenizer.json" if counts is not None else None
    # What this record says holds whatever the config later says: the plan-time check takes over.
    record = {"checkpoint": str(checkpoint_manifest), "tokenizer": tokenizer}
    write_json(out, record)
    return record
