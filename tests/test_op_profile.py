"""Where a decoded token's time goes inside the workflow's demo .pte, from ExecuTorch's own event
tracer: the split must account for the delegate calls and operators the lowering recorded."""

import pytest

from gemma_edge.device.files import read_json
from gemma_edge.device.runtime import DECODE_METHOD
from gemma_edge.measure import op_profile

PTE = "results/tiny/int4-g128/xnnpack-auto/model.pte"


@pytest.fixture(scope="module")
def profile(workflow):
    return op_profile.profile_decode(workflow["workdir"] / PTE, prompt_len=8, new_tokens=6, threads=1)


def test_every_delegate_call_of_the_program_is_traced_once_per_token(profile, workflow):
    """The decode method is profiled (the .pte has one, and it is what decodes), against its own
    lowering record."""
    assert profile["method"] == DECODE_METHOD
    lowering = read_json(workflow["workdir"] / (PTE + ".manifest.json"))["lowering"][DECODE_METHOD]
    assert profile["delegate_calls"] == lowering["xnnpack_delegate_calls"]
    # every portable kernel traced is one the lowering left outside XNNPACK (names: aten.cat.out ->
    # cat.out; an in-place op, aten.copy_.default (the ring's slot record written back) -> copy_)
    left_out = {name.split(".", 1)[1].removesuffix(".default") for name in lowering["portable_ops"]}
    assert set(profile["portable_ms"]) <= left_out
    assert profile["operator_calls"] >= sum(lowering["portable_ops"].values()) - lowering["portable_ops"].get(
        "aten.sym_size.int", 0
    )


def test_the_parts_add_up_to_the_spans_that_hold_them(profile):
    assert profile["delegate_ms"] > 0 and profile["operator_ms"] > 0
    assert sum(profile["xnnpack_ms"].values()) + profile["delegate_overhead_ms"] == pytest.approx(profile["delegate_ms"])
    assert sum(profile["portable_ms"].values()) + profile["custom_ms"] == pytest.approx(profile["operator_ms"], abs=1e-6)
    # INT4 linears run inside XNNPACK; the cache update and attention outside it, as custom ops
    assert any("QB4W" in name for name in profile["xnnpack_ms"])
    assert profile["custom_ms"] > 0
    assert profile["traced_ms_per_token"] > 0


def test_the_table_names_each_part(profile):
    table = op_profile.render(profile)
    assert "XNNPACK delegate calls" in table and "LLM custom ops" in table
    assert next(iter(profile["xnnpack_ms"])) in table
    assert f"llama.custom_sdpa.out ({profile['custom_ops']['llama.custom_sdpa.out']['calls']} calls)" in table


def test_the_custom_ops_are_named_by_their_instructions_once_per_call_of_the_program(profile, workflow):
    """The attention and cache updates, which the tracer times only as operator calls, are named from
    the .pte's own instructions: as many calls per token as the lowering left in the decode method."""
    lowering = read_json(workflow["workdir"] / (PTE + ".manifest.json"))["lowering"][DECODE_METHOD]["portable_ops"]
    llm_ops = {name: count for name, count in lowering.items() if name.startswith("llama.")}
    assert {"llama.custom_sdpa.out", "llama.update_cache_with_indices.out"} <= set(llm_ops)  # rings: demo window 16
    assert {name: profile["custom_ops"][name]["calls"] for name in llm_ops} == llm_ops
    assert "unnamed operator" not in profile["custom_ops"]
    assert all(entry["ms"] > 0 for entry in profile["custom_ops"].values())
    assert sum(entry["ms"] for entry in profile["custom_ops"].values()) <= profile["operator_ms"] + 1e-9


def test_a_prefill_call_is_profiled_against_forwards_lowering_record(workflow):
    """--prefill: the prompt's one forward call, every delegate call of forward traced once per
    call, the INT4 linears and the attention inside it."""
    pte = workflow["workdir"] / PTE
    profile = op_profile.profile_prefill(pte, prompt_len=8, threads=1, calls=2)
    lowering = read_json(workflow["workdir"] / (PTE + ".manifest.json"))["lowering"]
    assert profile["calls"] == 2 and profile["delegate_calls"] == lowering["xnnpack_delegate_calls"]
    assert any("QB4W" in name for name in profile["xnnpack_ms"]) and profile["custom_ops"]["llama.custom_sdpa.out"]["ms"] > 0
    assert sum(profile["xnnpack_ms"].values()) + profile["delegate_overhead_ms"] == pytest.approx(profile["delegate_ms"])
    assert "per prefill call:" in op_profile.render(profile) and "ms/prefill call" in op_profile.render(profile)
    with pytest.raises(ValueError, match="takes more than one call"):
        op_profile.profile_prefill(pte, prompt_len=10_000, threads=1)


def test_a_trace_with_a_missing_run_is_refused():
    with pytest.raises(ValueError, match="ran 2 times"):
        op_profile.decode_share([1.0, 2.0], runs=3, decoded=1)


def test_operator_instances_are_grouped_by_kind():
    assert op_profile.op_kind("Add (ND) #12") == "Add (ND)"
    assert op_profile.op_kind("native_call_cat.out") == "cat.out"
