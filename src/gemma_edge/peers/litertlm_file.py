"""Reading a `.litertlm` without LiteRT: its section table, and in each TFLite section the tensors,
their buffers and the operators that read them. Only the fields weight_bytes needs, with the
`flatbuffers` runtime alone.

The container, as litert-lm-builder writes it (`litertlm_core.py`, `litertlm_header_schema`): the
magic `LITERTLM`, three uint32 version numbers, at byte 24 a uint64 offset where the header ends,
from byte 32 the header flatbuffer (`LiteRTLMMetaData`: system metadata, then `SectionMetadata`
with one `SectionObject` per section: key-value items, begin and end offsets in the file, a data
type), then the sections, each starting on a 16 KiB block. A TFLite section is a TFLite model
whose buffers lie inside its flatbuffer (`Buffer.data`) or after it (`Buffer.offset`/`size`,
from the section's first byte; an offset of 0 or 1 means none). Field numbers are TFLite's
`schema.fbs` (`ai_edge_litert/schema_py_generated.py`).
"""

from __future__ import annotations

import mmap
import struct
from contextlib import contextmanager
from pathlib import Path

from flatbuffers import number_types as N
from flatbuffers.table import Table

MAGIC = b"LITERTLM"
HEADER_END_AT = 24
HEADER_BEGIN = 32
# litert-lm-builder's AnySectionDataType.
SECTION_TYPES = {
    0: "NONE",
    1: "GenericBinaryData",
    2: "Deprecated",
    3: "TFLiteModel",
    4: "SP_Tokenizer",
    5: "LlmMetadataProto",
    6: "HF_Tokenizer_Zlib",
    7: "TFLiteWeights",
    8: "EmbeddingMetadataProto",
    9: "ExecutorMetadataProto",
    10: "TtsMetadataProto",
    11: "AsrMetadataProto",
}
STRING_VALUE = 9  # VData.StringValue, the union type of a string item

# TFLite BuiltinOperator codes and TensorType names used below.
CONV_2D, DEPTHWISE_CONV_2D, EMBEDDING_LOOKUP, FULLY_CONNECTED, GATHER, BATCH_MATMUL, STABLEHLO_COMPOSITE = (
    3,
    4,
    7,
    9,
    36,
    126,
    206,
)
TENSOR_TYPES = {
    0: "FLOAT32",
    1: "FLOAT16",
    2: "INT32",
    3: "UINT8",
    4: "INT64",
    6: "BOOL",
    7: "INT16",
    9: "INT8",
    10: "FLOAT64",
    17: "INT4",
    18: "BFLOAT16",
    20: "UINT4",
}
BLOCKWISE = 2  # QuantizationDetails.BlockwiseQuantization
COMPOSITE_OPTIONS = 21  # BuiltinOptions2.StableHLOCompositeOptions
GATHER_OPTIONS = 23  # BuiltinOptions.GatherOptions


class Node:
    """A flatbuffer table: fields by their vtable slot (4 + 2 × field id)."""

    __slots__ = ("tab",)

    def __init__(self, buf, pos: int):
        self.tab = Table(buf, pos)

    def _at(self, slot: int) -> int:
        """The field's absolute position, 0 when absent."""
        offset = self.tab.Offset(slot)
        return offset + self.tab.Pos if offset else 0

    def scalar(self, slot: int, kind, default=0):
        at = self._at(slot)
        return self.tab.Get(kind, at) if at else default

    def string(self, slot: int) -> str | None:
        at = self._at(slot)
        return self.tab.String(at).decode("utf-8", "replace") if at else None

    def table(self, slot: int) -> Node | None:
        at = self._at(slot)
        return Node(self.tab.Bytes, self.tab.Indirect(at)) if at else None

    def length(self, slot: int) -> int:
        offset = self.tab.Offset(slot)  # Table.Vector and VectorLen take the offset from Pos
        return self.tab.VectorLen(offset) if offset else 0

    def tables(self, slot: int) -> list[Node]:
        start = self._vector(slot)
        return [Node(self.tab.Bytes, self.tab.Indirect(start + 4 * i)) for i in range(self.length(slot))]

    def scalars(self, slot: int, kind) -> list:
        start = self._vector(slot)
        return [self.tab.Get(kind, start + kind.bytewidth * i) for i in range(self.length(slot))]

    def _vector(self, slot: int) -> int:
        offset = self.tab.Offset(slot)
        return self.tab.Vector(offset) if offset else 0


def root(buf) -> Node:
    return Node(buf, struct.unpack_from("<I", buf, 0)[0])


