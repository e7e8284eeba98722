"""Benchmark and greedy tokens of a LiteRT-LM `.litertlm`, run where it will run (the device).

Needs only the standard library, `litert-lm-api` (import name `litert_lm`) and `peer_bench` beside
it, so it runs on a Pi with the runner files and the wheel unpacked on `PYTHONPATH`
(`peer_bench.bench_litert` does that):

    python3 -m gemma_edge.device.litert_bench --model model.litertlm --spec spec.json --out bench.json

The spec holds `threads`, `prompt_lengths`, `new_tokens`, `repetitions`, `warmup`, and optionally
`max_seq_len` (the KV cache length the model was converted with), `parity_prompt_ids` (prompts as
token ids, BOS first), `max_new_tokens` and `cache_dir` (where the runtime may write its
`.xnnpack_cache`; default: beside the model).

What times what (litert-lm-api 0.18.1):
- The figures per prompt length come from `litert_lm.Benchmark(...).run()`, one call per
  repetition. Each call creates an engine in benchmark mode (`CPU(thread_count=threads)`,
  `prefill_tokens` = the prompt length, `decode_tokens` = new_tokens), prefills a prompt padded
  with id 0 to exactly that many tokens in one prefill turn, decodes that many tokens, and returns
  the runtime's own timers (`BenchmarkInfo`): `init_time_in_second` (engine and session creation,
  model load included), `time_to_first_token_in_second`, and tokens per second of the last
  prefill turn and of the last decode turn. We add the wall time of the whole call (`wall_s`).
  llama-bench shape: `prefill_tps`, `decode_tps`, `ttft_s`, `init_s` each as
  {avg, stddev, median, min, max, samples} (`peer_bench.summarise`).
  The first load writes `<model>_<...>.xnnpack_cache` into `cache_dir`: the warm-up runs pay for
  it, the timed ones reuse it.
- `load_s` is the wall time of one `litert_lm.Engine(...)` with a warm cache.
- Greedy tokens: the Python API takes text, not token ids, and returns text. So each prompt's ids
  (after BOS, which the session adds itself) are turned into text with `Engine.detokenize`,
  checked to tokenize back to the same ids (`prompt_ids_exact`), and prefilled with
  `Session.run_prefill` in a session without prompt template and with a top-1 sampler;
  `Session.run_decode_async` then streams one chunk of text per generated token (`pieces`). Each
  piece is mapped back to its id with `Engine.tokenize` where that gives exactly one id
  (`tokens`; None elsewhere). Decoding stops at the model's stop token or after max_new_tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

from gemma_edge.device.memory import ResidentPeaks
from gemma_edge.device.peer_bench import summarise


def cpu_backend(threads: int | None):
    import litert_lm

    return litert_lm.Backend.CPU(thread_count=int(threads) if threads else None)


def benchmark_once(
    model: Path, threads: int | None, prompt_tokens: int, new_tokens: int, max_seq_len: int | None, cache_dir: str
) -> dict:
    """One `litert_lm.Benchmark(...).run()`: the runtime's own timers, plus its wall time."""
    import litert_lm

    started = time.perf_counter()
    info = litert_lm.Benchmark(
        model_path=str(model),
        backend=cpu_backend(threads),
        prefill_tokens=prompt_tokens,
        decode_tokens=new_tokens,
        max_num_tokens=max_seq_len,
        cache_dir=cache_dir,
    ).run()
    wall = time.perf_counter() - started
    return {
        "init_s": info.init_time_in_second,
        "ttft_s": info.time_to_first_token_in_second,
        "prefill_tokens": info.last_prefill_token_count,
        "prefill_tps": info.last_prefill_tokens_per_second,
        "decode_tokens": info.last_decode_token_count,
        "decode_tps": info.last_decode_tokens_per_second,
        "wall_s": wall,
    }


class BenchFailed(RuntimeError):
    """The runtime returned figures for less work than asked (it logs why to stderr)."""


def check_sample(sample: dict, prompt_tokens: int, new_tokens: int) -> dict:
    """`Benchmark.run()` does not raise when a signature fails inside the runtime: XNNPACK refusing
    a tensor (an INT4 channel whose scale is 0, from an all-zero weight row) leaves 0 decode tokens
    at 0 tok/s. Refuse such a sample rather than summarise it."""
    if (
        sample["prefill_tokens"] != prompt_tokens
        or sample["decode_tokens"] != new_tokens
        or sample["prefill_tps"] <= 0
        or sample["decode_tps"] <= 0
    ):
        raise BenchFailed(
            f"LiteRT-LM prefilled {sample['prefill_tokens']} of {prompt_tokens} tokens and decoded "
            f"{sample['decode_tokens']} of {new_tokens} ({sample['decode_tps']:.1f} tok/s): see the "
            "runtime's errors above (e.g. a tensor the XNNPACK delegate refused)"
        )
    return sample


