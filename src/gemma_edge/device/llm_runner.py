"""Greedy generation with ExecuTorch's own LLM runner (the C++ `TextLLMRunner`) on our .pte.

Users ship a .pte with that runner rather than with our Python loop, so this module runs it, on
the host or on the device, next to `device_bench` (standard library, torch and the executorch
wheel only; `pytorch_tokenizers`, which the runner's tokenizer comes from, is one of the
executorch wheel's own requirements):

    python -m gemma_edge.device.llm_runner --pte model.pte --tokenizer tokenizer.json \
        --prompts prompts.json --max-new-tokens 16 --threads 4 --out runner.json

What the binding (`executorch.extension.llm.runner.TextLLMRunner`, executorch 1.5.1) offers, and
how it meets our program:

- It takes the prompt as text only (`generate(prompt, GenerationConfig, token_callback,
  stats_callback)`) and tokenises it itself with the C++ HF tokenizer of `pytorch_tokenizers`,
  which adds BOS only when `GenerationConfig.num_bos` asks (it does not apply tokenizer.json's
  post-processor). So we ask for one BOS exactly when the tokenizer does not add it, and return
  the prompt ids that tokenizer makes, for the caller to compare with its own. Given a file (not
  a folder holding tokenizer_config.json), the tokenizer guesses BOS and EOS from the special
  tokens' names; the .pte's `get_eos_ids` then overrides its EOS.
- It calls `forward(tokens[1, T], input_pos[T])`: `input_pos` holds the T cache positions because
  the method's second input is declared longer than one element (our dynamic T). Prefill is one
  call of the whole prompt (`enable_dynamic_shape`), then one call per token. Our logits are
  [1, vocab]; its sampler takes the last row of a 2-D or 3-D tensor.
- It reads `get_max_seq_len` (required), `get_max_context_len`, `use_kv_cache`,
  `enable_dynamic_shape`, `use_sdpa_with_kv_cache` and `get_eos_ids` from the .pte; BOS and
  vocabulary size it takes from the tokenizer. The lower step writes all of these.
- Temperature 0 is greedy (first index of the largest logit, as torch.argmax). The default
  GenerationConfig samples at 0.8, so it is set explicitly. Generation stops at an id of
  `get_eos_ids` (the binding cannot turn that off), so our own loop is compared with the same ids.
- Generated tokens come back only as decoded text pieces, one per token, and pieces do not
  identify tokens: with Gemma's byte fallback `<0x41>` and `A` both decode to "A", and a lone
  byte above 0x7F is not valid UTF-8, which the binding raises on when it hands the piece to
  Python. So by default (`exact_ids`) the runner gets a copy of tokenizer.json without its
  `decoder` section: encoding is untouched (normaliser, pre-tokeniser, model, special tokens),
  and each piece is then the token's own vocabulary string, unique per id and valid UTF-8.
  With `exact_ids=False` it gets tokenizer.json as it is, as users run it, and pieces map back
  only where one id decodes to them.
- It prints each piece and a `PyTorchObserver {...}` line to standard output itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def binding_missing() -> str | None:
    """Why ExecuTorch's LLM runner binding cannot be imported here, or None if it can."""
    try:
        import executorch.extension.llm.runner  # noqa: F401
    except (ImportError, RuntimeError) as error:
        # The package turns any ImportError of its extension into a RuntimeError saying "build from
        # source"; the ImportError it hides says why (on aarch64: libatomic.so.1 missing on the device).
        cause = error.__cause__ or error.__context__
        return f"executorch.extension.llm.runner is not importable: {error}" + (f" ({cause})" if cause else "")
    return None


def register_program_kernels() -> None:
    """The .pte calls ExecuTorch's LLM ops (update_cache, custom_sdpa) and quantized embedding
    kernels; loading their libraries registers them with the runtime the runner shares."""
    from gemma_edge.device.bindings import runtime

    runtime()


def set_threads(threads: int | None) -> None:
    """Size the runtime's thread pool (shared by the runner and our loop; None keeps its size), its
    threads flushing subnormal floats to zero as our loop's do (runtime.flush_denormals)."""
    from gemma_edge.device.runtime import flush_denormals

    flush_denormals(threads)


def open_tokenizer(tokenizer_path: Path):
    """The C++ HF tokenizer the runner itself uses, through `pytorch_tokenizers`' binding."""
    from pytorch_tokenizers import CppHFTokenizer

    tokenizer = CppHFTokenizer()
    tokenizer.load(str(tokenizer_path))
    if not tokenizer.is_loaded():
        raise ValueError(f"{tokenizer_path} is not a tokenizer pytorch_tokenizers can load")
    return tokenizer


def bos_to_add(tokenizer, prompt: str) -> int:
    """1 if encoding `prompt` does not already start with BOS, else 0 (GenerationConfig.num_bos)."""
    return 0 if tokenizer.encode(prompt, 0, 0)[:1] == [tokenizer.bos_tok()] else 1


