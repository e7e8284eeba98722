"""Lower an exported decoder to an ExecuTorch .pte with the XNNPACK backend.

`per_op_mode: auto` tries XNNPACK's fused subgraphs first and falls back to one delegate per
operator only where the backend rejects the fused program, either while lowering or when the
runtime loads and runs it. Which mode was used, and why, is recorded, never hidden: on Linux
aarch64 the fused INT4 path was once rejected (`xnn_status_invalid_parameter`) and the per-op
path decoded several times slower.
"""

from __future__ import annotations

import gc
import logging
from collections import Counter
from pathlib import Path

import torch

from gemma_edge.build.delegate_progress import counted_xnnpack_partitioner
from gemma_edge.device.files import DiskFull, atomic_output
from gemma_edge.device.runtime import DECODE_METHOD, PteDecoder
from gemma_edge.model.attention import one_token_custom_sdpa, one_token_sliding_attention
from gemma_edge.model.decoder import example_inputs
from gemma_edge.workflow.steplog import log_memory

log = logging.getLogger(__name__)


def runner_metadata(text_config: dict, max_context_len: int, tokens_per_call: int) -> dict:
    """Constant methods ExecuTorch's LLM runner reads from a .pte: `get_max_seq_len` is the most
    tokens one call takes (the runner prefills longer prompts in chunks of it),
    `get_max_context_len` the positions the KV cache holds."""
    eos = text_config.get("eos_token_id", 1)
    eos_ids = eos if isinstance(eos, list) else [eos]
    return {
        "get_max_seq_len": tokens_per_call,
        "get_max_context_len": max_context_len,
        "get_n_layers": int(text_config["num_hidden_layers"]),
        "get_vocab_size": int(text_config["vocab_size"]),
        "get_bos_id": int(text_config.get("bos_token_id", 2)),
        "get_eos_ids": [int(e) for e in eos_ids],
        "get_num_kv_shared_layers": int(text_config.get("num_kv_shared_layers", 0)),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }


