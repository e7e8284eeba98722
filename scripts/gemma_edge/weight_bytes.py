"""Bytes of weights a decoded token reads, from the artifacts' own tensors: the `.pte`'s segments
and the GGUF's tensor table.

One decode step reads every linear weight whole (with its quantization scales), the lm_head whole
(the logits of every vocabulary entry), but only one row of each embedding table: the token
embedding and Gemma 4's per-layer input embeddings (2.35 B of E2B's parameters), looked up by the
token id. The KV cache and activations are not weights and are not counted (at a 64-token context
E2B's cache read is under a megabyte). Every byte of the file is attributed to exactly one part,
so the parts add up to the file's size.

Runs on the host (the .pte needs executorch's deserializer and its bundled flatc); the device
benchmark receives the numbers in its spec.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from importlib import resources
from pathlib import Path

# ---- the .pte ------------------------------------------------------------------------------------

EMBEDDING_OPS = ("quantized_decomposed::embedding_byte", "quantized_decomposed::embedding_4bit",
                 "quantized_decomposed::embedding_2bit", "aten::embedding")
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
        graph.write_bytes(payload[offset:offset + size])
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
                tables[tensor.data_buffer_idx] = {"rows": tensor.sizes[0], "shape": list(tensor.sizes),
                                                  "op": operator.name}
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
    for delegate in plan.delegates:
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
    per_token = linear + lm_head + rows + other
    return {
        "artifact": "pte",
        "bytes_per_token": per_token,
        "parts": {"linear_weights": linear, "lm_head": lm_head, "embedding_rows": rows, "other_constants": other},
        "embedding_tables": list(tables.values()),
        "lm_head_tensors": len(lm_head_keys),
        "vocab_size": vocab,
        "file": {
            "size_bytes": file_size,
            "weights_bytes": weights_in_file,
            "embedding_tables_bytes": sum(t["bytes"] for t in tables.values()),
            "delegate_graphs_bytes": delegate_bytes,
            "program_bytes": header.program_size,
            "padding_bytes": file_size - header.program_size - used,
            "unattributed_named_data": len(unknown),
        },
        "attribution": ("XNNPACK named data read whole (lm_head: its constants with the vocabulary as first "
                        "dimension); embedding tables one row per token; other constants whole; KV cache excluded"),
    }


def _vocab_size(program) -> int:
    """get_vocab_size, the constant method the export wrote."""
    plan = next(p for p in program.execution_plan if p.name == "get_vocab_size")
    return int(plan.values[plan.outputs[0]].val.int_val)


# ---- the GGUF ------------------------------------------------------------------------------------

# ggml type -> (elements per block, bytes per block), as ggml.c's type_traits (gguf-py's
# GGML_QUANT_SIZES) give them.
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}
GGML_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}
# GGUF metadata value types: fixed-size scalars by struct format; 8 string, 9 array.
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_tensors(path: Path) -> tuple[list[dict], dict]:
    """The tensor table of a GGUF (name, dims in ggml order: dims[0] is a row's length, type,
    bytes) and its scalar metadata; only the header is read."""
    with open(path, "rb") as handle:
        def unpack(fmt):
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, handle.read(size))[0]

        def string():
            return handle.read(unpack("Q")).decode("utf-8", "replace")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = unpack("I"), unpack("Q")
                items = [value(item) for _ in range(count)]
                return items if count <= 16 else f"<array of {count}>"
            return unpack(GGUF_SCALARS[kind])

        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, tensor_count, kv_count = unpack("I"), unpack("Q"), unpack("Q")
        metadata = {"version": version}
        for _ in range(kv_count):
            key = string()
            metadata[key] = value(unpack("I"))
        tensors = []
        for _ in range(tensor_count):
            name = string()
            dims = [unpack("Q") for _ in range(unpack("I"))]
            kind, offset = unpack("I"), unpack("Q")
            block, block_bytes = GGML_BLOCKS[kind]
            tensors.append({"name": name, "dims": dims, "type": GGML_NAMES.get(kind, str(kind)), "offset": offset,
                            "bytes": math.prod(dims) // block * block_bytes,
                            "row_bytes": dims[0] // block * block_bytes})
        alignment = metadata.get("general.alignment", 32)
        metadata["data_offset"] = -(-handle.tell() // alignment) * alignment
    return tensors, metadata


def gguf_weight_bytes(path: Path) -> dict:
    """Bytes a decode step of the GGUF reads, by part: `lm_head` (`output.weight`, or the token
    table `token_embd.weight` when the output is tied to it: read whole for the logits),
    `embedding_rows` (one row of `token_embd` and of `per_layer_token_embd`), `linear_weights` (every
    other tensor of two or more dimensions) and `other_constants` (norms and other vectors)."""
    tensors, metadata = read_gguf_tensors(path)
    names = {t["name"] for t in tensors}
    tied = "output.weight" not in names
    parts = {"linear_weights": 0, "lm_head": 0, "embedding_rows": 0, "other_constants": 0}
    tables = []
    for tensor in tensors:
        if tensor["name"] in ("token_embd.weight", "per_layer_token_embd.weight"):
            parts["embedding_rows"] += tensor["row_bytes"]
            tables.append({"name": tensor["name"], "type": tensor["type"], "dims": tensor["dims"],
                           "bytes": tensor["bytes"], "row_bytes": tensor["row_bytes"]})
            if tensor["name"] == "token_embd.weight" and tied:
                parts["lm_head"] += tensor["bytes"]
        elif tensor["name"] == "output.weight":
            parts["lm_head"] += tensor["bytes"]
        elif sum(d > 1 for d in tensor["dims"]) >= 2:
            parts["linear_weights"] += tensor["bytes"]
        else:
            parts["other_constants"] += tensor["bytes"]
    weights = sum(t["bytes"] for t in tensors)
    last = max(tensors, key=lambda t: t["offset"])
    file_size = Path(path).stat().st_size
    return {
        "artifact": "gguf",
        "bytes_per_token": sum(parts.values()),
        "parts": parts,
        "embedding_tables": tables,
        "tied_output": tied,
        "types": sorted({t["type"] for t in tensors}),
        "file": {
            "size_bytes": file_size,
            "weights_bytes": weights,
            "embedding_tables_bytes": sum(t["bytes"] for t in tables),
            "header_bytes": metadata["data_offset"],
            "padding_bytes": metadata["data_offset"] + last["offset"] + last["bytes"] - metadata["data_offset"] - weights,
        },
        "attribution": ("token_embd and per_layer_token_embd one row per token; the lm_head (output.weight, or "
                        "token_embd whole when tied) read whole; every other tensor whole; KV cache excluded"),
    }


def weight_bytes(path: Path) -> dict | None:
    """pte_weight_bytes or gguf_weight_bytes, by the file's suffix; None for other formats (a
    `.litertlm` is not attributed yet)."""
    if str(path).endswith(".pte"):
        return pte_weight_bytes(Path(path))
    if str(path).endswith(".gguf"):
        return gguf_weight_bytes(Path(path))
    return None
