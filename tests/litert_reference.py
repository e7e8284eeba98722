"""What LiteRT's own code reads in a .litertlm, as JSON, for tests/test_litert.py to set beside
gemma_edge.peers.litertlm_file: run with .venv-litert's python (litert-lm-builder's header reader and
ai-edge-litert's generated TFLite schema), `python litert_reference.py MODEL.litertlm`."""

import io
import json
import sys

from ai_edge_litert import schema_py_generated as tflite
from litert_lm_builder import litertlm_header_schema_py_generated as header_schema
from litert_lm_builder import litertlm_peek

LOOKUPS = {tflite.BuiltinOperator.EMBEDDING_LOOKUP: 1, tflite.BuiltinOperator.GATHER: 0}


def tflite_model(buf: bytes) -> dict:
    model = tflite.Model.GetRootAs(buf, 0)
    buffers = []
    for index in range(model.BuffersLength()):
        buffer = model.Buffers(index)
        buffers.append(buffer.Size() if buffer.Offset() > 1 else buffer.DataLength())
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    tables = []
    for index in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(index)
        for position in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(position)
            code = codes[op.OpcodeIndex()]
            table_input = LOOKUPS.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
            if table_input is None:
                continue
            tensor = subgraph.Tensors(op.Inputs(table_input))
            quantization = tensor.Quantization()
            tables.append(
                {
                    "subgraph": index,
                    "buffer": tensor.Buffer(),
                    "shape": tensor.ShapeAsNumpy().tolist(),
                    "scales": quantization.ScaleLength() if quantization else 0,
                }
            )
    signatures = {
        model.SignatureDefs(i).SignatureKey().decode(): model.SignatureDefs(i).SubgraphIndex()
        for i in range(model.SignatureDefsLength())
    }
    signature_outputs = {
        model.SignatureDefs(i).SignatureKey().decode(): [
            model.SignatureDefs(i).Outputs(j).Name().decode() for j in range(model.SignatureDefs(i).OutputsLength())
        ]
        for i in range(model.SignatureDefsLength())
    }
    metadata = sorted(model.Metadata(i).Buffer() for i in range(model.MetadataLength()))
    return {
        "buffers": buffers,
        "tables": tables,
        "signatures": signatures,
        "signature_outputs": signature_outputs,
        "metadata_buffers": metadata,
        "subgraphs": model.SubgraphsLength(),
    }


def main(path: str) -> None:
    meta = litertlm_peek.read_litertlm_header(path, io.StringIO())
    sections = meta.SectionMetadata()
    models = {}
    with open(path, "rb") as handle:
        for index in range(sections.ObjectsLength()):
            section = sections.Objects(index)
            if section.DataType() == header_schema.AnySectionDataType.TFLiteModel:
                handle.seek(section.BeginOffset())
                models[index] = tflite_model(handle.read(section.EndOffset() - section.BeginOffset()))
    json.dump(models, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
