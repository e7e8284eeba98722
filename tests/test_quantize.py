"""Quantization of exported programs, on small real torch.export graphs."""

import pytest
import torch
from torch import nn

from gemma_edge.build.quantize import (
    GroupSizeError,
    check_group_size,
    drop_unreferenced_attributes,
    linear_widths,
    quantize_embeddings_int8,
    quantize_linears,
)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 96)
        self.up = nn.Linear(96, 192, bias=False)
        self.down = nn.Linear(192, 96, bias=False)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.embed(ids))))


def exported_module():
    torch.manual_seed(0)
    model = TwoLinears().eval().requires_grad_(False)
    return model, torch.export.export(model, (torch.tensor([[1, 2, 3]]),)).module()


def test_group_size_dividing_no_width_is_rejected_naming_the_widths():
    _, graph_module = exported_module()
    widths = linear_widths(graph_module)
    assert sorted(widths.values()) == [96, 192]
    with pytest.raises(GroupSizeError, match=r"group_size 128 divides none of this model's linear input widths \(96, 192\)"):
        check_group_size(widths, 128)
    check_group_size(widths, 64)  # divides 192


def test_layers_the_group_size_does_not_divide_stay_fp32_and_are_listed():
    model, graph_module = exported_module()
    report = quantize_linears(graph_module, 64)
    assert report["quantized_linears"] == ["down.weight"]
    assert report["fp32_linears"] == [{"weight": "up.weight", "in_features": 96}]
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        expected, got = model(ids), graph_module(ids)
    assert not torch.equal(expected, got)  # the INT4 weights really are in use …
    assert torch.nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0) > 0.99  # … and close


def test_embeddings_become_int8_embedding_byte():
    model, graph_module = exported_module()
    assert quantize_embeddings_int8(graph_module) == ["embed.weight"]
    targets = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.embedding_byte.default" in targets
    assert "aten.embedding.default" not in targets
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(graph_module(ids), model(ids), atol=0.05, rtol=0.05)


class Bf16Table(nn.Module):
    """A bf16 table read in FP32, as the export keeps Gemma 4's embedding tables."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, 32).to(torch.bfloat16), requires_grad=False)

    def forward(self, ids):
        return nn.functional.embedding(ids, self.table).to(torch.float32) * 2.0


def test_bf16_table_becomes_int8_and_loses_its_dtype_check_and_upcast():
    torch.manual_seed(0)
    model = Bf16Table().eval()
    graph_module = torch.export.export(model, (torch.tensor([[1, 2, 3]]),)).module()
    assert quantize_embeddings_int8(graph_module) == ["table"]
    targets = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"}
    assert "aten._assert_tensor_metadata.default" not in targets and "aten.to.dtype" not in targets
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        got = graph_module(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, model(ids), atol=0.05, rtol=0.05)


class TiedBf16Head(nn.Module):
    """A bf16 token table that is also the output head, upcast in the graph (as the export ties
    Gemma 4's lm_head to its token table)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(256, 64).to(torch.bfloat16), requires_grad=False)

    def forward(self, ids):
        hidden = nn.functional.embedding(ids, self.table).to(torch.float32)
        return nn.functional.linear(hidden, self.table.to(torch.float32))


def test_tied_bf16_head_becomes_int8_lookup_and_int4_linear_and_the_table_goes():
    torch.manual_seed(0)
    model = TiedBf16Head().eval()
    graph_module = torch.export.export(model, (torch.tensor([[1, 2, 3]]),)).module()
    assert linear_widths(graph_module) == {"table": 64}
    quantize_embeddings_int8(graph_module)
    report = quantize_linears(graph_module, 32)
    assert report["quantized_linears"] == ["table"]
    drop_unreferenced_attributes(graph_module)
    assert not hasattr(graph_module, "table")  # neither the bf16 table nor its upcast ride along
    assert not any(t.dtype == torch.bfloat16 for t in graph_module.state_dict().values())
    targets = [str(n.target) for n in graph_module.graph.nodes if n.op == "call_function"]
    assert "aten._assert_tensor_metadata.default" not in targets and "aten.to.dtype" not in targets
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        got, want = graph_module(ids), model(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_int8_rows_are_the_same_whatever_the_chunk_size():
    """Chunking bounds the temporaries; it must not change a single value or scale."""
    from gemma_edge.build.quantize import int8_per_row

    weight = torch.randn(1000, 48, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 1000)[:, None]
    whole_table, whole_scales = int8_per_row(weight, rows_per_chunk=1000)
    table, scales = int8_per_row(weight, rows_per_chunk=7)
    assert torch.equal(table, whole_table) and torch.equal(scales, whole_scales)
    assert table.dtype == torch.int8 and int(table.abs().max()) == 127
    restored = table.to(torch.float32) * scales[:, None]
    assert torch.allclose(restored, weight, atol=float(scales.max()) / 2 + 1e-6)


def test_saved_program_is_checked_tensor_by_tensor_after_reloading(tmp_path):
    """write_program + check_reloaded: a reload must reproduce the graph and every tensor, INT4
    torchao tensors included; a file holding a different weight is refused."""
    from gemma_edge.build.export import check_reloaded, write_program
    from gemma_edge.device.files import ArtifactError

    _, graph_module = exported_module()
    quantize_linears(graph_module, 64)
    ids = (torch.tensor([[1, 2, 3]]),)
    program = torch.export.export(graph_module, ids)
    fingerprint = write_program(program, tmp_path / "program.pt2")
    check_reloaded(tmp_path / "program.pt2", fingerprint)

    with torch.no_grad():
        graph_module.up.weight.add_(1.0)  # an FP32 weight changed, same shapes and graph
    write_program(torch.export.export(graph_module, ids), tmp_path / "other.pt2")
    with pytest.raises(ArtifactError, match="tensor up.weight differs after reloading"):
        check_reloaded(tmp_path / "other.pt2", fingerprint)
