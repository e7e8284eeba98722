"""The lower step's choices that need no lowering to check."""
import torch

from gemma_edge.checkpoint import load_text_model
from gemma_edge.export import export_decoder
from gemma_edge.lower import DECODE_METHOD_ABOVE_CONTEXT, as_masked_ring_calls, decode_program, wants_decode_method


def test_auto_adds_the_one_token_method_only_above_its_context_threshold():
    assert not wants_decode_method("auto", 128)
    assert not wants_decode_method("auto", DECODE_METHOD_ABOVE_CONTEXT)
    assert wants_decode_method("auto", DECODE_METHOD_ABOVE_CONTEXT + 1)
    assert wants_decode_method("auto", 4096)


def test_true_and_false_force_the_one_token_method_at_any_context():
    assert wants_decode_method(True, 128) and wants_decode_method(True, 4096)
    assert not wants_decode_method(False, 128) and not wants_decode_method(False, 4096)


def _exported_decoder(checkpoint, max_seq_len: int) -> torch.export.ExportedProgram:
    return export_decoder(load_text_model(checkpoint), max_seq_len, xnnpack_norms=False)


def _targets(program: torch.export.ExportedProgram) -> list:
    return [node.target for node in program.graph.nodes if node.op == "call_function"]


def test_one_token_method_reads_the_window_before_during_and_after_the_wrap(demo_checkpoint):
    """The one-token method's program (`decode_program`), run in torch one position at a time from
    the first, against transformers recomputing the whole sequence. Its sliding layers read only the
    filled slots of their 16-slot window, unmasked: filling (positions 0-15), then full and wrapped
    three times (to 63)."""
    program = _exported_decoder(demo_checkpoint, 96)
    one_token = decode_program(program)
    assert torch.ops.gemma_edge.sliding_attention.default not in _targets(one_token)
    step = one_token.module()
    reference = load_text_model(demo_checkpoint)
    sequence = torch.tensor([[2]])
    with torch.no_grad():
        for position in range(64):
            logits = step(sequence[:, -1:], torch.tensor([position]))
            expected = reference(input_ids=sequence).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)


def test_program_for_several_tokens_reads_its_rings_masked_with_the_same_logits(demo_checkpoint):
    """`as_masked_ring_calls` leaves no op the runtime lacks and changes no result: a 40-token prompt
    in calls of 16, past the window and the ring's wrap, before and after the edit."""
    program = _exported_decoder(demo_checkpoint, 96)
    tokens = torch.tensor([[2] + list(range(40, 79))])
    calls = [(tokens[:, start:start + 16], torch.arange(start, min(start + 16, 40))) for start in range(0, 40, 16)]
    with torch.no_grad():
        module = program.module()
        before = [module(*call) for call in calls]
        attention = _targets(program).count(torch.ops.gemma_edge.sliding_attention.default)
        attention += _targets(program).count(torch.ops.llama.custom_sdpa.default)
        edited = as_masked_ring_calls(program)
        assert torch.ops.gemma_edge.sliding_attention.default not in _targets(edited)
        assert _targets(edited).count(torch.ops.llama.custom_sdpa.default) == attention == 6  # one per layer
        module = edited.module()
        for call, logits in zip(calls, before):
            assert torch.equal(module(*call), logits)