def bench_prompt_length(model: Path, prompt_tokens: int, spec: dict, cache_dir: str) -> dict:
    """`warmup` untimed runs, then `repetitions` timed ones, each checked, summarised."""
    args = (model, spec.get("threads"), prompt_tokens, spec["new_tokens"], spec.get("max_seq_len"), cache_dir)
    warmups = [check_sample(benchmark_once(*args), prompt_tokens, spec["new_tokens"]) for _ in range(spec["warmup"])]
    samples = [check_sample(benchmark_once(*args), prompt_tokens, spec["new_tokens"]) for _ in range(spec["repetitions"])]
    return {
        "first_init_s": (warmups or samples)[0]["init_s"],
        "prompt_tokens": prompt_tokens,
        "new_tokens": spec["new_tokens"],
        "repetitions": spec["repetitions"],
        "prefill_tokens_counted": [s["prefill_tokens"] for s in samples],
        "decode_tokens_counted": [s["decode_tokens"] for s in samples],
        "prefill_tps": summarise([s["prefill_tps"] for s in samples]),
        "decode_tps": summarise([s["decode_tps"] for s in samples]),
        "ttft_s": summarise([s["ttft_s"] for s in samples]),
        "init_s": summarise([s["init_s"] for s in samples]),
        "wall_s": summarise([s["wall_s"] for s in samples]),
    }


def open_engine(model: Path, threads: int | None, max_seq_len: int | None, cache_dir: str):
    import litert_lm

    return litert_lm.Engine(str(model), cpu_backend(threads), max_num_tokens=max_seq_len, cache_dir=cache_dir)


def greedy_tokens(engine, prompt_ids: list[int], max_new_tokens: int) -> dict:
    """Greedy continuation of `prompt_ids` (BOS first), through the text-only API (see the module
    docstring): the generated pieces, their ids where unambiguous, and whether the prompt text
    re-tokenizes to exactly the given ids."""
    import litert_lm

    bos = engine.bos_token_id
    if not prompt_ids or prompt_ids[0] != bos:
        raise ValueError(f"prompt ids must start with the model's BOS id {bos}: the session adds BOS itself")
    text = engine.detokenize(list(prompt_ids[1:]))
    exact = engine.tokenize(text) == list(prompt_ids[1:])
    session = engine.create_session(
        apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=max_new_tokens
    )
    try:
        session.run_prefill([text])
        pieces = [chunk.texts[0] for chunk in session.run_decode_async() if chunk.texts]
    finally:
        session.close()
    tokens = []
    for piece in pieces:
        ids = engine.tokenize(piece)
        tokens.append(ids[0] if len(ids) == 1 else None)
    return {"prompt_ids": list(prompt_ids), "prompt_ids_exact": exact, "pieces": pieces, "tokens": tokens}


def run_bench(model: Path, spec: dict) -> dict:
    """Benchmark figures per prompt length, load time and the parity prompts' greedy tokens."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    model = Path(model).resolve()
    cache_dir = str(Path(spec.get("cache_dir") or model.parent).resolve())
    os.makedirs(cache_dir, exist_ok=True)  # the runtime refuses a cache_dir that does not exist
    max_seq_len = spec.get("max_seq_len")
    for length in spec["prompt_lengths"]:
        if max_seq_len and length + spec["new_tokens"] > max_seq_len:
            raise ValueError(f"prompt length {length} + {spec['new_tokens']} new tokens exceeds max_seq_len {max_seq_len}")
    runs = []
    resident = ResidentPeaks().start()  # this process runs LiteRT-LM alone
    for length in spec["prompt_lengths"]:
        runs.append(bench_prompt_length(model, length, spec, cache_dir))
        print(
            f"prompt {length}: prefill {runs[-1]['prefill_tps']['avg']:.1f} tok/s, "
            f"decode {runs[-1]['decode_tps']['avg']:.1f} tok/s",
            flush=True,
        )
    started = time.perf_counter()
    engine = open_engine(model, spec.get("threads"), max_seq_len, cache_dir)
    load_s = time.perf_counter() - started
    try:
        greedy = [greedy_tokens(engine, ids, spec.get("max_new_tokens", 16)) for ids in spec.get("parity_prompt_ids", [])]
        stop_ids = engine.eos_token_ids
        bos_id = engine.bos_token_id
    finally:
        engine.close()
        resident.stop()
    return {
        "engine": "litert-lm",
        "model": model.name,
        "threads": spec.get("threads"),
        "load_s": load_s,
        # The process's first load: its XNNPACK weight cache written into a new cache_dir (the
        # benchmarks give it one each run); load_s is a later one, reading that cache.
        "first_load_s": runs[0]["first_init_s"],
        "runs": runs,
        "greedy": greedy,
        "bos_id": bos_id,
        "stop_ids": stop_ids,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
        "resident": resident.summary(),
        "device": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "libc": list(platform.libc_ver()),
            "cores": os.cpu_count(),
            "qemu_cpu": os.environ.get("QEMU_CPU"),
        },
        "versions": {"litert-lm-api": metadata.version("litert-lm-api")},
        "runtime": "litert_lm.Benchmark(...).run() per repetition (the runtime's own timers); "
        "greedy tokens through Engine/Session, text in and text out",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="litert_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="a file, or - for standard output")
    args = parser.parse_args(argv)
    try:
        result = run_bench(args.model, json.loads(args.spec.read_text()))
    except BenchFailed as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
