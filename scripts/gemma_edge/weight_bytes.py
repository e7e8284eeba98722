"""Bytes of weights a decoded token reads, from the artifacts' own tensors: the `.pte`'s segments,
the GGUF's tensor table and the `.litertlm`'s TFLite sections.

One decode step reads every linear weight whole (with its quantization scales), the lm_head whole
(the logits of every vocabulary entry), but only one row of each embedding table: the token
embedding and Gemma 4's per-layer input embeddings (2.35 B of E2B's parameters), looked up by the
token id. The KV cache and activations are not weights and are not counted (at a 64-token context
E2B's cache read is under a megabyte). Every byte of the file is attributed to exactly one part,
so the parts add up to the file's size.

Runs on the host (the .pte needs executorch's deserializer and its bundled flatc; the .litertlm
only the `flatbuffers` runtime, litertlm_file); the device benchmark receives the numbers in its spec.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import tempfile
from importlib import resources
from pathlib import Path

from . import litertlm_file

log = logging.getLogger(__name__)

# ---- the .pte ------------------------------------------------------------------------------------

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


def attributed(artifact: str, parts: dict, tables: list[dict], file: dict, attribution: str, **facts) -> dict:
    """A weight_bytes result: the bytes a decoded token reads (the sum of `parts`) and by part, the
    embedding tables it reads a row of, facts of the format, and `file`, which accounts for every
    byte of the file (with the tables' whole bytes added)."""
    return {
        "artifact": artifact,
        "bytes_per_token": sum(parts.values()),
        "parts": parts,
        "embedding_tables": tables,
        **facts,
        "file": {**file, "embedding_tables_bytes": sum(t["bytes"] for t in tables)},
        "attribution": attribution,
    }


def _vocab_size(program) -> int:
    """get_vocab_size, the constant method the export wrote."""
    plan = next(p for p in program.execution_plan if p.name == "get_vocab_size")
    return int(plan.values[plan.outputs[0]].val.int_val)


# ---- the GGUF ------------------------------------------------------------------------------------

# ggml type -> (elements per block, bytes per block), as ggml.c's type_traits (gguf-py's
# GGML_QUANT_SIZES) give them.
GGML_BLOCKS = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
}
GGML_NAMES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    30: "BF16",
}
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
            tensors.append(
                {
                    "name": name,
                    "dims": dims,
                    "type": GGML_NAMES.get(kind, str(kind)),
                    "offset": offset,
                    "bytes": math.prod(dims) // block * block_bytes,
                    "row_bytes": dims[0] // block * block_bytes,
                }
            )
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
            tables.append(
                {
                    "name": tensor["name"],
                    "type": tensor["type"],
                    "dims": tensor["dims"],
                    "bytes": tensor["bytes"],
                    "row_bytes": tensor["row_bytes"],
                }
            )
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
    file = {
        "size_bytes": file_size,
        "weights_bytes": weights,
        "header_bytes": metadata["data_offset"],
        "padding_bytes": metadata["data_offset"] + last["offset"] + last["bytes"] - metadata["data_offset"] - weights,
    }
    return attributed(
        "gguf",
        parts,
        tables,
        file,
        "token_embd and per_layer_token_embd one row per token; the lm_head (output.weight, or token_embd "
        "whole when tied) read whole; every other tensor whole; KV cache excluded",
        tied_output=tied,
        types=sorted({t["type"] for t in tensors}),
    )


# ---- the .litertlm -------------------------------------------------------------------------------

# TFLite ops that look rows up in a table (the position of the table among their inputs), and the
# ops whose constant inputs are the linears' weights.
LOOKUP_TABLE_INPUT = {litertlm_file.EMBEDDING_LOOKUP: 1, litertlm_file.GATHER: 0}
MATMUL_OPS = {litertlm_file.FULLY_CONNECTED, litertlm_file.BATCH_MATMUL, litertlm_file.CONV_2D, litertlm_file.DEPTHWISE_CONV_2D}
WHOLE_ROLES = ("lm_head", "linear_weights", "other_constants")  # a buffer in several: the first


def decode_subgraphs(model: dict) -> set[int]:
    """The subgraphs a decode step runs: those of the model's `decode*` signatures, and the
    decompositions of the STABLEHLO_COMPOSITE ops in them."""
    todo = [index for key, index in model["signatures"].items() if key.startswith("decode")]
    seen: set[int] = set()
    while todo:
        index = todo.pop()
        if index not in seen:
            seen.add(index)
            todo += [op["calls"] for op in model["subgraphs"][index]["operators"] if "calls" in op]
    return seen


