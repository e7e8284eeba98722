"""Weight bytes per token of a .litertlm: its TFLite sections' buffers, by the ops that read them in
the decode signatures."""

from __future__ import annotations

import math
from pathlib import Path

from gemma_edge.measure.weight_parts import attributed
from gemma_edge.peers import litertlm_file

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
