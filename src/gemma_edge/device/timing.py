"""The timing loop: a synthetic prompt, one timed generation (prefill, then decode token by token)
and its repetitions, in llama-bench's shape (avg_ts, stddev_ts, samples_ts)."""

from __future__ import annotations

import time

from gemma_edge.device.peer_bench import (
    summarise,
)


def synthetic_prompt(length: int, bos_id: int, vocab_size: int) -> list[int]:
    """A deterministic prompt of `length` ids starting with BOS, avoiding the special ids 0..3."""
    return [bos_id] + [4 + (i * 7919) % (vocab_size - 4) for i in range(length - 1)]


def time_generation(decoder, prompt: list[int], new_tokens: int) -> dict:
    """Prefill `prompt` in one call, then decode `new_tokens` - 1 further tokens one call each."""
    import torch

    started = time.perf_counter()
    logits = decoder.step(prompt, 0)
    token = int(torch.argmax(logits))
    first_token = time.perf_counter()
    position = len(prompt)
    for _ in range(new_tokens - 1):
        logits = decoder.step([token], position)
        token = int(torch.argmax(logits))
        position += 1
    finished = time.perf_counter()
    decoded = max(new_tokens - 1, 1)
    return {
        "prefill_s": first_token - started,
        "decode_s": finished - first_token,
        "prefill_tps": len(prompt) / (first_token - started),
        "decode_tps": decoded / max(finished - first_token, 1e-9),
        "ttft_s": first_token - started,
    }


def timed_runs(decoder, prompt: list[int], spec: dict, on_sample=None) -> dict:
    """`warmup` untimed generations, then `repetitions` timed ones of `prompt`, summarised;
    `on_sample(index, sample)` sees each timed one as it ends (progress logging)."""
    for _ in range(spec["warmup"]):
        time_generation(decoder, prompt, spec["new_tokens"])
    samples = []
    for index in range(spec["repetitions"]):
        samples.append(time_generation(decoder, prompt, spec["new_tokens"]))
        if on_sample:
            on_sample(index, samples[-1])
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": spec["new_tokens"],
        "repetitions": spec["repetitions"],
        "prefill_tps": summarise([s["prefill_tps"] for s in samples]),
        "decode_tps": summarise([s["decode_tps"] for s in samples]),
        "ttft_s": summarise([s["ttft_s"] for s in samples]),
    }


def eos_id_set(meta: dict) -> set[int]:
    """The .pte's `get_eos_ids` (one id or a list) as a set."""
    eos = meta.get("get_eos_ids", [])
    return {int(i) for i in (eos if isinstance(eos, list) else [eos])}


def until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first EOS id: ExecuTorch's runner stops there, our parity loop does not."""
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return list(tokens)