def tensor_roles(subgraph: dict, vocab: int | None) -> dict[int, set[str]]:
    """Per tensor of the subgraph: "table" where a lookup op reads rows of it (GATHER only along
    axis 0), and how it is read whole otherwise: `lm_head` (a matrix with the vocabulary as first
    dimension), `linear_weights` (an input of a matmul op) or `other_constants`. A block-quantized
    tensor's scales and zero points (tensors of their own) share its roles."""
    lookups, whole, matmul = set(), set(), set()
    for op in subgraph["operators"]:
        for position, tensor in enumerate(op["inputs"]):
            if is_lookup(op, position):
                lookups.add(tensor)
            else:
                whole.add(tensor)
                if op["op"] in MATMUL_OPS:
                    matmul.add(tensor)
    roles = {}
    for index, tensor in enumerate(subgraph["tensors"]):
        found = {"table"} if index in lookups else set()
        if index in whole or not found:  # a constant no op reads as a table is read whole
            shape = tensor["shape"]
            if len(shape) >= 2 and vocab and shape[0] == vocab:
                found.add("lm_head")
            else:
                found.add("linear_weights" if index in matmul else "other_constants")
        roles[index] = found
    for index, tensor in enumerate(subgraph["tensors"]):
        for helper in tensor["quantization_tensors"]:
            roles[helper] = roles[index]
    return roles


def tflite_buffers(model: dict, vocab: int | None) -> dict[int, dict]:
    """Per weight buffer of a TFLite model (every buffer a tensor points at, metadata buffers
    aside): its bytes, with the per-channel scales its tensor's quantization holds in the
    flatbuffer (float32, one copy: the decode subgraph's when it has one), whether a decode step
    runs a subgraph that reads it, its roles there, and the first tensor that points at it."""
    decode = decode_subgraphs(model)
    metadata = set(model["metadata_buffers"])
    found: dict[int, dict] = {}
    order = sorted(range(len(model["subgraphs"])), key=lambda index: index not in decode)
    for index in order:
        subgraph = model["subgraphs"][index]
        roles = tensor_roles(subgraph, vocab) if index in decode else {}
        for position, tensor in enumerate(subgraph["tensors"]):
            buffer = tensor["buffer"]
            if not buffer or buffer in metadata or not model["buffers"][buffer]["bytes"]:
                continue
            if buffer not in found:
                scales = 4 * tensor["scales"] if tensor["scales"] > 1 else 0
                found[buffer] = {
                    "bytes": model["buffers"][buffer]["bytes"] + scales,
                    "decode": False,
                    "roles": set(),
                    "tensor": tensor,
                }
            if index in decode:
                found[buffer]["decode"] = True
                found[buffer]["roles"] |= roles[position]
    return found


def is_lookup(op: dict, position: int) -> bool:
    """Does `op` read rows of its input at `position` (GATHER: only along axis 0)?"""
    return LOOKUP_TABLE_INPUT.get(op["op"]) == position and op.get("axis", 0) == 0


def lookup_rows(model: dict) -> list[int]:
    """The row counts of the tables the model's lookup ops read."""
    return [
        subgraph["tensors"][tensor]["shape"][0]
        for subgraph in model["subgraphs"]
        for op in subgraph["operators"]
        for position, tensor in enumerate(op["inputs"])
        if is_lookup(op, position) and subgraph["tensors"][tensor]["shape"]
    ]


def litertlm_weight_bytes(path: Path) -> dict:
    """Bytes a decode step of the .litertlm reads, by part, from its TFLite sections (the decoder
    and, externalized, the embedder and per-layer embedder):

    - `embedding_rows`: one row of each table a lookup op (EMBEDDING_LOOKUP, GATHER along axis 0)
      of a decode subgraph reads: the table's bytes with its per-channel float32 scales, over its
      rows (rounded up);
    - `lm_head`: the matrices whose first dimension is the vocabulary (the tables' row count), with
      their block scales, read whole for the logits;
    - `linear_weights`: every other constant a matmul op (FULLY_CONNECTED, BATCH_MATMUL, convs)
      reads, with its scales (INT4 blocks with FP16 scales, or per-channel INT8), read whole;
    - `other_constants`: the rest the decode subgraphs hold (norms, RoPE, shapes), read whole.

    Decode subgraphs are those of the `decode*` signatures and the composites' decompositions they
    call; weights only prefill's subgraphs (or a section without a decode signature) read are
    `outside_decode_bytes`. `file` accounts for every byte once: weights (buffers and the scales
    counted above, each buffer once however many subgraphs point at it), the TFLite flatbuffers'
    graphs (operators, tensors, other quantization parameters, metadata buffers, their alignment),
    the other sections (metadata protos, tokenizer), the container header and the padding between
    sections.

    Approximations: every weight a decode subgraph points at is taken as read once per token, as
    the file stores it (LiteRT's XNNPACK delegate packs weights at load, the `.xnnpack_cache`, into
    a layout of about the same size); a table's zero points (INT64, zero for its symmetric recipe)
    are left in the graph bytes, not in its rows; control flow (WHILE, IF) is not followed into its
    subgraphs (none in these models); the KV cache and activations are not counted."""
    header, sections, models, file_size = read_litertlm(Path(path))
    if not any(decode_subgraphs(model) for model in models.values()):
        raise ValueError(f"{path}: no TFLite section has a decode signature")
    vocab = max((rows for model in models.values() for rows in lookup_rows(model)), default=None)
    parts = {"linear_weights": 0, "lm_head": 0, "embedding_rows": 0, "other_constants": 0}
    tables, described, lm_head_tensors = [], [], 0
    for section in sections:
        entry = {
            "index": section["index"],
            "data_type": section["data_type"],
            "model_type": section["items"].get("model_type"),
            "bytes": section["end"] - section["begin"],
        }
        if section["index"] in models:
            found = tflite_weight_bytes(models[section["index"]], vocab)
            for part, size in found.pop("parts").items():
                parts[part] += size
            tables += [{"section": section["index"], "model_type": entry["model_type"], **t} for t in found.pop("tables")]
            lm_head_tensors += found.pop("lm_head_tensors")
            entry.update(found, graph_bytes=entry["bytes"] - found["weights_bytes"])
        described.append(entry)
    tflite = [entry for entry in described if "weights_bytes" in entry]
    file = {
        "size_bytes": file_size,
        "weights_bytes": sum(e["weights_bytes"] for e in tflite),
        "outside_decode_bytes": sum(e["outside_decode_bytes"] for e in tflite),
        "graph_bytes": sum(e["graph_bytes"] for e in tflite),
        "other_sections_bytes": sum(e["bytes"] for e in described if "weights_bytes" not in e),
        "header_bytes": header["header_end"],
        "padding_bytes": file_size - header["header_end"] - sum(e["bytes"] for e in described),
    }
    return attributed(
        "litertlm",
        parts,
        tables,
        file,
        "TFLite weights the decode signatures' subgraphs read: embedding tables (EMBEDDING_LOOKUP, GATHER) "
        "one row per token with their per-channel scales; the lm_head (vocabulary-sized matrices) and every "
        "other weight whole; prefill-only weights and the KV cache excluded",
        lm_head_tensors=lm_head_tensors,
        vocab_size=vocab,
        sections=described,
    )


