"""What quantization costs in quality: perplexity and KL divergence against eager FP32.

llama.cpp's `llama-perplexity --kl-divergence` is the measure the community trusts for a quantized
model; this is the same measure for our `.pte` and for llama.cpp's GGUF of the same checkpoint, on
the same token ids. A held-out text is tokenized once with the checkpoint's own tokenizer, cut into
chunks of the exported context (BOS, then context - 1 text tokens), and each chunk is fed to the
reference (eager FP32, one forward over the chunk) and to the candidate (the `.pte` one token per
call, as decode runs it; llama.cpp the whole chunk in one batch with every position's logits).
At each scored position both predict the next text token:

- perplexity = exp(mean negative log-likelihood of the true next token), for each of the two;
- KL(FP32 ‖ candidate) = Σ_v p(v) (log p(v) − log q(v)) per position, summarised by its mean (with
  its standard error), median, 99th percentile and maximum;
- top-1 agreement: the fraction of positions where both rank the same token first (llama.cpp's
  "same top p").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SCHEMA = "gemma-edge.quality/1"

# Which positions of a chunk (BOS at 0, then context - 1 text tokens) are scored, and why. At
# position i the logits predict token i + 1.
SCORED_POSITIONS = {
    "all": (
        "every position of each chunk but its last, so every text token of the chunk is predicted "
        "once, the first from BOS alone: both models see the same context at every position, so "
        "short-context positions test the quantization as fairly as long ones, and the text yields "
        "twice the tokens that scoring half of each chunk would"
    ),
    "second_half": (
        "the second half of each chunk, as llama.cpp's llama-perplexity scores (first = context / 2): "
        "every scored token has at least half a context before it, so perplexity is less inflated by "
        "short contexts and closer to figures published with that tool"
    ),
}

SYNTHETIC_REASON = (
    "randomly initialised weights (models.<name>.synthetic): such a model has learned no text, so its "
    "perplexity and its KL divergence from FP32 say nothing about what quantization costs a trained "
    "model; the step scores nothing and records this instead of numbers that would read as quality"
)

# Positions whose KL is computed at once (E2B's 262,144-entry vocabulary: 256 MB of float64 a slice).
SLICE = 128


@dataclass
class Gates:
    """Optional limits (None: not checked); a missed one fails the step."""

    max_mean_kl: float | None = None
    max_ppl_ratio: float | None = None
    min_top1_agreement: float | None = None


def text_ids(tokenizer_path: Path, text: str) -> list[int]:
    """The text's ids as the checkpoint's tokenizer makes them, without special tokens."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).encode(text, add_special_tokens=False).ids


def text_chunks(ids: list[int], bos_id: int, context: int, max_tokens: int) -> list[list[int]]:
    """BOS and the next context - 1 text tokens, over the first `max_tokens` text tokens; a last
    piece shorter than a whole chunk is left out, as llama-perplexity leaves it out."""
    width = context - 1
    usable = min(len(ids), max_tokens) // width * width
    if usable == 0:
        raise ValueError(
            f"the quality text has {len(ids)} tokens (quality.max_tokens {max_tokens}): fewer than one "
            f"chunk of the exported context ({context} tokens, BOS included)"
        )
    return [[bos_id] + ids[start : start + width] for start in range(0, usable, width)]


