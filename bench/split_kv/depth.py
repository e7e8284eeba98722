"""A decode step's attention at depth in a .pte: ExecuTorch's `llama::custom_sdpa` (the rows form the
one-token method uses) against `gemma_edge::split_kv_sdpa`, an experimental kernel beside this file
that splits the cached positions across ExecuTorch's threads (FlashDecoding's split-KV) and merges
the shares by their maxima and sums, on an FP32 or an FP16 cache (bench/LOG.md, "Split-KV").

E2B's full-attention shape: 8 query rows on one KV head, head_dim 512, a 4,096-position cache. Each
op runs alone in a small program (no delegate), through ExecuTorch's Python runtime, warm (the same
call repeated: the cache stays in the last-level cache) or cold (a 512 MiB buffer written between
calls, as a decode step finds the cache after reading its weights). Prints ms per call and the
largest difference from the same attention in torch.

    .venv/bin/python bench/split_kv/depth.py [--threads 2] [--cold] [--calls 40]

Run it with MKL_NUM_THREADS=1 as well: custom_sdpa's matrix products call the BLAS in libtorch_cpu
(MKL on x86-64), which threads them itself unless told not to; the split kernel calls the same BLAS
from each of ExecuTorch's threads. Needs g++ (the kernel is built against the installed wheel's
headers and libraries, into a temporary folder). Run with nothing else on the machine."""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "split_kv_sdpa.cpp"
ROWS, HEAD_DIM, POSITIONS, SCALE = 8, 512, 4096, 0.05
CONTEXTS = (16, 512, 2048, 4064)


def build_kernel(folder: Path) -> Path:
    """g++ the kernel into folder/libsplit_kv_sdpa.so against the wheel's headers, libexecutorch
    (kernel registry, thread pool) and libtorch_cpu (sgemm_)."""
    import executorch

    package = Path(list(executorch.__path__)[0])
    torch_lib = Path(torch.__file__).parent / "lib"
    library = folder / "libsplit_kv_sdpa.so"
    include = package / "include"
    subprocess.run(["g++", "-std=c++17", "-O3", "-march=native", "-fPIC", "-shared",
                    "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL",
                    f"-I{include}", f"-I{include}/executorch/runtime/core/portable_type/c10", str(SOURCE),
                    "-o", str(library), f"-L{package / 'lib'}", f"-L{torch_lib}", "-Wl,--no-as-needed",
                    "-lexecutorch", "-lexecutorch_threadpool", "-ltorch_cpu"], check=True)
    return library


def reference(q, k, v, positions, scale):
    keys, values = (cache[:, :positions].transpose(1, 2).float() for cache in (k, v))
    weights = torch.softmax((q.transpose(1, 2) @ keys.transpose(-1, -2)) * scale, dim=-1)
    return (weights @ values).transpose(1, 2).contiguous()


def define_op() -> torch.library.Library:
    """The op for export: its schema, the out variant ExecuTorch's emitter asks for, and a torch
    reference that gives export its shapes. The definitions last as long as the returned library."""
    library = torch.library.Library("gemma_edge", "DEF")
    library.define("split_kv_sdpa(Tensor q, Tensor k, Tensor v, SymInt positions, float scale) -> Tensor")
    library.define("split_kv_sdpa.out(Tensor q, Tensor k, Tensor v, SymInt positions, float scale, *, "
                   "Tensor(a!) out) -> Tensor(a!)")
    library.impl("split_kv_sdpa", reference, "CompositeExplicitAutograd")
    library.impl("split_kv_sdpa.out", lambda q, k, v, positions, scale, *, out: out.copy_(
        reference(q, k, v, positions, scale)), "CompositeExplicitAutograd")
    return library


class Attention(torch.nn.Module):
    def __init__(self, op: str, cache_dtype: torch.dtype):
        super().__init__()
        self.op = op
        generator = torch.Generator().manual_seed(0)
        for name in ("k", "v"):
            self.register_buffer(name, torch.randn(1, POSITIONS, 1, HEAD_DIM, generator=generator).to(cache_dtype))

    def forward(self, q, position):
        pos = position[0].item()
        torch._check(pos >= ROWS - 1)
        torch._check(pos < POSITIONS)
        if self.op == "split":
            return torch.ops.gemma_edge.split_kv_sdpa(q, self.k, self.v, pos + 1, SCALE)
        # The rows form: all 8 rows see positions 0..pos (custom_sdpa adds the rows to start_pos).
        return torch.ops.llama.custom_sdpa(q, self.k, self.v, pos + 1 - ROWS, None, 0.0, False, SCALE)


def program(module: torch.nn.Module) -> bytes:
    from executorch.exir import EdgeCompileConfig, to_edge

    example = (torch.randn(1, ROWS, 1, HEAD_DIM), torch.tensor([100]))
    exported = torch.export.export(module, example, strict=False)
    return to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch().buffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401 - registers llama::custom_sdpa
    from executorch.extension.pybindings import portable_lib

    with tempfile.TemporaryDirectory() as folder:
        ctypes.CDLL(str(build_kernel(Path(folder))), mode=ctypes.RTLD_GLOBAL)
    library = define_op()  # noqa: F841 - held for the op's definitions
    portable_lib._unsafe_reset_threadpool(args.threads)
    flush = torch.zeros(128 * 1024 * 1024) if args.cold else None  # 512 MiB, past any last-level cache here
    query = torch.randn(1, ROWS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    print(f"{args.threads} threads, {'cold' if args.cold else 'warm'}; ms per call (median of {args.calls})")
    print("| op | cache | " + " | ".join(f"context {c}" for c in CONTEXTS) + " | largest difference |")
    print("|---|---|" + "---:|" * len(CONTEXTS) + "---:|")
    for op, dtype in (("custom_sdpa", torch.float32), ("split", torch.float32), ("split", torch.float16)):
        module = Attention(op, dtype)
        flatbuffer = program(module)  # held: the loaded program reads it in place
        method = portable_lib._load_for_executorch_from_buffer(flatbuffer)
        cells, worst = [], 0.0
        for context in CONTEXTS:
            position = torch.tensor([context])
            worst = max(worst, (method.forward((query, position))[0]
                                - reference(query, module.k, module.v, context + 1, SCALE)).abs().max().item())
            times = []
            for _ in range(args.calls):
                if flush is not None:
                    flush.add_(1.0)
                started = time.perf_counter()
                method.forward((query, position))
                times.append(time.perf_counter() - started)
            cells.append(f"{statistics.median(times) * 1e3:.2f}")
        print(f"| {op} | {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + f" | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
