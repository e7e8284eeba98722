"""The lower step's choices that need no model build to check."""

import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gemma_edge.build.export import export_decoder
from gemma_edge.build.lower import DECODE_METHOD_ABOVE_CONTEXT, as_masked_ring_calls, decode_program, wants_decode_method
from gemma_edge.model.checkpoint import load_text_model


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


class _MaskedCallSlots(TorchDispatchMode):
    """The slots (keys, mask columns) of each masked `llama::custom_sdpa` call run under it."""

    def __init__(self):
        super().__init__()
        self.slots = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == torch.ops.llama.custom_sdpa.default and args[4] is not None:
            self.slots.append((args[1].shape[1], args[2].shape[1], args[4].shape[-1]))
        return func(*args, **(kwargs or {}))


def test_program_for_several_tokens_reads_its_rings_masked_with_the_same_logits(demo_checkpoint):
    """`as_masked_ring_calls` leaves no op the runtime lacks and changes no result: a 40-token prompt
    in calls of 5, 16, 16 and 3 tokens, past the window and the ring's wrap, before and after the
    edit. Each masked call reads only the ring's written slots: the first p + 1 for a call ending at
    position p until the 32-slot ring wraps, then all of them, taken once per ring."""
    program = _exported_decoder(demo_checkpoint, 96)
    tokens = torch.tensor([[2] + list(range(40, 79))])
    bounds = [(0, 5), (5, 21), (21, 37), (37, 40)]
    calls = [(tokens[:, start:end], torch.arange(start, end)) for start, end in bounds]
    with torch.no_grad():
        module = program.module()
        before = [module(*call) for call in calls]
        # One read of each ring's written slots per call (a copy in the runtime), shared by the
        # layers that reuse its keys and values: the demo's 4 sliding layers read 2 rings.
        ring_reads = {
            node.args[1] for node in program.graph.nodes if node.target == torch.ops.gemma_edge.sliding_attention.default
        }
        assert len(ring_reads) == sum("cache_ring_keys" in name for name in program.graph_signature.buffers) == 2
        attention = _targets(program).count(torch.ops.gemma_edge.sliding_attention.default)
        attention += _targets(program).count(torch.ops.llama.custom_sdpa.default)
        edited = as_masked_ring_calls(program)
        assert torch.ops.gemma_edge.sliding_attention.default not in _targets(edited)
        assert _targets(edited).count(torch.ops.llama.custom_sdpa.default) == attention == 6  # one per layer
        module = edited.module()
        for (start, end), call, logits in zip(bounds, calls, before):
            with _MaskedCallSlots() as masked:
                assert torch.equal(module(*call), logits)
            filled = min(end, 32)
            assert masked.slots == [(filled, filled, filled)] * 4, (start, end)  # the demo's 4 sliding layers


def test_lowering_logs_each_xnnpack_delegate_of_how_many_and_leaves_executorch_as_it_was(caplog):
    """The progress lines a long lowering shows (build/delegate_progress.py), on a real XNNPACK
    lowering of two methods: one line per delegate, numbered of the total both methods tagged,
    and ExecuTorch's XnnpackBackend.preprocess restored afterwards."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    from gemma_edge.build.lower import delegation_summary, lower_to_xnnpack

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    programs = {name: torch.export.export(Mlp().eval(), (torch.randn(2, 8),)) for name in ("forward", "other")}
    preprocess = XnnpackBackend.__dict__["preprocess"]
    with caplog.at_level(logging.INFO, logger="gemma_edge.build.delegate_progress"):
        manager = lower_to_xnnpack(programs, per_op_mode=True, metadata={})
    delegates = sum(delegation_summary(manager, method)["xnnpack_delegate_calls"] for method in programs)
    assert delegates >= 4  # per-op: each method's linears at least
    lines = [record.getMessage() for record in caplog.records if "XNNPACK delegate" in record.getMessage()]
    assert [line.split(" (")[0] for line in lines] == [f"XNNPACK delegate {n} of {delegates}" for n in range(1, delegates + 1)]
    assert XnnpackBackend.__dict__["preprocess"] is preprocess
