"""The lower step's choices that need no lowering to check."""
from gemma_edge.lower import DECODE_METHOD_ABOVE_CONTEXT, wants_decode_method


def test_auto_adds_the_one_token_method_only_above_its_context_threshold():
    assert not wants_decode_method("auto", 128)
    assert not wants_decode_method("auto", DECODE_METHOD_ABOVE_CONTEXT)
    assert wants_decode_method("auto", DECODE_METHOD_ABOVE_CONTEXT + 1)
    assert wants_decode_method("auto", 4096)


def test_true_and_false_force_the_one_token_method_at_any_context():
    assert wants_decode_method(True, 128) and wants_decode_method(True, 4096)
    assert not wants_decode_method(False, 128) and not wants_decode_method(False, 4096)