def decode_program(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`program` re-exported for exactly one token a call, its causal attention in the rows form.

    With the token count a constant, the cached full-attention layers' causal `custom_sdpa` takes a
    KV head's query heads as rows of one product (`one_token_custom_sdpa`) instead of one product
    per head, which the program for 1 to `get_max_seq_len` tokens cannot do. The graph is the
    quantized program's own (its weights are shared, not copied); the cache buffers keep their
    names, which is how the lowered methods share them. A sliding layer's attention reads only the
    filled slots of its window (`one_token_sliding_attention`) instead of its whole ring."""
    one_token = {
        torch.ops.llama.custom_sdpa.default: one_token_custom_sdpa,
        torch.ops.gemma_edge.sliding_attention.default: one_token_sliding_attention,
    }
    module = program.module()
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in one_token:
            node.target = one_token[node.target]
    module.recompile()
    return torch.export.export(module, example_inputs(1), strict=False)


def as_masked_ring_calls(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`program` with each `gemma_edge::sliding_attention` (which the runtime has no kernel for) as
    the masked `llama::custom_sdpa` over the ring's written slots that is its body, edited in place."""
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.gemma_edge.sliding_attention.default:
            rows, ring_keys, ring_values, _window_keys, _window_values, mask, _window_filled, scale = node.args
            node.target = torch.ops.llama.custom_sdpa.default
            node.args = (rows, ring_keys, ring_values, 0, mask, 0.0, False, scale)
    program.graph_module.recompile()
    return program


# `lowering.decode_method: auto` adds the one-token method to programs whose context exceeds this.
# At 512 positions it saves about 0.5 ms a token per cached full-attention layer (per-head 0.68 ms
# against rows 0.18 on the AVX-512 host; docs/design.md, "A one-token method"), 2 % of E2B's decode with its 3 such
# layers; at 2,048 it saves 9 %. Lowering it costs a third more lowering time at any context.
DECODE_METHOD_ABOVE_CONTEXT = 512


def wants_decode_method(requested: str | bool, max_context_len: int) -> bool:
    """Whether the .pte gets the one-token method: `lowering.decode_method` true or false as given;
    "auto" for a context longer than DECODE_METHOD_ABOVE_CONTEXT, where it pays for its lowering."""
    if requested == "auto":
        return max_context_len > DECODE_METHOD_ABOVE_CONTEXT
    return bool(requested)


def methods_of(program: torch.export.ExportedProgram, decode_method: bool) -> dict:
    """The programs to lower, by method name: `forward`, and the one-token method
    (DECODE_METHOD) beside it if asked for."""
    if not decode_method:
        return {"forward": as_masked_ring_calls(program)}
    one_token = decode_program(program)  # before the ring calls are edited in place
    return {"forward": as_masked_ring_calls(program), DECODE_METHOD: one_token}


def lower_to_xnnpack(programs: dict[str, torch.export.ExportedProgram], per_op_mode: bool, metadata: dict):
    """Return the ExecuTorch program manager for `programs` (method name: program) delegated to
    XNNPACK, their mutable buffers (the KV cache) shared by name when there are several."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (embedding_byte)
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    # One partitioner for every precision: the INT8-activation INT4 linears and the FP32 ops between
    # them land in the same subgraphs. A dynamically-quantized-only partitioner first (ExecuTorch's
    # Llama recipe) cut the demo model into 158 delegates instead of 16, with bit-identical logits,
    # and every delegate costs its own XNNPACK preprocessing (docs/design.md, "One XNNPACK partitioner").
    with counted_xnnpack_partitioner(per_op_mode) as partitioner:
        edge = to_edge_transform_and_lower(programs, partitioner=[partitioner], constant_methods=metadata)
    if len(programs) == 1:
        return edge.to_executorch()
    shared = MemoryPlanningPass(share_mutable_buffers=True)
    return edge.to_executorch(ExecutorchBackendConfig(memory_planning_pass=shared, emit_mutable_buffer_names=True))


def delegation_summary(manager, method: str = "forward") -> dict:
    """How many XNNPACK delegate calls `method` makes and how many graph nodes they took
    (ExecuTorch's `get_delegation_info`), and which ops stay on portable kernels.

    The portable ops are counted here by their kernel (`aten.slice_copy.Tensor_out`):
    `get_delegation_info` names them by graph node name instead, which mixes kernels with memory
    planning's allocations, `getitem`s and symbolic-size arithmetic, and names a custom op by
    whatever its node was called (`update_cache`, `llama_custom_sdpa_default`)."""
    from executorch.devtools.backend_debug import get_delegation_info

    graph_module = manager.exported_program(method).graph_module
    info = get_delegation_info(graph_module)
    portable = Counter(
        str(node.target)
        for node in graph_module.graph.nodes
        if node.op == "call_function" and "executorch_call_delegate" not in str(node.target)
    )
    portable = {name: count for name, count in portable.items() if not name.startswith("<")}  # memory-planning helpers
    return {
        "xnnpack_delegate_calls": info.num_delegated_subgraphs,
        "xnnpack_delegated_nodes": info.num_delegated_nodes,
        "portable_ops": dict(sorted(portable.items())),
    }


def planned_memory_bytes(manager) -> int:
    """Bytes the runtime allocates for the methods' memory-planned buffers: the KV cache and the
    activations, on top of the mapped .pte (the device checks its free memory against both).

    Each arena (memory id) counts once, at its largest method's size: ExecuTorch's Python runtime
    gives a program's methods one set of arenas, and the KV cache is one arena of its own that
    the methods share (`lower_to_xnnpack`)."""
    largest: dict[int, int] = {}
    for plan in manager.executorch_program.execution_plan:
        for arena, size in enumerate(plan.non_const_buffer_sizes):
            largest[arena] = max(largest.get(arena, 0), int(size))
    return sum(largest.values())


def lowered_summary(manager, metadata: dict) -> dict:
    """The lowering record's figures about the program itself: its methods (the metadata methods
    aside), planned memory, and delegation: `forward`'s at the top, the one-token method's under its name."""
    methods = sorted(plan.name for plan in manager.executorch_program.execution_plan if plan.name not in metadata)
    summary = {"methods": methods, "planned_memory_bytes": planned_memory_bytes(manager), **delegation_summary(manager)}
    if DECODE_METHOD in methods:
        summary[DECODE_METHOD] = delegation_summary(manager, DECODE_METHOD)
    return summary


def smoke_run(pte_path: Path, bos_id: int) -> None:
    """Load the .pte and run a two-token prefill and a decode step: where XNNPACK rejects a
    delegate, this is where it says so."""
    decoder = PteDecoder(pte_path)
    decoder.step([bos_id, bos_id], 0)
    decoder.step([bos_id], 2)  # the decode method, if the program has one


def write_pte(manager, path: Path) -> None:
    # The serialized program's exact size (ExecuTorch assembles it as a Cord before writing it).
    size = len(getattr(manager, "_pte_data", None) or b"")
    with atomic_output(path, min_bytes=size) as tmp, open(tmp, "wb") as handle:
        manager.write_to_file(handle)


def lower_with_fallback(
    load, per_op_mode: str | bool, metadata: dict, pte_path: Path, decode_method: str | bool = "auto"
) -> dict:
    """Lower and write `pte_path`, honouring per_op_mode "auto", True or False; return what happened.
    With `decode_method` (as `wants_decode_method` reads it), the .pte gets a second method for one
    token a call (`decode_program`).

    Lowering consumes the program it is given (it moves its constants into the delegates), so each
    attempt lowers a fresh program from `load()`: the per-op one after a rejected fused one too."""
    attempts = {"auto": [False, True], False: [False], True: [True]}[per_op_mode]
    record = {"per_op_mode_requested": per_op_mode, "decode_method_requested": decode_method, "fused_rejection": None}
    with_decode_method = wants_decode_method(decode_method, metadata["get_max_context_len"])
    for mode in attempts:
        label = "per-op" if mode else "fused"
        log.info("lowering to XNNPACK (%s subgraphs)", label)
        try:
            manager = lower_to_xnnpack(methods_of(load(), with_decode_method), mode, metadata)
            log_memory(f"lowering ({label})")
            write_pte(manager, pte_path)
            log_memory("writing the .pte")
            summary = lowered_summary(manager, metadata)
            # Released before the .pte is loaded: at E2B's 35 layers the lowered program holds 14.5 GB.
            del manager
            gc.collect()  # FX graphs hold reference cycles
            smoke_run(pte_path, metadata["get_bos_id"])
        except Exception as error:  # noqa: BLE001 - any rejection of the fused path triggers the fallback
            pte_path.unlink(missing_ok=True)
            if mode or len(attempts) == 1 or isinstance(error, DiskFull):  # a full disk is no rejection
                raise
            record["fused_rejection"] = f"{type(error).__name__}: {error}"
            log.warning("XNNPACK rejected the fused program (%s); falling back to per_op_mode=True", error)
            continue
        record["per_op_mode_used"] = mode
        record.update(summary)
        log.info(
            "lowered with %s subgraphs: %d XNNPACK delegate calls; portable ops %s",
            label,
            record["xnnpack_delegate_calls"],
            record["portable_ops"],
        )
        return record
    raise AssertionError("unreachable")
