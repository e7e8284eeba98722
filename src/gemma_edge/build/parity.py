"""Token parity of a lowered .pte against the eager FP32 checkpoint.

Free-running greedy decoding is reported (matched tokens, first divergence) but cascades after the
first flip, so the gates also use teacher forcing: the .pte is fed the reference's own tokens and
its top-1 choice and logits are compared position by position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gemma_edge.device.runtime import greedy_decode, teacher_forced_logits
from gemma_edge.workflow.table import text_table

log = logging.getLogger(__name__)

# A reference choice whose top-2 logit gap is below this is a numerical tie: kernels that sum in
# another order (XNNPACK vs eager, even both in FP32) may legitimately pick the other token.
TIE_MARGIN = 1e-2


@dataclass
class Gates:
    min_greedy_prefix: float
    min_teacher_forced_top1: float
    min_logits_cosine: float


def encode_prompts(tokenizer_path, prompts: list[str], bos_id: int) -> list[list[int]]:
    """Token ids as the checkpoint's tokenizer makes them, with BOS first (added if the tokenizer did not)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=True).ids
        encoded.append(ids if ids[:1] == [bos_id] else [bos_id] + ids)
    return encoded


def eager_reference(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the eager model (full recompute each step, no cache), and the logits that chose them.

    Only the positions needed leave the head: with E2B's 262,144-entry vocabulary a 1,400-token
    prompt's every-position logits would be 1.5 GB per step."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([sequence]), logits_to_keep=1).logits[0, -1]
            sequence.append(int(torch.argmax(logits)))
        # The positions that predicted each new token: the last max_new_tokens of sequence[:-1].
        chosen = model(input_ids=torch.tensor([sequence[:-1]]), logits_to_keep=max_new_tokens).logits[0].to(torch.float32)
    tokens = sequence[len(prompt) :]
    return tokens, list(chosen)


def compare_prompt(pte_step, model, prompt: list[int], max_new_tokens: int) -> dict:
    reference, reference_logits = eager_reference(model, prompt, max_new_tokens)
    produced = greedy_decode(pte_step, prompt, max_new_tokens)
    forced = teacher_forced_logits(pte_step, prompt, reference)
    top1 = [int(torch.argmax(f)) == t for f, t in zip(forced, reference)]
    flips = [
        {"position": i, "reference_top2_margin": top2_margin(reference_logits[i]), "pte_token": int(torch.argmax(forced[i]))}
        for i, agreed in enumerate(top1)
        if not agreed
    ]
    cosines = [float(torch.nn.functional.cosine_similarity(f, r, dim=0)) for f, r in zip(forced, reference_logits)]
    divergence = next((i for i, (a, b) in enumerate(zip(produced, reference)) if a != b), None)
    return {
        "prompt_ids": prompt,
        "reference_tokens": reference,
        "pte_tokens": produced,
        "matched": sum(a == b for a, b in zip(produced, reference)),
        "first_divergence": divergence,
        "greedy_prefix": (max_new_tokens if divergence is None else divergence) / max_new_tokens,
        "teacher_forced_top1": sum(top1) / len(top1),
        "logits_cosine_mean": sum(cosines) / len(cosines),
        "logits_cosine_min": min(cosines),
        "teacher_forced_flips": flips,
    }


def top2_margin(logits: torch.Tensor) -> float:
    """Gap between the best and second-best logit: how close to a tie the reference's choice was."""
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def summarise(results: list[dict], gates: Gates) -> dict:
    mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
    summary = {
        "greedy_prefix": mean("greedy_prefix"),
        "greedy_exact_prompts": sum(r["first_divergence"] is None for r in results),
        "first_token_match_prompts": sum(r["first_divergence"] != 0 for r in results),
        "teacher_forced_top1": mean("teacher_forced_top1"),
        "logits_cosine": mean("logits_cosine_mean"),
        "decisive_flips": sum(f["reference_top2_margin"] >= TIE_MARGIN for r in results for f in r["teacher_forced_flips"]),
        "tie_flips": sum(f["reference_top2_margin"] < TIE_MARGIN for r in results for f in r["teacher_forced_flips"]),
        "prompts": len(results),
    }
    failures = []
    if summary["greedy_prefix"] < gates.min_greedy_prefix:
        failures.append(f"greedy prefix {summary['greedy_prefix']:.3f} < {gates.min_greedy_prefix}")
    if summary["teacher_forced_top1"] < gates.min_teacher_forced_top1:
        failures.append(f"teacher-forced top-1 {summary['teacher_forced_top1']:.3f} < {gates.min_teacher_forced_top1}")
    if summary["logits_cosine"] < gates.min_logits_cosine:
        failures.append(f"logits cosine {summary['logits_cosine']:.4f} < {gates.min_logits_cosine}")
    summary["passed"] = not failures
    summary["failures"] = failures
    return summary


def render_table(prompts: list[str], results: list[dict], summary: dict) -> str:
    rows = []
    for text, r in zip(prompts, results):
        div = "-" if r["first_divergence"] is None else str(r["first_divergence"])
        rows.append(
            [
                text[:32],
                len(r["prompt_ids"]),
                f"{r['matched']}/{len(r['reference_tokens'])}",
                div,
                f"{r['teacher_forced_top1']:.3f}",
                f"{r['logits_cosine_min']:.4f}",
            ]
        )
    lines = [text_table(["prompt", "ids", "matched", "diverge", "tf-top1", "cos-min"], rows, "lrrrrr")]
    lines.append(
        f"greedy prefix {summary['greedy_prefix']:.3f}, exact {summary['greedy_exact_prompts']}/{summary['prompts']}, "
        f"first token {summary['first_token_match_prompts']}/{summary['prompts']}, teacher-forced top-1 "
        f"{summary['teacher_forced_top1']:.3f} (flips: {summary['decisive_flips']} decisive, {summary['tie_flips']} at ties "
        f"< {TIE_MARGIN}), logits cosine {summary['logits_cosine']:.4f}: "
        + ("PASSED" if summary["passed"] else "FAILED (" + "; ".join(summary["failures"]) + ")")
    )
    return "\n".join(lines)
