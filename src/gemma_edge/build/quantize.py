"""Quantize an exported decoder: INT8 dynamic activations + INT4 per-group weights, INT8 embeddings.

Works on the exported FP32 program itself (the export step's artifact), so a new group size never
re-exports the model. Linear weights become torchao tensors (`Int8DynamicActivationIntxWeightConfig`,
torchao's CPU path for INT4); embedding tables become ExecuTorch's per-row INT8 `embedding_byte`,
which XNNPACK-targeted programs run as a portable kernel. The result is exported again so it is a
self-contained program for the lowering step.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from gemma_edge.build.export import tokens_per_call_of
from gemma_edge.model.decoder import dynamic_shapes, example_inputs
from gemma_edge.workflow.steplog import log_memory

log = logging.getLogger(__name__)

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch.nn.functional.linear)


class GroupSizeError(ValueError):
    """The configured group size cannot quantize this model."""


def _weight_of(graph_module: fx.GraphModule, node: fx.Node):
    """(node the op reads its weight from, the weight's get_attr node, the weight), or Nones.

    A linear may read a bf16 table through an upcast: the lm_head tied to the token table."""
    source = node.args[1] if node.target in LINEAR_TARGETS else node.args[0]
    attr = source.args[0] if _is_upcast(source) else source
    if not isinstance(attr, fx.Node) or attr.op != "get_attr":
        return None, None, None
    return source, attr, _get_attr(graph_module, attr.target)


def _is_upcast(node) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)
        and _casts_to_fp32(node)
    )


def _get_attr(module: nn.Module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def linear_nodes(graph_module: fx.GraphModule) -> list[fx.Node]:
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS]


def is_reduction(weight: torch.Tensor) -> bool:
    """A linear with one output is a reduction (an RMSNorm's mean, see decoder.xnnpack_friendly_rmsnorm),
    not a layer: it stays FP32 and does not count among the widths a group size must divide."""
    return weight.shape[0] == 1


def linear_widths(graph_module: fx.GraphModule) -> dict[str, int]:
    """Input width of each linear layer's weight, by weight name."""
    widths = {}
    for node in linear_nodes(graph_module):
        _, attr, weight = _weight_of(graph_module, node)
        if attr is not None and not is_reduction(weight):
            widths[attr.target] = int(weight.shape[1])
    return widths


def check_group_size(widths: dict[str, int], group_size: int) -> None:
    if not any(width % group_size == 0 for width in widths.values()):
        distinct = ", ".join(str(w) for w in sorted(set(widths.values())))
        raise GroupSizeError(
            f"quantization.group_size {group_size} divides none of this model's linear input widths ({distinct}); "
            "choose a group size that divides at least one of them"
        )


def _replace_weight(graph_module: fx.GraphModule, node: fx.Node, old: fx.Node, name: str, value) -> None:
    """Point `node` at a new attribute instead of `old`, leaving other users of `old` (tied weights) alone."""
    if isinstance(value, nn.Parameter):
        graph_module.register_parameter(name, value)
    else:
        graph_module.register_buffer(name, value)
    with graph_module.graph.inserting_before(node):
        new = graph_module.graph.get_attr(name)
    node.replace_input_with(old, new)


def quantize_linears(graph_module: fx.GraphModule, group_size: int) -> dict:
    """Swap each linear weight whose input width `group_size` divides for an INT4 torchao tensor."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    quantized, kept = [], []
    for node in linear_nodes(graph_module):
        source, attr, weight = _weight_of(graph_module, node)
        if attr is None:
            continue
        out_features, in_features = weight.shape
        if is_reduction(weight):
            continue
        if in_features % group_size:
            kept.append({"weight": attr.target, "in_features": int(in_features)})
            continue
        holder = nn.Linear(in_features, out_features, bias=False)
        holder.weight = nn.Parameter(weight.detach().to(torch.float32, copy=True), requires_grad=False)
        quantize_(holder, config)
        _replace_weight(graph_module, node, source, "int4_" + attr.target.replace(".", "_"), holder.weight)
        # torchao's tensor intercepts F.linear; the aten op would decompose before reaching it.
        node.target = torch.nn.functional.linear
        quantized.append(attr.target)
        del holder, weight
        drop_if_unused(graph_module, source)
    graph_module.recompile()
    for item in kept:
        log.warning(
            "kept in FP32 (group size %d does not divide input width %d): %s", group_size, item["in_features"], item["weight"]
        )
    log.info("INT4 per-group(%d) linear weights: %d quantized, %d kept in FP32", group_size, len(quantized), len(kept))
    return {"quantized_linears": quantized, "fp32_linears": kept}


def quantize_embeddings_int8(graph_module: fx.GraphModule) -> list[str]:
    """Replace each embedding lookup with ExecuTorch's per-row symmetric INT8 `embedding_byte`."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte)

    done = []
    for node in [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.embedding.default]:
        _, attr, weight = _weight_of(graph_module, node)
        if attr is None:
            continue
        table, scales = int8_per_row(weight.detach())
        stem = "int8_" + attr.target.replace(".", "_")
        graph_module.register_buffer(stem + "_table", table)
        graph_module.register_buffer(stem + "_scales", scales)
        with graph_module.graph.inserting_before(node):
            table_node = graph_module.graph.get_attr(stem + "_table")
            scales_node = graph_module.graph.get_attr(stem + "_scales")
            lookup = graph_module.graph.call_function(
                torch.ops.quantized_decomposed.embedding_byte.default,
                (table_node, scales_node, None, -128, 127, node.args[1]),
            )
        node.replace_all_uses_with(lookup)
        graph_module.graph.erase_node(node)
        drop_dtype_checks(graph_module, lookup)
        done.append(attr.target)
        del weight
        drop_if_unused(graph_module, attr)
    graph_module.recompile()
    log.info("INT8 per-row embeddings: %s", ", ".join(done) or "none")
    return done


def drop_dtype_checks(graph_module: fx.GraphModule, lookup: fx.Node) -> None:
    """A bf16 table's lookup was followed by a dtype assertion and an upcast; the INT8 lookup
    returns FP32 itself, so both go."""
    for user in list(lookup.users):
        if user.target == torch.ops.aten._assert_tensor_metadata.default:
            graph_module.graph.erase_node(user)
        elif _is_upcast(user):
            user.replace_all_uses_with(lookup)
            graph_module.graph.erase_node(user)


def _casts_to_fp32(node: fx.Node) -> bool:
    dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    return dtype == torch.float32 and set(node.kwargs) <= {"dtype"}


def int8_per_row(weight: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8, a block of rows at a time: the FP32 temporaries stay a few MB even
    for E2B's 2.35 B-entry per-layer embedding table (whole-table temporaries were 3× its size)."""
    table = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], rows_per_chunk):
        rows = weight[start : start + rows_per_chunk].to(torch.float32)
        row_scales = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        table[start : start + rows_per_chunk] = torch.clamp(torch.round(rows / row_scales[:, None]), -128, 127)
        scales[start : start + rows_per_chunk] = row_scales
    return table, scales


def drop_if_unused(graph_module: fx.GraphModule, node: fx.Node) -> None:
    """Free a replaced FP32 weight (or the upcast a linear read it through) at once, not at the end,
    unless another node still reads it, as the lm_head reads the token table until both have been
    replaced: peak memory stays near the FP32 program's size instead of growing by every quantized
    copy. Dtype assertions on the weight do not count as reading it."""
    if any(user.target != torch.ops.aten._assert_tensor_metadata.default for user in node.users):
        return
    for check in list(node.users):
        graph_module.graph.erase_node(check)
    if node.op == "call_function":  # an upcast: then the weight it read
        weight = node.args[0]
        graph_module.graph.erase_node(node)
        drop_if_unused(graph_module, weight)
        return
    graph_module.graph.erase_node(node)
    owner_name, _, leaf = node.target.rpartition(".")
    owner = _get_attr(graph_module, owner_name) if owner_name else graph_module
    delattr(owner, leaf)


def drop_unreferenced_attributes(graph_module: fx.GraphModule) -> None:
    """Delete weights no node reads any more, so the FP32 originals do not ride along into the .pte."""
    graph_module.graph.eliminate_dead_code()
    referenced = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(graph_module.named_parameters()) + list(graph_module.named_buffers()):
        if name not in referenced:
            owner_name, _, leaf = name.rpartition(".")
            owner = _get_attr(graph_module, owner_name) if owner_name else graph_module
            delattr(owner, leaf)
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()


def quantize_program(program: torch.export.ExportedProgram, group_size: int, embeddings: str):
    """Quantize an exported FP32 decoder; returns the re-exported program and a report.

    Pass the program without keeping a reference (`quantize_program(load_program(path), ...)`): the
    FP32 weights are then freed as each is replaced, instead of staying alive to the end."""
    tokens_per_call = tokens_per_call_of(program)
    graph_module = program.module()
    del program  # the graph module shares its tensors; this drops the program's own references
    log_memory("loading the FP32 program")
    check_group_size(linear_widths(graph_module), group_size)
    # Embeddings first: their tables shrink to INT8 before torchao's temporaries for the linears
    # (the 262,144-row lm_head's are the largest) come on top.
    int8_embeddings = quantize_embeddings_int8(graph_module) if embeddings == "int8" else []
    log_memory("INT8 embeddings")
    report = quantize_linears(graph_module, group_size)
    report["int8_embeddings"] = int8_embeddings
    log_memory("INT4 linears")
    drop_unreferenced_attributes(graph_module)
    with torch.no_grad():
        quantized = torch.export.export(
            graph_module, example_inputs(), dynamic_shapes=dynamic_shapes(tokens_per_call), strict=False
        )
    return quantized, report