def scored_positions(length: int, policy: str) -> range:
    """Positions of a chunk of `length` tokens whose logits are scored (each predicts the next token)."""
    if policy == "all":
        return range(0, length - 1)
    if policy == "second_half":
        return range(length // 2, length - 1)
    raise ValueError(f"quality.scored_positions {policy!r} is not one of {', '.join(SCORED_POSITIONS)}")


def ids_digest(chunks: list[list[int]]) -> str:
    """sha256 of the chunks' ids: equal digests mean two results scored exactly the same ids."""
    return hashlib.sha256(json.dumps(chunks).encode()).hexdigest()


def pte_logits(decoder, chunk: list[int]) -> torch.Tensor:
    """The .pte's logits at positions 0 .. len - 2, one token per call (its forward returns the
    last position's logits only; decode calls it this way too)."""
    return torch.stack([decoder.step([token], position) for position, token in enumerate(chunk[:-1])])


def eager_logits(model, chunk: list[int]) -> torch.Tensor:
    """Eager FP32's logits at positions 0 .. len - 2, in one forward over the chunk."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([chunk[:-1]])).logits[0].to(torch.float32)


def token_scores(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position: KL(reference ‖ candidate), each one's negative log-likelihood of the target
    and whether their top-1 tokens agree (float64 throughout)."""
    if reference.shape != candidate.shape:
        raise ValueError(
            f"the candidate's logits have shape {tuple(candidate.shape)}, the reference's "
            f"{tuple(reference.shape)}: not the same vocabulary"
        )
    parts = {"kl": [], "nll_reference": [], "nll": [], "top1_same": []}
    for start in range(0, len(targets), SLICE):
        p = torch.log_softmax(reference[start : start + SLICE].to(torch.float64), dim=-1)
        q = torch.log_softmax(candidate[start : start + SLICE].to(torch.float64), dim=-1)
        wanted = targets[start : start + SLICE, None]
        parts["kl"].append((p.exp() * (p - q)).sum(-1))
        parts["nll_reference"].append(-p.gather(-1, wanted)[:, 0])
        parts["nll"].append(-q.gather(-1, wanted)[:, 0])
        parts["top1_same"].append(p.argmax(-1) == q.argmax(-1))
    return {name: torch.cat(values) for name, values in parts.items()}


def score_chunks(chunks: list[list[int]], reference, candidate, policy: str, progress=None) -> dict[str, torch.Tensor]:
    """token_scores over every chunk's scored positions; `reference` and `candidate` map a chunk to
    its logits at positions 0 .. len - 2."""
    collected = []
    for index, chunk in enumerate(chunks):
        positions = torch.tensor(list(scored_positions(len(chunk), policy)))
        targets = torch.tensor(chunk)[positions + 1]
        collected.append(token_scores(reference(chunk)[positions], candidate(chunk)[positions], targets))
        if progress:
            progress(index, collected[-1])
    return {name: torch.cat([c[name] for c in collected]) for name in collected[0]}


def summarise(scores: dict[str, torch.Tensor]) -> dict:
    """The figures llama-perplexity prints for a KL run, from the per-token scores."""
    kl, tokens = scores["kl"], len(scores["kl"])
    nll, nll_reference = float(scores["nll"].mean()), float(scores["nll_reference"].mean())
    return {
        "tokens": tokens,
        "perplexity": math.exp(nll),
        "fp32_perplexity": math.exp(nll_reference),
        "ppl_ratio": math.exp(nll - nll_reference),
        "kl": {
            "mean": float(kl.mean()),
            "stderr": float(kl.std() / math.sqrt(tokens)) if tokens > 1 else None,
            "median": float(kl.median()),
            "p99": float(torch.quantile(kl, 0.99)),
            "max": float(kl.max()),
        },
        "top1_agreement": float(scores["top1_same"].to(torch.float64).mean()),
    }


def perplexity_note(fp32_perplexity: float, vocab_size: int) -> str | None:
    """A warning when eager FP32 itself predicts the text worse than a uniform guess would."""
    if fp32_perplexity <= vocab_size:
        return None
    return (
        f"eager FP32's perplexity ({fp32_perplexity:.0f}) is above {vocab_size}, a uniform guess over the vocabulary: "
        "the model has not learned text like this, so perplexity and its ratio say little here (quantization noise "
        "that flattens an overconfident distribution can even lower it); KL divergence and top-1 agreement still "
        "measure how far quantization moves the model from FP32"
    )


def gate_failures(summary: dict, gates: Gates) -> list[str]:
    failures = []
    if gates.max_mean_kl is not None and summary["kl"]["mean"] > gates.max_mean_kl:
        failures.append(f"mean KL divergence {summary['kl']['mean']:.4g} > {gates.max_mean_kl}")
    if gates.max_ppl_ratio is not None and summary["ppl_ratio"] > gates.max_ppl_ratio:
        failures.append(f"perplexity ratio {summary['ppl_ratio']:.4f} > {gates.max_ppl_ratio}")
    if gates.min_top1_agreement is not None and summary["top1_agreement"] < gates.min_top1_agreement:
        failures.append(f"top-1 agreement {summary['top1_agreement']:.4f} < {gates.min_top1_agreement}")
    return failures


def compare_tokenizations(ours: list[int], theirs: list[int], piece=str) -> dict:
    """Do two tokenizers give the same ids for a text? If not, where they first part, as pieces."""
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if first is None and len(ours) != len(theirs):
        first = min(len(ours), len(theirs))
    result = {"identical": first is None, "ours": len(ours), "theirs": len(theirs), "first_difference": first}
    if first is not None:
        result["ours_from_there"] = [piece(i) for i in ours[first : first + 4]]
        result["theirs_from_there"] = [piece(i) for i in theirs[first : first + 4]]
    return result


def render(result: dict) -> str:
    """One line for the log and the terminal."""
    if not result["meaningful"]:
        return f"{result['variant']}: not scored: {result['reason']}"
    s = result["summary"]
    return (
        f"{result['variant']}: {s['tokens']} tokens, perplexity {s['perplexity']:.4f} (FP32 {s['fp32_perplexity']:.4f}, "
        f"ratio {s['ppl_ratio']:.4f}), KL mean {s['kl']['mean']:.5f} ± {s['kl']['stderr'] or 0:.5f}, median "
        f"{s['kl']['median']:.5f}, p99 {s['kl']['p99']:.4f}, max {s['kl']['max']:.4f}, top-1 agreement "
        f"{s['top1_agreement']:.4f}"
    )


def open_candidate(engine: str, artifact: Path, context: int | None, threads: int):
    """The engine under test on `artifact`: (logits of a chunk, its context, facts to record)."""
    if engine == "pte":
        from gemma_edge.device.runtime import PteDecoder

        decoder = PteDecoder(artifact)
        return (
            (lambda chunk: pte_logits(decoder, chunk)),
            decoder.context,
            {
                "bos_id": decoder.metadata["get_bos_id"],
                "how": "the .pte in the ExecuTorch runtime, one token per call "
                "against its in-graph KV cache (as decode runs it), from position 0 for each chunk",
            },
        )
    if engine == "llamacpp":
        from gemma_edge.measure.perf_engines import LlamaCppDecoder

        decoder = LlamaCppDecoder(artifact, context, threads, all_logits=True)
        return (
            (lambda chunk: decoder.logits_of(chunk[:-1])),
            context,
            {
                "decoder": decoder,
                "how": "llama.cpp (llama-cpp-python) on the GGUF, fed our token ids, each chunk in "
                "one batch from an empty context, with the logits of every position (logits_all)",
            },
        )
    raise ValueError(f"unknown quality engine {engine!r}; expected pte or llamacpp")


def measure(
    engine: str,
    artifact: Path,
    model,
    tokenizer_path: Path,
    bos_id: int,
    text: str,
    max_tokens: int,
    policy: str,
    threads: int,
    context: int | None = None,
) -> dict:
    """Score `engine` on `artifact` against the eager FP32 `model` over `text` (see the module's doc)."""
    import time

    candidate, context, facts = open_candidate(engine, Path(artifact), context, threads)
    if facts.get("bos_id", bos_id) != bos_id:
        raise ValueError(f"{artifact} was exported with BOS id {facts['bos_id']}, the checkpoint's is {bos_id}")
    ids = text_ids(tokenizer_path, text)
    chunks = text_chunks(ids, bos_id, context, max_tokens)
    seconds = {"reference": 0.0, "candidate": 0.0}

    def timed(name, logits_of):
        def run(chunk):
            started = time.perf_counter()
            logits = logits_of(chunk)
            seconds[name] += time.perf_counter() - started
            return logits

        return run

    def progress(index, scores):
        if index % 8 == 7 or index == len(chunks) - 1:
            log.info("%s: chunk %d/%d, mean KL in this chunk %.5f", engine, index + 1, len(chunks), float(scores["kl"].mean()))

    scores = score_chunks(
        chunks, timed("reference", lambda chunk: eager_logits(model, chunk)), timed("candidate", candidate), policy, progress
    )
    result = {
        "tokens": {
            "text": len(ids),
            "used": sum(len(c) - 1 for c in chunks),
            "ids_sha256": ids_digest(chunks),
            "tokenizer": "the checkpoint's tokenizer.json (Hugging Face tokenizers), no special tokens; BOS "
            f"(id {bos_id}) opens every chunk",
        },
        "chunks": {"count": len(chunks), "context": context, "scored_positions": policy, "why": SCORED_POSITIONS[policy]},
        "reference": "eager FP32 transformers model, one forward over each chunk (no cache)",
        "candidate": facts["how"],
        "summary": summarise(scores),
        "seconds": seconds,
    }
    note = perplexity_note(result["summary"]["fp32_perplexity"], int(model.config.vocab_size))
    if note:
        result["note"] = note
        log.warning("%s", note)
    if engine == "llamacpp":
        from tokenizers import Tokenizer

        piece = Tokenizer.from_file(str(tokenizer_path)).id_to_token
        result["llamacpp_tokenizer"] = {
            **compare_tokenizations(ids, facts["decoder"].tokenize(text), piece),
            "used": "ours: llama.cpp was fed the checkpoint tokenizer's ids, so both engines score the same ids "
            "whatever llama.cpp's own tokenizer makes of the text",
        }
    return result
