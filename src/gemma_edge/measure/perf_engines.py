"""The host performance benchmark's engines: our .pte, eager FP32 PyTorch, llama.cpp and LiteRT-LM
on the same checkpoint, each timed in a process of its own (one rule each), so one's memory and
threads never weigh on another's; the machine's load is sampled around each
(`peer_bench.timed_with_load`).

The .pte, eager and llama.cpp offer `step(tokens, start_pos) -> logits` and are timed by
`timing.timed_runs` (prefill in one call, then one call per decoded token), the device
benchmark's loop, so their numbers differ only by the engine. LiteRT-LM offers no such step: it is
timed by its runtime's own benchmark, as on a device (`peer_bench.bench_litert`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from gemma_edge.device.bandwidth import annotate_runs, measure_in_child
from gemma_edge.device.files import peak_rss_bytes, read_json, write_json
from gemma_edge.device.memory import ResidentPeaks
from gemma_edge.device.peer_bench import BUSY_SHARE, timed_with_load
from gemma_edge.device.peer_bench import bench_litert as run_litert_engine
from gemma_edge.device.runtime import greedy_decode
from gemma_edge.device.timing import synthetic_prompt, timed_runs
from gemma_edge.measure.weight_bytes import readable_weight_bytes, weight_bytes
from gemma_edge.workflow.manifest import package_versions

log = logging.getLogger(__name__)

ENGINES = ("pte", "eager", "llamacpp")  # timed by our loop; LiteRT-LM by its own (bench_litert)


class EagerDecoder:
    """The eager FP32 transformers model as it ships: its own attention and its own growing cache
    (which keeps a window's worth on sliding layers). A call at position 0 starts a new sequence."""

    def __init__(self, model, max_seq_len: int):
        self.model, self.max_seq_len, self.cache = model, max_seq_len, None

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        from transformers import DynamicCache

        if start_pos == 0:
            self.cache = DynamicCache(config=self.model.config)
        if start_pos + len(tokens) > self.max_seq_len:
            raise ValueError(f"position {start_pos + len(tokens)} is past max_seq_len {self.max_seq_len}")
        ids = torch.tensor([tokens], dtype=torch.long)
        positions = torch.arange(start_pos, start_pos + len(tokens), dtype=torch.long).unsqueeze(0)
        with torch.no_grad():
            output = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        return output.logits[0, -1]


class LlamaCppDecoder:
    """A GGUF model in llama.cpp (llama-cpp-python's bindings); `step` returns the last token's
    logits, and with `all_logits` `logits_of` returns every position's (the quality step's)."""

    def __init__(self, gguf_path: Path, max_seq_len: int, threads: int, all_logits: bool = False):
        import llama_cpp
        from llama_cpp import Llama

        # Prompts go in batches of up to 512 tokens, llama-bench's default micro-batch: a long context
        # then costs llama.cpp no more scratch memory than a short one.
        batch = min(max_seq_len, 512)
        self.llm = Llama(
            model_path=str(gguf_path),
            n_ctx=max_seq_len,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=all_logits,
            verbose=False,
        )
        self.vocab_size = self.llm.n_vocab()
        # The CPU features llama.cpp was built with and uses (AVX2, NEON, REPACK, ...).
        self.info = {"system_info": llama_cpp.llama_print_system_info().decode().strip()}

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        import numpy as np

        if start_pos != self.llm.n_tokens:
            if start_pos != 0:
                raise ValueError(f"llama.cpp context holds {self.llm.n_tokens} tokens, asked to continue at {start_pos}")
            self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab_size,)))

    def logits_of(self, tokens: list[int]) -> torch.Tensor:
        """Logits at every position of `tokens`, fed from position 0 in one batch (needs all_logits)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(self.llm.scores[: len(tokens)].copy())

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (from the GGUF's vocabulary), without BOS."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def set_threads(threads: int) -> None:
    """One thread count for every engine: torch's intra-op pool and ExecuTorch's threadpool."""
    torch.set_num_threads(threads)
    from gemma_edge.device.bindings import set_threads as set_runtime_threads

    set_runtime_threads(threads)


def open_engine(engine: str, artifact: Path, max_seq_len: int, threads: int):
    if engine == "pte":
        from gemma_edge.device.runtime import PteDecoder

        return PteDecoder(artifact)
    if engine == "eager":
        from gemma_edge.model.checkpoint import load_checkpoint

        model, _ = load_checkpoint(artifact)
        return EagerDecoder(model, max_seq_len)
    if engine == "llamacpp":
        return LlamaCppDecoder(artifact, max_seq_len, threads)
    raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")


def bench_engine(engine: str, artifact: Path, spec: dict, vocab_size: int, bos_id: int, out: Path) -> dict:
    """llama-bench's shape: a warm-up, then `repetitions` timed generations per prompt length."""
    threads = int(spec["threads"])
    set_threads(threads)
    # This host's memory read bandwidth at the same threads, just before the engine holds any memory.
    limit = measure_in_child(threads)
    log.info(
        "%s: memory read bandwidth at %d threads: %.1f ± %.1f GB/s (%s)",
        engine,
        threads,
        limit["gb_per_s"]["avg"],
        limit["gb_per_s"]["stddev"],
        limit["method"],
    )
    resident = ResidentPeaks().start()  # from the engine's load to its last token
    started = time.perf_counter()
    decoder = open_engine(engine, Path(artifact), int(spec["max_seq_len"]), threads)
    load_s = time.perf_counter() - started
    log.info("%s: loaded %s in %.1f s", engine, artifact, load_s)

    def all_lengths():
        runs = []
        for length in spec["prompt_lengths"]:

            def progress(index, sample, length=length):
                log.info(
                    "%s: prompt %d, repetition %d/%d: prefill %.1f tok/s, decode %.2f tok/s",
                    engine,
                    length,
                    index + 1,
                    spec["repetitions"],
                    sample["prefill_tps"],
                    sample["decode_tps"],
                )

            runs.append(timed_runs(decoder, synthetic_prompt(length, bos_id, vocab_size), spec, progress))
        return runs

    runs, load = timed_with_load(all_lengths)
    warn_if_busy(engine, load)
    # A few greedy tokens, so the table can say whether two engines computed the same thing.
    greedy = greedy_decode(decoder.step, synthetic_prompt(spec["prompt_lengths"][0], bos_id, vocab_size), 8)
    resident.stop()
    peak_rss = peak_rss_bytes()
    # The weight bytes a decoded token of the artifact reads (eager's FP32 checkpoint: not counted),
    # read after the peaks: the .pte's reader imports ExecuTorch's exporter, which the engine does not.
    weights = weight_bytes(Path(artifact)) if engine in ("pte", "llamacpp") else None
    annotate_runs(runs, weights, limit)
    result = {
        "engine": engine,
        "artifact": str(artifact),
        "threads": threads,
        "load_s": load_s,
        "peak_rss_bytes": peak_rss,
        "resident": resident.summary(),
        "runs": runs,
        "load": load,
        "bandwidth": limit,
        "weight_bytes": weights,
        "greedy_tokens": greedy,
        "engine_info": getattr(decoder, "info", None),
        "denormals_flushed": getattr(decoder, "denormals_flushed", None),  # the .pte's runtime (PteDecoder)
        "decodes_with": getattr(decoder, "decodes_with", None),  # the .pte's method for one token
        "versions": package_versions(("torch", "executorch", "transformers", "llama_cpp_python")),
    }
    write_json(out, result)
    return result