def piece_table(tokenizer) -> dict[str, list[int]]:
    """Each decoded piece and the ids that decode to it (ids whose piece is not valid UTF-8 left out:
    the runner's binding cannot hand those to Python either)."""
    table: dict[str, list[int]] = {}
    for token in range(tokenizer.vocab_size()):
        try:
            piece = tokenizer.decode(token, False)
        except UnicodeDecodeError:
            continue
        table.setdefault(piece, []).append(token)
    return table


def without_decoder(tokenizer_path: Path, folder: Path) -> Path:
    """A copy of tokenizer.json in `folder` without its `decoder` section: it encodes exactly as the
    original, and decodes each id to its own vocabulary string."""
    data = json.loads(Path(tokenizer_path).read_text(encoding="utf-8"))
    data.pop("decoder", None)
    copy = Path(folder) / "tokenizer.json"
    copy.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return copy


def ids_from_pieces(pieces: list[str], table: dict[str, list[int]]) -> list[int | None]:
    """The id behind each piece, or None where no id or several ids decode to it."""
    ids = []
    for piece in pieces:
        candidates = table.get(piece, [])
        ids.append(candidates[0] if len(candidates) == 1 else None)
    return ids


def runner_stats(stats) -> dict:
    """The runner's Stats (millisecond timestamps) as rates and seconds, the way its own report
    (`print_report`) derives them:

    - `prefill_tps` = num_prompt_tokens / (prompt_eval_end_ms - inference_start_ms): the prompt's
      tokenisation and its one prefill call;
    - `decode_tps` = num_generated_tokens / (inference_end_ms - prompt_eval_end_ms), where
      num_generated_tokens counts the decode calls after prefill (new tokens minus one);
    - `ttft_s` = first_token_ms - inference_start_ms (the runner stamps first_token_ms together
      with prompt_eval_end_ms, so it equals the prefill time);
    - `load_s` = model_load_end_ms - model_load_start_ms: loading the forward method (XNNPACK
      initialisation), done by the first generate() and kept by reset().

    A rate is None when its span rounds to 0 ms; the raw fields are kept under `raw`."""
    seconds = stats.SCALING_FACTOR_UNITS_PER_SECOND
    prefill_ms = stats.prompt_eval_end_ms - stats.inference_start_ms
    decode_ms = stats.inference_end_ms - stats.prompt_eval_end_ms
    raw = {
        name: getattr(stats, name)
        for name in (
            "model_load_start_ms",
            "model_load_end_ms",
            "inference_start_ms",
            "prompt_eval_end_ms",
            "first_token_ms",
            "inference_end_ms",
            "aggregate_model_execution_time_ms",
            "aggregate_sampling_time_ms",
            "num_prompt_tokens",
            "num_generated_tokens",
        )
    }
    return {
        "prompt_tokens": stats.num_prompt_tokens,
        "generated_tokens": stats.num_generated_tokens,
        "prefill_tps": stats.num_prompt_tokens / prefill_ms * seconds if prefill_ms > 0 else None,
        "decode_tps": stats.num_generated_tokens / decode_ms * seconds if decode_ms > 0 else None,
        "ttft_s": (stats.first_token_ms - stats.inference_start_ms) / seconds,
        "load_s": (stats.model_load_end_ms - stats.model_load_start_ms) / seconds,
        "raw": raw,
    }


def greedy_config(max_new_tokens: int, num_bos: int, warming: bool = False):
    """Greedy decoding of up to `max_new_tokens` new tokens, the prompt not echoed."""
    from executorch.extension.llm.runner import GenerationConfig

    return GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0, num_bos=num_bos, warming=warming)


def generate_with_runner(
    pte_path,
    tokenizer_path,
    prompts: list[str],
    max_new_tokens: int,
    threads: int | None = None,
    warmup: bool = True,
    exact_ids: bool = True,
) -> list[dict]:
    """Generate greedily from each prompt with ExecuTorch's TextLLMRunner on `pte_path`.

    Returns, per prompt: `prompt_ids` (the ids the runner's tokenizer makes, BOS included, as
    pytorch_tokenizers' binding of it encodes them; `prompt_ids_count_matches` says whether the
    runner counted as many), `tokens` (the generated ids, recovered from the runner's pieces; None
    where a piece maps to no single id, which `exact_ids` rules out), `pieces`, and `stats`
    (runner_stats, plus `construct_s`: opening the program and reading its metadata, before
    `load_s`). With `warmup`, the first prompt is generated once untimed first (it also loads the
    forward method), as device_bench does. The KV cache is reset before each prompt."""
    with tempfile.TemporaryDirectory(prefix="llm-runner-") as folder:
        runner_tokenizer = without_decoder(tokenizer_path, folder) if exact_ids else Path(tokenizer_path)
        return run_prompts(pte_path, runner_tokenizer, prompts, max_new_tokens, threads, warmup)


