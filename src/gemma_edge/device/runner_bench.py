"""The parity prompts under ExecuTorch's own LLM runner (gemma_edge.device.llm_runner, in a
process of its own), as a block of bench.json beside the .pte's own figures."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from gemma_edge.device.peer_bench import (
    ModuleFailed,
    run_module,
    summarise,
    timed_with_load,
)
from gemma_edge.device.timing import until_eos

RUNNER_FIGURES = ("prefill_tps", "decode_tps", "ttft_s")
BINDING_NOT_IMPORTABLE = "executorch.extension.llm.runner is not importable"  # llm_runner.binding_missing's sentence


def runner_block(report: dict, spec: dict, loop_tokens: list[list[int]], eos_ids: set[int]) -> dict:
    """bench.json's `executorch_runner` block from `gemma_edge.device.llm_runner --compare`'s report: the
    runner's tokens and prompt ids against our loop's (the parity prompts, on this device), its own
    Stats summarised over the prompts, and our loop's on the same prompts with the same definitions."""
    runner, ours = report["runner"], report["our_loop"]

    def summary(results: list[dict]) -> dict:
        figures = {
            name: summarise(values) if (values := [r["stats"][name] for r in results if r["stats"][name] is not None]) else None
            for name in RUNNER_FIGURES
        }
        return {**figures, "load_s": results[0]["stats"]["load_s"] if results else None}

    tokens = [r["tokens"] for r in runner]
    return {
        "available": True,
        "runner": "ExecuTorch's C++ TextLLMRunner (executorch.extension.llm.runner), greedy, tokenising the prompt text itself",
        "prompts": [r["prompt"] for r in runner],
        "prompt_ids": [r["prompt_ids"] for r in runner],
        "prompt_ids_equal_loop": [r["prompt_ids"] for r in runner] == spec["parity_prompt_ids"],
        "tokens": tokens,
        "eos_ids": sorted(eos_ids),
        "tokens_equal_loop": tokens == [until_eos(t, eos_ids) for t in loop_tokens],
        "stats": {
            **summary(runner),
            "construct_s": runner[0]["stats"]["construct_s"] if runner else None,
            "clock": "the runner's own Stats, in whole milliseconds",
        },
        "stats_per_prompt": [r["stats"] for r in runner],
        "loop_same_prompts": {
            **summary(ours),
            "clock": "time.perf_counter around our loop's calls",
            "tokens_equal_runner": [o["tokens"] for o in ours] == tokens,
        },
    }


def bench_llm_runner(
    pte: Path, spec: dict, loop_tokens: list[list[int]], eos_ids: set[int], unavailable: str | None = None
) -> dict:
    """The parity prompts under ExecuTorch's own LLM runner (`python -m gemma_edge.device.llm_runner
    --compare`, a process of its own, so that the runner's aborts, its memory and its printing stay
    out of this one), with the machine's load around it. The runner failing, missing or rejecting the
    program, or a pre-flight reason (`unavailable`, from `runner_preflight`: then it is not started),
    gives `available: false` and the reason, never a failed benchmark."""

    def run() -> dict:
        if unavailable:
            return {"available": False, "reason": unavailable}
        if not spec.get("tokenizer") or not spec.get("parity_prompts") or None in spec["parity_prompts"]:
            return {"available": False, "reason": "the host sent no tokenizer or no prompt texts for the runner"}
        with tempfile.TemporaryDirectory(prefix="llm-runner-bench-") as scratch:
            prompts, out = Path(scratch) / "prompts.json", Path(scratch) / "runner.json"
            prompts.write_text(json.dumps(spec["parity_prompts"]))
            args = [
                "--pte",
                str(pte),
                "--tokenizer",
                spec["tokenizer"],
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                str(spec["max_new_tokens"]),
                "--compare",
                "--out",
                str(out),
            ]
            if spec.get("threads"):
                args += ["--threads", str(spec["threads"])]
            try:
                run_module("llm_runner", args, spec.get("peer_timeout_s", 3600), "the runner")
            except ModuleFailed as error:
                # executorch's own message hides why its binding did not import; llm_runner prints the cause.
                missing = [line for line in error.stderr.splitlines() if line.startswith(BINDING_NOT_IMPORTABLE)]
                return {"available": False, "reason": missing[-1] if missing else str(error)}
            return runner_block(json.loads(out.read_text()), spec, loop_tokens, eos_ids)

    block, load = timed_with_load(run)
    block["load"] = load
    if block["available"]:
        prefill, decode = (block["stats"][figure] for figure in ("prefill_tps", "decode_tps"))
        print(
            f"executorch runner: prefill {prefill['avg'] if prefill else float('nan'):.1f} tok/s, "
            f"decode {decode['avg'] if decode else float('nan'):.1f} tok/s, "
            f"tokens {'equal to' if block['tokens_equal_loop'] else 'DIFFERENT from'} our loop's",
            flush=True,
        )
    else:
        print(f"executorch runner: not available: {block['reason']}", flush=True)
    return block