def read_litertlm(path: Path) -> tuple[dict, list[dict], dict[int, dict], int]:
    """The container's header, its sections in file order (checked to lie one after the other
    inside the file), the TFLite model of each TFLite section by section index, and the file's size."""
    with litertlm_file.mapped(path) as data:
        header = litertlm_file.read_header(data)
        sections = sorted(header["sections"], key=lambda section: section["begin"])
        models = {}
        for section in sections:
            if section["data_type"] == "TFLiteWeights":
                raise ValueError(f"{path}: section {section['index']} holds external TFLite weights: not attributed")
            if section["data_type"] == "TFLiteModel":
                models[section["index"]] = litertlm_file.read_tflite(data[section["begin"] : section["end"]])
        file_size = len(data)
    previous = header["header_end"]
    for section in sections:
        if not previous <= section["begin"] <= section["end"] <= file_size:
            raise ValueError(
                f"{path}: section {section['index']} at [{section['begin']}, {section['end']}) overlaps "
                "what precedes it or passes the end of the file"
            )
        previous = section["end"]
    return header, sections, models, file_size


def tflite_weight_bytes(model: dict, vocab: int | None) -> dict:
    """One TFLite model's weights (`weights_bytes`), those no decode subgraph reads
    (`outside_decode_bytes`), what a decode step reads (`read_per_token_bytes`) by part, its
    lookup tables and how many buffers are the lm_head."""
    buffers = tflite_buffers(model, vocab)
    parts = {"linear_weights": 0, "lm_head": 0, "embedding_rows": 0, "other_constants": 0}
    tables = []
    for buffer in (b for b in buffers.values() if b["decode"]):
        if "table" in buffer["roles"]:
            tensor = buffer["tensor"]
            row = math.ceil(buffer["bytes"] / tensor["shape"][0])
            tables.append(
                {
                    "name": tensor["name"],
                    "type": tensor["type"],
                    "shape": tensor["shape"],
                    "bytes": buffer["bytes"],
                    "row_bytes": row,
                }
            )
            parts["embedding_rows"] += row
        role = next((r for r in WHOLE_ROLES if r in buffer["roles"]), None)
        if role:
            parts[role] += buffer["bytes"]
    return {
        "weights_bytes": sum(b["bytes"] for b in buffers.values()),
        "outside_decode_bytes": sum(b["bytes"] for b in buffers.values() if not b["decode"]),
        "read_per_token_bytes": sum(parts.values()),
        "parts": parts,
        "tables": tables,
        "lm_head_tensors": sum("lm_head" in b["roles"] and b["decode"] for b in buffers.values()),
        "decode_signatures": sorted(key for key in model["signatures"] if key.startswith("decode")),
    }


def weight_bytes(path: Path) -> dict | None:
    """pte_weight_bytes, gguf_weight_bytes or litertlm_weight_bytes, by the file's suffix; None
    for other formats."""
    if str(path).endswith(".pte"):
        return pte_weight_bytes(Path(path))
    if str(path).endswith(".gguf"):
        return gguf_weight_bytes(Path(path))
    if str(path).endswith(".litertlm"):
        return litertlm_weight_bytes(Path(path))
    return None


def readable_weight_bytes(path: Path) -> dict | None:
    """weight_bytes(path), or None (and a warning) for a file it cannot attribute: the fraction is
    then left out, and the deploy or benchmark goes on."""
    try:
        return weight_bytes(path)
    except (ValueError, OSError) as error:
        log.warning("weight bytes per token of %s not counted: %s", path, error)
        return None
