"""Run a .pte with the ExecuTorch runtime: the same code on the host and on the device."""

from __future__ import annotations

from pathlib import Path

import torch

from gemma_edge.device.bindings import load_program, method_names, set_threads
from gemma_edge.device.files import ArtifactError
from gemma_edge.device.page_locks import release_page_cache, unlock_program_pages

# A .pte's method for one token a call, beside `forward` (1 to get_max_seq_len tokens a call), sharing
# its KV cache: the lower step adds it (lower.decode_program), and `PteDecoder` decodes with it. Not
# named `decode`: ExecuTorch 1.5.1's LLM runner decodes with a method of that name when a .pte has
# one, in a Module that does not share memory arenas between methods, so it read an empty cache.
DECODE_METHOD = "forward_one_token"


def flush_denormals(threads: int | None = None) -> bool:
    """Treat subnormal floats as zero (x86 FTZ/DAZ, Arm FZ) on this thread and on ExecuTorch's worker
    threads, the pool sized to `threads` (None: its present size); return whether the CPU does.

    Attention over a long context gives values (most likely softmax weights) below FP32's smallest
    normal number (1.2e-38), and the CPU computes with those in a slow path. XNNPACK flushes them inside its own
    operators; ExecuTorch's custom ops between its delegates (`custom_sdpa`) do not. Measured on
    the e2b-4l program at 4,000 tokens of context, 2 threads: decode 39-50 ms a token from a varied
    prompt against 24-29 ms from a constant one (whose attention has no such tails); flushed, the
    varied prompt 25-35 ms (docs/design.md, "Flushing subnormal floats"). The setting lives in each thread's floating-point
    control register and a new thread copies its creator's, so the pool is restarted after it."""
    flushed = torch.set_flush_denormal(True)
    set_threads(threads)
    return flushed


class PteDecoder:
    """A lowered decoder's `forward(tokens, input_pos) -> logits` method, loaded, and its one-token
    method (DECODE_METHOD) where the .pte has one."""

    def __init__(self, pte_path: Path):
        self.denormals_flushed = flush_denormals()
        # Map the program's segments without locking them in memory (page_locks: the embedding
        # tables stay on disk until a token reads their row, and can be reclaimed).
        self.page_locks = unlock_program_pages()

        try:
            program = load_program(pte_path)
            names = method_names(program)
            self.method = program.load_method("forward")
            self.decode_method = program.load_method(DECODE_METHOD) if DECODE_METHOD in names else None
        except Exception as error:  # noqa: BLE001 - the runtime reports load failures as RuntimeError/ValueError
            raise ArtifactError(f"{pte_path} could not be loaded by the ExecuTorch runtime: {error}") from error
        release_page_cache(pte_path)
        self.metadata = {name: _constant(program, name) for name in names if name not in ("forward", DECODE_METHOD)}
        self.decodes_with = DECODE_METHOD if self.decode_method is not None else "forward"  # recorded beside the timings
        # The most tokens one call takes (ExecuTorch's runner prefills in chunks of it too), and the
        # positions the KV cache holds (the same number in a .pte from before ring buffers).
        self.tokens_per_call = int(self.metadata.get("get_max_seq_len", 0)) or None
        self.context = int(self.metadata.get("get_max_context_len", self.tokens_per_call or 0)) or None

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Feed `tokens` at positions start_pos.. and return the last position's logits (float32, 1-D),
        in calls of at most `tokens_per_call` tokens; one token goes to the decode method if there is one."""
        method = self.decode_method if len(tokens) == 1 and self.decode_method is not None else self.method
        chunk = self.tokens_per_call or len(tokens)
        for first in range(0, len(tokens), chunk):
            part = tokens[first : first + chunk]
            ids = torch.tensor([part], dtype=torch.long)
            positions = torch.arange(start_pos + first, start_pos + first + len(part), dtype=torch.long)
            logits = method([ids, positions])[0][0]
        return logits.to(torch.float32)


def _constant(program, name: str):
    values = program.load_method(name)([])
    values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    return values[0] if len(values) == 1 else values


def greedy_decode(step, prompt: list[int], max_new_tokens: int, eos_ids=()) -> list[int]:
    """Prefill `prompt` in one call, then decode one token per call; stops early at an EOS id."""
    logits = step(prompt, 0)
    out = []
    position = len(prompt)
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits))
        out.append(token)
        if token in eos_ids:
            break
        logits = step([token], position)
        position += 1
    return out


def teacher_forced_logits(step, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """Logits predicting each token of `continuation`, feeding the true previous token every time."""
    logits = [step(prompt, 0)]
    position = len(prompt)
    for token in continuation[:-1]:
        logits.append(step([token], position))
        position += 1
    return logits
