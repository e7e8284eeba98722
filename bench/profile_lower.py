"""Where the lower step spends its time: `bench/LOG.md`'s lowering breakdown comes from this.

Usage: .venv/bin/python bench/profile_lower.py results/<model>/int4-g<N>/program.pt2 [--per-op] [--no-decode-method]

Runs the lower step's own code (`gemma_edge.lower.lower_with_fallback`, fused mode) on a quantized
program and prints wall seconds per stage. Stages are timed by wrapping the ExecuTorch and torch
functions that do the work, so the program lowered is the one the workflow lowers. Run it on a
quiet machine: every stage is single-threaded Python and slows with any other load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


@contextmanager
def stage(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[name] += time.perf_counter() - start
        CALLS[name] += 1


def timed(owner, attribute: str, name: str, static: bool = False) -> None:
    """Replace owner.attribute by a wrapper that adds its wall time to stage `name`."""
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        with stage(name):
            return original(*args, **kwargs)

    setattr(owner, attribute, staticmethod(wrapper) if static else wrapper)


def timed_xnnpack_passes(module) -> None:
    """Time each of XNNPACK's own graph passes, run once per delegate inside its preprocess."""
    original = module._transform

    def wrapper(program, *passes):
        with stage("  XNNPACK pass " + "+".join(type(p).__name__ for p in passes)):
            return original(program, *passes)

    module._transform = wrapper


def instrument() -> None:
    import torch
    from executorch.backends.xnnpack import _passes as xnnpack_passes
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.passes.memory_planning_pass import MemoryPlanningPass
    from executorch.exir.program import _program

    from gemma_edge import lower

    timed(torch.export.ExportedProgram, "run_decompositions", "decompositions (torch run_decompositions)")
    timed(_program, "_generate_edge_program", "edge dialect conversion")
    timed(XnnpackPartitioner, "partition", "partitioning")
    timed(XnnpackBackend, "preprocess", "XNNPACK preprocess (per delegate)", static=True)
    timed_xnnpack_passes(xnnpack_passes)
    timed(MemoryPlanningPass, "run", "memory planning")
    timed(_program.EdgeProgramManager, "to_executorch", "to_executorch (incl. memory planning)")
    timed(lower, "decode_program", "the decode method's program (re-export for one token)")
    timed(lower, "write_pte", "serialise and write")
    timed(lower, "smoke_run", "load and run check")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", type=Path)
    parser.add_argument("--per-op", action="store_true", help="lower with per_op_mode=True")
    parser.add_argument("--no-decode-method", action="store_true", help="forward alone (lowering.decode_method: false)")
    args = parser.parse_args()

    with stage("imports"):
        import torch  # noqa: F401

        from gemma_edge.export import load_program
        from gemma_edge.lower import lower_with_fallback, runner_metadata
        from gemma_edge.export import context_length_of, tokens_per_call_of
    instrument()
    with stage("load program"):
        program = load_program(args.program)
    nodes = len(program.graph.nodes)
    metadata = runner_metadata({"num_hidden_layers": 0, "vocab_size": 0}, context_length_of(program),
                               tokens_per_call_of(program))
    with tempfile.TemporaryDirectory() as folder, stage("lower step total"):
        record = lower_with_fallback(lambda: program, bool(args.per_op), metadata,
                                     Path(folder) / "model.pte", decode_method=not args.no_decode_method)
    print(f"{args.program}: {nodes} graph nodes; {record['xnnpack_delegate_calls']} XNNPACK delegate calls; "
          f"portable ops {sum(record['portable_ops'].values())}")
    print("| stage | calls | wall s |\n|---|---:|---:|")
    for name, seconds in SECONDS.items():
        print(f"| {name} | {CALLS[name]} | {seconds:.1f} |")
    print(json.dumps({"seconds": {k: round(v, 2) for k, v in SECONDS.items()}, **record}, sort_keys=True))


if __name__ == "__main__":
    main()
