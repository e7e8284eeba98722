"""The device's tokens against the host's FP32 parity run: per prompt, for the .pte, ExecuTorch's
LLM runner and the peers, and the parity log that shows them."""

from __future__ import annotations

from gemma_edge.device import timing
from gemma_edge.workflow.table import text_table


def compare_tokens(host_parity: dict, device_tokens: list[list[int]], runner: dict | None = None) -> list[dict]:
    """Per parity prompt, the device's tokens against the host's run of the same .pte and eager FP32;
    with an available `runner` block (ExecuTorch's LLM runner on the device), its tokens against the
    host's .pte too, up to the first EOS (where the runner stops)."""
    rows = []
    available = bool(runner and runner.get("available"))
    for index, (prompt, produced) in enumerate(zip(host_parity["prompts"], device_tokens)):
        extra = {}
        if available:
            expected = timing.until_eos(prompt["pte_tokens"], set(runner["eos_ids"]))
            extra = {"runner_tokens": runner["tokens"][index], "runner_matches_host_pte": runner["tokens"][index] == expected}
        rows.append(
            {
                "prompt": prompt.get("prompt"),
                "prompt_ids": prompt["prompt_ids"],
                "device_tokens": produced,
                "host_pte_tokens": prompt["pte_tokens"],
                "host_fp32_tokens": prompt["reference_tokens"],
                "matches_host_pte": produced == prompt["pte_tokens"],
                "matched_host_fp32": sum(a == b for a, b in zip(produced, prompt["reference_tokens"])),
                "first_divergence_from_fp32": next(
                    (i for i, (a, b) in enumerate(zip(produced, prompt["reference_tokens"])) if a != b), None
                ),
                **extra,
            }
        )
    return rows


def tokens_matched_as_text(tokenizer, prompt_ids: list[int], reference: list[int], text: str) -> int:
    """How many of `reference`'s first tokens a peer's generated `text` reproduces: the largest k
    whose decoded continuation of the prompt is a prefix of `text`. A peer that returns text, not
    ids (LiteRT-LM), cannot be told apart from one that chose another token of the same text (a
    byte-fallback space and '▁'); a k that ends inside a UTF-8 character is skipped."""
    base = tokenizer.decode(prompt_ids)
    matched = 0
    for k in range(1, len(reference) + 1):
        continuation = tokenizer.decode(prompt_ids + reference[:k])
        if continuation.endswith("\ufffd"):
            continue
        if not continuation.startswith(base) or not text.startswith(continuation[len(base) :]):
            break
        matched = k
    return matched


def compare_peer_tokens(host_parity: dict, engines: dict, tokenizer) -> dict:
    """Per peer that decoded the parity prompts greedily (LiteRT-LM), its text against eager
    FP32's tokens (`tokens_matched_as_text`). LiteRT-LM ends at its stop token, FP32 runs on."""
    compared = {}
    for name, engine in engines.items():
        if not engine.get("available") or "greedy" not in engine:
            continue
        rows = []
        for prompt, greedy in zip(host_parity["prompts"], engine["greedy"]):
            text = "".join(greedy["pieces"])
            rows.append(
                {
                    "prompt": prompt.get("prompt"),
                    "text": text,
                    "generated": len(greedy["pieces"]),
                    "matched_host_fp32": tokens_matched_as_text(
                        tokenizer, prompt["prompt_ids"], prompt["reference_tokens"], text
                    ),
                }
            )
        compared[name] = rows
    return compared


def render_peer_parity(compared: dict) -> list[str]:
    lines = []
    for name, rows in compared.items():
        lines.append(f"{name}: greedy text of the same prompts against eager FP32's tokens (matched / generated)")
        cells = [
            [(row["prompt"] or "")[:34], f"{row['matched_host_fp32']}/{row['generated']}", repr(row["text"])] for row in rows
        ]
        lines += ["  " + line for line in text_table(["prompt", "matched", "text"], cells, "lrl").splitlines()]
    return lines


def render_parity_log(name: str, rows: list[dict], runner: dict | None = None, peers: dict | None = None) -> str:
    lines = [f"device parity on target {name}: the device decoded the host's prompt ids greedily"]
    cells = []
    for row in rows:
        div = "-" if row["first_divergence_from_fp32"] is None else str(row["first_divergence_from_fp32"])
        matched = f"{row['matched_host_fp32']}/{len(row['host_fp32_tokens'])}"
        cells.append([(row["prompt"] or "")[:36], "yes" if row["matches_host_pte"] else "NO", matched, div])
    lines.append(text_table(["prompt", "= host .pte", "vs FP32", "diverge"], cells, "lrrr"))
    for row in rows:
        lines.append(f"{(row['prompt'] or '')[:36]}:")
        lines.append(f"  device: {row['device_tokens']}")
        if not row["matches_host_pte"]:
            lines.append(f"  host:   {row['host_pte_tokens']}")
        if "runner_tokens" in row and row["runner_tokens"] != row["device_tokens"]:
            lines.append(f"  runner: {row['runner_tokens']}")
    agree = sum(r["matches_host_pte"] for r in rows)
    lines.append(f"{agree}/{len(rows)} prompts identical to the host's run of the same .pte")
    if runner is not None:
        lines.append(runner_parity_line(rows, runner))
    lines += render_peer_parity(peers or {})
    return "\n".join(lines) + "\n"


def runner_parity_line(rows: list[dict], runner: dict) -> str:
    """One line on ExecuTorch's LLM runner's tokens, for the parity log."""
    if not runner.get("available"):
        return f"ExecuTorch's LLM runner: not available: {runner['reason']}"
    agree = sum(r["runner_matches_host_pte"] for r in rows)
    return (
        f"ExecuTorch's LLM runner: {agree}/{len(rows)} prompts identical to the host's run of the same .pte; "
        f"its tokens {'equal' if runner['tokens_equal_loop'] else 'DIFFER from'} the device loop's, its prompt ids "
        f"{'equal' if runner['prompt_ids_equal_loop'] else 'DIFFER from'} the host's"
    )