def run_prompts(
    pte_path, tokenizer_path: Path, prompts: list[str], max_new_tokens: int, threads: int | None, warmup: bool
) -> list[dict]:
    """generate_with_runner's work, with the tokenizer file the runner is to load."""
    register_program_kernels()
    set_threads(threads)
    from executorch.extension.llm.runner import TextLLMRunner

    tokenizer = open_tokenizer(tokenizer_path)
    table = piece_table(tokenizer)
    started = time.perf_counter()
    runner = TextLLMRunner(str(pte_path), str(tokenizer_path))
    construct_s = time.perf_counter() - started
    if warmup and prompts:
        runner.generate(prompts[0], greedy_config(max_new_tokens, bos_to_add(tokenizer, prompts[0]), warming=True))
    results = []
    for prompt in prompts:
        runner.reset()
        num_bos = bos_to_add(tokenizer, prompt)
        pieces, stats = [], []
        runner.generate(prompt, greedy_config(max_new_tokens, num_bos), pieces.append, stats.append)
        summary = runner_stats(stats[-1])
        summary["construct_s"] = construct_s
        prompt_ids = tokenizer.encode(prompt, num_bos, 0)
        results.append(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "prompt_ids_count_matches": summary["prompt_tokens"] == len(prompt_ids),
                "tokens": ids_from_pieces(pieces, table),
                "pieces": pieces,
                "stats": summary,
            }
        )
    return results


def generate_with_our_loop(
    pte_path, prompt_ids: list[list[int]], max_new_tokens: int, threads: int | None = None, warmup: bool = True
) -> list[dict]:
    """The same generations with our own loop (runtime.PteDecoder, greedy, stopping at the .pte's
    EOS ids like the runner), timed with the runner's definitions but perf_counter's resolution:
    prefill_tps = prompt tokens / prefill call, decode_tps = decode calls / their time,
    ttft_s = the prefill call, load_s = loading the program and its forward method."""
    set_threads(threads)
    from gemma_edge.device.runtime import PteDecoder

    started = time.perf_counter()
    decoder = PteDecoder(Path(pte_path))
    load_s = time.perf_counter() - started
    eos = decoder.metadata.get("get_eos_ids", [])
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    if warmup and prompt_ids:
        timed_greedy(decoder, prompt_ids[0], max_new_tokens, eos_ids)
    results = []
    for ids in prompt_ids:
        tokens, stats = timed_greedy(decoder, ids, max_new_tokens, eos_ids)
        stats["load_s"] = load_s
        results.append({"prompt_ids": ids, "tokens": tokens, "stats": stats})
    return results


def timed_greedy(decoder, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], dict]:
    """Greedy tokens of `prompt` (prefill in one call, then one call per token) and their timing."""
    import torch

    started = time.perf_counter()
    logits = decoder.step(prompt, 0)
    tokens = [int(torch.argmax(logits))]
    first_token = time.perf_counter()
    position = len(prompt)
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        logits = decoder.step([tokens[-1]], position)
        tokens.append(int(torch.argmax(logits)))
        position += 1
    finished = time.perf_counter()
    decode_calls = len(tokens) - 1
    return tokens, {
        "prompt_tokens": len(prompt),
        "generated_tokens": decode_calls,
        "prefill_tps": len(prompt) / (first_token - started),
        "decode_tps": decode_calls / (finished - first_token) if decode_calls else None,
        "ttft_s": first_token - started,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gemma_edge.device.llm_runner", description=__doc__.splitlines()[0])
    parser.add_argument("--pte", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--prompts", required=True, type=Path, help="a JSON list of prompt strings")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compare", action="store_true", help="also run our own loop on the runner's prompt ids")
    parser.add_argument(
        "--pieces-as-decoded",
        action="store_true",
        help="give the runner tokenizer.json as it is (ids recovered only where a piece is unambiguous)",
    )
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    missing = binding_missing()
    if missing:
        print(missing, file=sys.stderr)
        return BINDING_MISSING
    prompts = json.loads(args.prompts.read_text())
    report = {
        "runner": generate_with_runner(
            args.pte, args.tokenizer, prompts, args.max_new_tokens, args.threads, exact_ids=not args.pieces_as_decoded
        )
    }
    if args.compare:
        ids = [r["prompt_ids"] for r in report["runner"]]
        report["our_loop"] = generate_with_our_loop(args.pte, ids, args.max_new_tokens, args.threads)
        report["identical"] = [r["tokens"] == o["tokens"] for r, o in zip(report["runner"], report["our_loop"])]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


BINDING_MISSING = 4  # exit status when the runner's binding is not in this executorch


if __name__ == "__main__":
    sys.exit(main())