@contextmanager
def mapped(path: Path):
    """The file, memory-mapped read-only (a section is then a zero-copy memoryview)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        whole = memoryview(view)
        try:
            yield whole
        finally:
            whole.release()


def read_header(data) -> dict:
    """The container's version, where its header ends, and its sections in file order:
    {index, data_type, items (string items only, e.g. model_type), begin, end}."""
    if bytes(data[:8]) != MAGIC:
        raise ValueError(f"not a .litertlm (magic {bytes(data[:8])!r})")
    version = struct.unpack_from("<III", data, 8)
    header_end = struct.unpack_from("<Q", data, HEADER_END_AT)[0]
    meta = root(data[HEADER_BEGIN:header_end])
    sections = []
    table = meta.table(6)
    for index, section in enumerate(table.tables(4) if table else []):
        items = {}
        for item in section.tables(4):
            value = item.table(8)
            if item.scalar(6, N.Uint8Flags) == STRING_VALUE and value is not None:
                items[item.string(4)] = value.string(4)
        kind = section.scalar(10, N.Uint8Flags)
        sections.append(
            {
                "index": index,
                "data_type": SECTION_TYPES.get(kind, str(kind)),
                "items": items,
                "begin": section.scalar(6, N.Uint64Flags),
                "end": section.scalar(8, N.Uint64Flags),
            }
        )
    return {"version": ".".join(map(str, version)), "header_end": header_end, "sections": sections}


def read_tflite(buf) -> dict:
    """A TFLite model's buffers (bytes, and where: inline in the flatbuffer or at an offset after
    it), metadata buffers, signatures, and per subgraph its tensors and operators."""
    model = root(buf)
    if model.length(22):  # Model.external_buffers: weights in another file or section
        raise ValueError("TFLite model with external buffers: not attributed")
    buffers = []
    for buffer in model.tables(12):
        inline = buffer.length(4)
        offset = buffer.scalar(6, N.Uint64Flags)
        external = offset > 1
        size = buffer.scalar(8, N.Uint64Flags) if external else inline
        if external and offset + size > len(buf):
            raise ValueError(f"TFLite buffer at {offset}+{size} beyond its model's {len(buf)} bytes")
        buffers.append({"bytes": size, "offset": offset if external else None})
    codes = [max(code.scalar(4, N.Int8Flags), code.scalar(10, N.Int32Flags)) for code in model.tables(6)]
    metadata = {entry.string(4): entry.scalar(6, N.Uint32Flags) for entry in model.tables(16)}
    return {
        "buffers": buffers,
        "metadata_buffers": sorted(set(metadata.values()) | set(model.scalars(14, N.Int32Flags))),
        "metadata": metadata,
        "signatures": {signature.string(8): signature.scalar(12, N.Uint32Flags) for signature in model.tables(18)},
        # SignatureDef.outputs: TensorMaps, each named.
        "signature_outputs": {signature.string(8): [m.string(4) for m in signature.tables(6)] for signature in model.tables(18)},
        "subgraphs": [read_subgraph(subgraph, codes) for subgraph in model.tables(8)],
    }


def signature_outputs(path: Path) -> dict[str, list[str]]:
    """The output names of every signature in a .litertlm's TFLite sections: LiteRT-LM's converter
    gives `prefill_<n>` only the KV cache, `decode` the logits too."""
    outputs = {}
    with mapped(path) as data:
        for section in read_header(data)["sections"]:
            if section["data_type"] == "TFLiteModel":
                outputs.update(read_tflite(data[section["begin"] : section["end"]])["signature_outputs"])
    return outputs


def read_subgraph(subgraph: Node, codes: list[int]) -> dict:
    tensors = []
    for tensor in subgraph.tables(4):
        quantization = tensor.table(12)
        scales, aux = 0, []
        if quantization is not None:
            scales = quantization.length(8)
            details = quantization.table(14)
            if quantization.scalar(12, N.Uint8Flags) == BLOCKWISE and details is not None:
                # BlockwiseQuantization: the tensors holding its scales and zero points.
                aux = [t for t in (details.scalar(4, N.Int32Flags, -1), details.scalar(6, N.Int32Flags, -1)) if t >= 0]
        kind = tensor.scalar(6, N.Int8Flags)
        tensors.append(
            {
                "name": tensor.string(10),
                "shape": tensor.scalars(4, N.Int32Flags),
                "type": TENSOR_TYPES.get(kind, str(kind)),
                "buffer": tensor.scalar(8, N.Uint32Flags),
                "scales": scales,
                "quantization_tensors": aux,
            }
        )
    operators = []
    for operator in subgraph.tables(10):
        code = codes[operator.scalar(4, N.Uint32Flags)]
        entry = {"op": code, "inputs": operator.scalars(6, N.Int32Flags)}
        options2 = operator.table(28)
        if code == STABLEHLO_COMPOSITE and operator.scalar(26, N.Uint8Flags) == COMPOSITE_OPTIONS and options2:
            entry["calls"] = options2.scalar(6, N.Int32Flags)
        options = operator.table(12)
        if code == GATHER and operator.scalar(10, N.Uint8Flags) == GATHER_OPTIONS and options:
            entry["axis"] = options.scalar(4, N.Int32Flags)
        operators.append(entry)
    return {"name": subgraph.string(12), "tensors": tensors, "operators": operators}
