"""The quality columns of the sweep's summary and its quality table: KL divergence and perplexity
per variant, beside llama.cpp's GGUFs on the same tokens."""

from __future__ import annotations

from gemma_edge.workflow.table import text_table


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
    """A row's quality against eager FP32 (gemma_edge.measure.quality), or why it has none."""
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
    columns = (("perplexity", ".4f"), ("ppl_ratio", ".4f"), ("kl_mean", ".5f"), ("kl_median", ".5f"), ("kl_p99", ".4f"))
    columns += (("top1_agreement", ".4f"),)
    rows = []
    for e in table:
        if e.get("meaningful") is False:
            rows.append([e["variant"], f"not measured: {e['reason'].split(':')[0]}", *[""] * len(columns)])
            continue
        cells = [format(e[key], spec) if e.get(key) is not None else "-" for key, spec in columns]
        rows.append([e["variant"], *cells, e["tokens"]])
    headers = ["variant", "PPL", "PPL/FP32", "KL mean", "KL med", "KL p99", "top-1", "tokens"]
    return text_table(headers, rows, "lrrrrrrr")
