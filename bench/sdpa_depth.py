"""ExecuTorch's `llama::custom_sdpa` for one decoded token against a KV cache of E2B's full-attention
shape (8 query heads, head_dim 512, 1 or 8 KV heads, 4,096 positions), after a context of 16 to
4,064 tokens: the attention cost a full layer adds per token as the context grows (bench/LOG.md,
"Context past the sliding window"). The eager op runs the same CPU kernel as the .pte's; beside
it, `llama::custom_quantized_sdpa` on the same cache held in INT8 (per position and head, an
FP32 scale and an INT8 zero point, as ExecuTorch's QuantizedKVCache keeps it; the query quantized
the same way per head), the same op with the 8 query heads passed as 8 query rows of the one KV
head (decode only: not causal, all rows see the same positions), and the same attention as plain
matrix products, for scale.

    .venv/bin/python bench/sdpa_depth.py [--threads 2] [--calls 200]
"""

import argparse
import time

import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - registers torch.ops.llama

QUERY_HEADS, HEAD_DIM, POSITIONS = 8, 512, 4096


def ms_per(attend, calls: int) -> float:
    """Milliseconds per call of `attend`, after 10 calls of warm-up."""
    for _ in range(10):
        attend()
    started = time.perf_counter()
    for _ in range(calls):
        attend()
    return (time.perf_counter() - started) / calls * 1e3


def ms_per_call(kv_heads: int, start_pos: int, calls: int) -> float:
    query = torch.randn(1, 1, QUERY_HEADS, HEAD_DIM)
    keys, values = (torch.randn(1, POSITIONS, kv_heads, HEAD_DIM) for _ in range(2))
    return ms_per(lambda: torch.ops.llama.custom_sdpa(query, keys, values, start_pos, None, 0.0, True), calls)


def ms_per_call_heads_as_rows(start_pos: int, calls: int) -> float:
    """One decoded token's 8 query heads as 8 rows of one head against the single KV head: the
    same result (to float rounding) for a decode step, the KV head read once."""
    rows = torch.randn(1, QUERY_HEADS, 1, HEAD_DIM)
    keys, values = (torch.randn(1, POSITIONS, 1, HEAD_DIM) for _ in range(2))
    first = start_pos - QUERY_HEADS + 1  # not causal: every row sees positions 0..start_pos
    return ms_per(lambda: torch.ops.llama.custom_sdpa(rows, keys, values, first, None, 0.0, False), calls)


def per_token_int8(x: torch.Tensor):
    """`x` in INT8 with an FP32 scale and INT8 zero point per vector of its last dimension."""
    scale, zero_point = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    quantized = torch.ops.quantized_decomposed.quantize_per_token(x, scale, zero_point, -128, 127, torch.int8)
    return quantized, scale.to(torch.float32), zero_point.to(torch.int8)


def ms_per_quantized_call(kv_heads: int, start_pos: int, calls: int) -> float:
    query, q_scale, q_zero = per_token_int8(torch.randn(1, 1, QUERY_HEADS, HEAD_DIM))
    keys, k_scale, k_zero = per_token_int8(torch.randn(1, POSITIONS, kv_heads, HEAD_DIM))
    values, v_scale, v_zero = per_token_int8(torch.randn(1, POSITIONS, kv_heads, HEAD_DIM))
    return ms_per(lambda: torch.ops.llama.custom_quantized_sdpa(query, keys, values, start_pos, None, 0.0, True, None,
                                                                q_zero, q_scale, k_zero, k_scale, v_zero, v_scale),
                  calls)


def ms_per_matmul_attention(start_pos: int, calls: int) -> float:
    """The same attention for one KV head as two matrix products and a softmax in eager PyTorch
    (its BLAS), over the filled positions only: what the arithmetic alone costs here."""
    query = torch.randn(QUERY_HEADS, HEAD_DIM)
    keys, values = (torch.randn(POSITIONS, HEAD_DIM) for _ in range(2))
    filled_keys, filled_values = keys[: start_pos + 1], values[: start_pos + 1]
    scale = HEAD_DIM ** -0.5
    return ms_per(lambda: torch.softmax(query @ filled_keys.T * scale, dim=-1) @ filled_values, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| KV heads | context | custom_sdpa ms per call | custom_quantized_sdpa (INT8 cache) ms | "
          "custom_sdpa, heads as rows (1 KV head) ms | matmul attention ms (1 KV head) | FP32 K+V MB read once |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for kv_heads in (1, QUERY_HEADS):
        for start_pos in (15, 511, 2047, 4063):
            megabytes = 2 * (start_pos + 1) * kv_heads * HEAD_DIM * 4 / 1e6
            matmul = f"{ms_per_matmul_attention(start_pos, args.calls):.2f}" if kv_heads == 1 else "—"
            rows = f"{ms_per_call_heads_as_rows(start_pos, args.calls):.2f}" if kv_heads == 1 else "—"
            print(f"| {kv_heads} | {start_pos + 1} | {ms_per_call(kv_heads, start_pos, args.calls):.2f} | "
                  f"{ms_per_quantized_call(kv_heads, start_pos, args.calls):.2f} | {rows} | {matmul} | {megabytes:.1f} |")


if __name__ == "__main__":
    main()
