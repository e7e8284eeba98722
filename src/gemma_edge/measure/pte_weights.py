"""Weight bytes per token of a .pte: its constant segments and XNNPACK's serialised graphs, read
with executorch's own deserializer, the embedding tables found by the ops that look rows up."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from importlib import resources
from pathlib import Path

from gemma_edge.measure.weight_parts import attributed

EMBEDDING_OPS = (
    "quantized_decomposed::embedding_byte",
    "quantized_decomposed::embedding_4bit",
    "quantized_decomposed::embedding_2bit",
    "aten::embedding",
)


# ExecuTorch ScalarType codes (exir/schema: ScalarType) and their element sizes in bytes.
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 15: 2}


def read_program(pte: Path):
    """(extended header, Program) of a .pte, reading only its flatbuffer, not its segments."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _get_extended_header

    with open(pte, "rb") as handle:
        header = _get_extended_header(handle.read(64))
        if header is None or not header.is_valid():
            raise ValueError(f"{pte} has no extended header: not a .pte with segments")
        handle.seek(0)
        return header, _flatbuffer_to_program(handle.read(header.program_size))


def segment_bytes(pte: Path, header, segment) -> bytes:
    with open(pte, "rb") as handle:
        handle.seek(header.segment_base_offset + segment.offset)
        return handle.read(segment.size)


def xnnpack_graph(payload: bytes) -> dict:
    """An XNNPACK delegate payload's graph (XNNHeader, then its flatbuffer) as JSON, decoded by
    executorch's own flatc with the backend's schema."""
    from executorch.backends.xnnpack import serialization
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    if payload[4:8] != b"XH00":
        raise ValueError("not an XNNPACK delegate payload (no XH00 header)")
    offset, size = struct.unpack_from("<II", payload, 10)
    with tempfile.TemporaryDirectory() as scratch:
        schema = Path(scratch) / "schema.fbs"
        schema.write_bytes(resources.files(serialization).joinpath("schema.fbs").read_bytes())
        graph = Path(scratch) / "graph.bin"
        graph.write_bytes(payload[offset : offset + size])
        _flatc_decompile(scratch, str(schema), str(graph))
        return json.loads((Path(scratch) / "graph.json").read_text())


def xnnpack_constants(graph: dict) -> dict[str, dict]:
    """Per named-data key a delegate reads: the tensor's dims and whether the key holds its
    values or its quantization scales."""
    constants = graph.get("constant_data") or []
    found = {}
    for value in graph.get("xvalues", []):
        union = value["xvalue_union"]
        tensor = union.get("tensor_value", union)
        index = tensor.get("constant_buffer_idx", 0)
        if not index:
            continue
        dims = tensor.get("dims", [])
        found[constants[index]["named_key"]] = {"dims": dims, "role": "values"}
        scales = (union.get("quant_params") or {}).get("scale_buffer_idx", 0)
        if scales:
            found[constants[scales]["named_key"]] = {"dims": dims, "role": "scales"}
    return found


def constant_buffer_sizes(program, segment_size: int) -> list[int]:
    """Bytes of each constant buffer in the constant segment (index 0 is the reserved empty one);
    each includes the padding that follows it, so they add up to the segment."""
    offsets = list(program.constant_segment.offsets)
    return [end - start for start, end in zip(offsets, offsets[1:] + [segment_size])]


def embedding_tables(plan) -> dict[int, dict]:
    """Constant-buffer index -> {rows, shape} of every table (and its per-row scales) an embedding
    op looks rows up in."""
    tables = {}
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if type(call).__name__ != "KernelCall":
                continue
            operator = plan.operators[call.op_index]
            if operator.name not in EMBEDDING_OPS:
                continue
            # embedding_byte(weight, scales, zero_points, ...); aten::embedding(weight, indices)
            weight_args = call.args[:2] if operator.name != "aten::embedding" else call.args[:1]
            rows = None
            for arg in weight_args:
                tensor = plan.values[arg].val
                if type(tensor).__name__ != "Tensor" or not tensor.data_buffer_idx:
                    continue
                rows = rows or tensor.sizes[0]
                tables[tensor.data_buffer_idx] = {"rows": tensor.sizes[0], "shape": list(tensor.sizes), "op": operator.name}
    return tables


def pte_weight_bytes(pte: Path) -> dict:
    """Bytes a decode step of the .pte reads, by part:

    - `linear_weights`: XNNPACK's constants (named data: INT4 values and their scales, FP32
      linears, norms inside delegates), read whole, except
    - `lm_head`: the constants whose first dimension is the vocabulary (the tied lm_head's INT4
      copy and its scales), read whole for the logits;
    - `embedding_rows`: one row of each table an embedding op reads (INT8 values and the row's
      scale), the table's bytes over its rows;
    - `other_constants`: the rest of the constant segment (tables outside delegates), read whole.

    `file` accounts for every byte: weights (the above, with the embedding tables whole), the
    delegates' graphs, the program flatbuffer and the alignment padding between segments."""
    header, program = read_program(pte)
    segments = program.segments
    plan = next(p for p in program.execution_plan if p.name == "forward")
    vocab = _vocab_size(program)

    named = {entry.key: segments[entry.segment_index].size for entry in program.named_data}
    tensors = {}
    delegate_bytes = 0
    # Every method's delegates: a one-token method beside forward has graphs of its own, over the
    # same named data.
    for delegate in (d for method in program.execution_plan for d in method.delegates):
        if delegate.processed.location != 1:  # inline: part of the program flatbuffer
            continue
        payload = segment_bytes(pte, header, segments[delegate.processed.index])
        delegate_bytes += len(payload)
        if delegate.id == "XnnpackBackend":
            tensors.update(xnnpack_constants(xnnpack_graph(payload)))
    unknown = set(named) - set(tensors)
    lm_head_keys = {key for key, t in tensors.items() if key in named and t["dims"][:1] == [vocab]}
    lm_head = sum(named[k] for k in lm_head_keys)
    linear = sum(named.values()) - lm_head

    constant_segment = 0
    tables, rows, other = {}, 0, 0
    if program.constant_segment.offsets:
        constant_segment = segments[program.constant_segment.segment_index].size
        sizes = constant_buffer_sizes(program, constant_segment)
        found = embedding_tables(plan)
        for index, size in enumerate(sizes):
            if index in found:
                table = found[index]
                row = math.ceil(size / table["rows"])
                tables[index] = {**table, "bytes": size, "row_bytes": row}
                rows += row
            else:
                other += size
    weights_in_file = sum(named.values()) + constant_segment
    used = sum(s.size for s in segments)
    file_size = Path(pte).stat().st_size
    parts = {"linear_weights": linear, "lm_head": lm_head, "embedding_rows": rows, "other_constants": other}
    file = {
        "size_bytes": file_size,
        "weights_bytes": weights_in_file,
        "delegate_graphs_bytes": delegate_bytes,
        "program_bytes": header.program_size,
        "padding_bytes": file_size - header.program_size - used,
        "unattributed_named_data": len(unknown),
    }
    return attributed(
        "pte",
        parts,
        list(tables.values()),
        file,
        "XNNPACK named data read whole (lm_head: its constants with the vocabulary as first dimension); "
        "embedding tables one row per token; other constants whole; KV cache excluded",
        lm_head_tensors=len(lm_head_keys),
        vocab_size=vocab,
    )


def _vocab_size(program) -> int:
    """get_vocab_size, the constant method the export wrote."""
    plan = next(p for p in program.execution_plan if p.name == "get_vocab_size")
    return int(plan.values[plan.outputs[0]].val.int_val)