def warn_if_busy(engine: str, load: dict) -> None:
    if load["busy"]:
        log.warning(
            "%s: other processes used more than %.0f %% of the CPU around its runs (load average %.1f): "
            "its figures are not clean; re-run on a quiet machine",
            engine,
            100 * BUSY_SHARE,
            load["after"]["loadavg_1m"],
        )


def bench_litert(model: Path, spec: dict, requirements: Path, out: Path) -> dict:
    """LiteRT-LM on `model` (.litertlm) with the litert-lm-api wheel for this host, timed by its
    runtime's own benchmark as on a device; a LiteRT-LM that cannot run here is recorded with the
    reason, as on a device, and the table says so."""
    import platform

    from gemma_edge.peers import litert_runtime
    from gemma_edge.workflow.manifest import manifest_path

    recipe = read_json(manifest_path(model))["params"]
    peer = {
        "recipe": f"{recipe['quantization']}" + (f"-g{recipe['group_size']}" if recipe.get("group_size") else ""),
        "model": str(model),
        "max_seq_len": int(spec["max_seq_len"]),
    }
    try:
        version = litert_runtime.pinned_version(requirements)
        wheel, _ = litert_runtime.fetch_cached(
            version, platform.machine(), litert_runtime.default_cache(), ".".join(platform.python_version_tuple()[:2])
        )
        peer["binary"] = str(wheel)
    except litert_runtime.RuntimeUnavailable as error:
        peer.update(available=False, reason=str(error))
    limit = measure_in_child(int(spec["threads"]))
    result = {**run_litert_engine(peer, {**spec, "threads": int(spec["threads"])}, 3600), "bandwidth": limit}
    if result["available"]:
        result["weight_bytes"] = readable_weight_bytes(Path(model))
        annotate_runs(result["runs"], result["weight_bytes"], limit)
        warn_if_busy("litert", result["load"])
        first = result["runs"][0]
        log.info(
            "litert: prompt %d: prefill %.1f tok/s, decode %.2f tok/s",
            first["prompt_tokens"],
            first["prefill_tps"]["avg"],
            first["decode_tps"]["avg"],
        )
    else:
        log.warning("litert: not available: %s", result["reason"])
    write_json(out, {**result, "artifact": str(model)})
    return result
