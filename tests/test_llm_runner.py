"""Our .pte and tokenizer under ExecuTorch's own C++ LLM runner (TextLLMRunner), on the workflow's
demo artifacts: same prompt ids, same greedy tokens as our loop, and the runner's own figures."""

from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG
from gemma_edge.device import llm_runner, runner_bench, timing
from gemma_edge.device.files import read_json
from gemma_edge.device.runtime import PteDecoder, greedy_decode

VARIANTS = {"int4": "results/tiny/int4-g128/xnnpack-auto", "fp32": "results/tiny/fp32/xnnpack-auto"}
PROMPTS = DEFAULT_CONFIG["verify"]["prompts"]
MAX_NEW_TOKENS = DEFAULT_CONFIG["verify"]["max_new_tokens"]


needs_binding = pytest.mark.skipif(llm_runner.binding_missing() is not None, reason=llm_runner.binding_missing() or "")


def tokenizer_of(workdir: Path) -> Path:
    return workdir / read_json(workdir / "results/tiny/checkpoint.json")["path"] / "tokenizer.json"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, workflow):
    """One .pte generated from with the runner and with our loop, and its parity record."""
    workdir = workflow["workdir"]
    folder = workdir / VARIANTS[request.param]
    pte = folder / "model.pte"
    decoder = PteDecoder(pte)
    eos = decoder.metadata["get_eos_ids"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    parity = read_json(folder / "parity.json")
    return {
        "name": request.param,
        "runner": llm_runner.generate_with_runner(pte, tokenizer_of(workdir), PROMPTS, MAX_NEW_TOKENS, threads=2),
        "runner_as_shipped": llm_runner.generate_with_runner(
            pte, tokenizer_of(workdir), PROMPTS, MAX_NEW_TOKENS, threads=2, exact_ids=False
        ),
        "ours": [greedy_decode(decoder.step, p["prompt_ids"], MAX_NEW_TOKENS, eos_ids) for p in parity["prompts"]],
        "parity": parity,
    }


@needs_binding
def test_runner_tokenises_each_prompt_to_our_prompt_ids(variant):
    for result, recorded in zip(variant["runner"], variant["parity"]["prompts"], strict=True):
        assert result["prompt_ids"] == recorded["prompt_ids"], result["prompt"]
        assert result["prompt_ids_count_matches"], result["prompt"]


@needs_binding
def test_runner_greedy_tokens_equal_our_loop(variant):
    for result, ours in zip(variant["runner"], variant["ours"], strict=True):
        assert None not in result["tokens"], f"{result['prompt']!r}: pieces that map to no single id: {result['pieces']}"
        assert result["tokens"] == ours, result["prompt"]


@needs_binding
def test_runner_with_the_tokenizer_as_shipped_prints_the_same_text(variant, workflow):
    """With tokenizer.json as users ship it (its decoder kept), the runner prints the text of exactly
    our tokens. Its pieces identify the ids only where one id decodes to them: with Gemma's byte
    fallback `<0x2E>` and `.` both print ".", so such pieces stay None, and each of those is a piece
    that several ids (the exact one among them) decode to."""
    from tokenizers import Tokenizer

    tokenizer_path = tokenizer_of(workflow["workdir"])
    decoder = Tokenizer.from_file(str(tokenizer_path))
    table = llm_runner.piece_table(llm_runner.open_tokenizer(tokenizer_path))
    for shipped, exact in zip(variant["runner_as_shipped"], variant["runner"], strict=True):
        assert shipped["prompt_ids"] == exact["prompt_ids"]
        assert "".join(shipped["pieces"]) == decoder.decode(exact["tokens"]), shipped["prompt"]
        for piece, recovered, token in zip(shipped["pieces"], shipped["tokens"], exact["tokens"], strict=True):
            assert recovered == token if recovered is not None else (len(table[piece]) > 1 and token in table[piece])
    ambiguous = sum(t is None for r in variant["runner_as_shipped"] for t in r["tokens"])
    assert ambiguous > 0  # the byte-fallback vocabulary makes some pieces ambiguous: why exact_ids is the default


@needs_binding
def test_runner_stats_are_positive_and_count_what_it_generated(variant):
    """The runner's clock counts whole milliseconds: a demo prefill can take "0 ms" (seen on the
    local target), and then its rate is None, not infinite."""
    for result in variant["runner"]:
        stats = result["stats"]
        for name in ("decode_tps", "load_s", "construct_s"):
            assert isinstance(stats[name], float) and stats[name] > 0, (result["prompt"], name, stats)
        assert stats["ttft_s"] >= 0 and (stats["prefill_tps"] is None) == (stats["ttft_s"] == 0)
        assert stats["prefill_tps"] is None or stats["prefill_tps"] > 0
        assert stats["prompt_tokens"] == len(result["prompt_ids"])
        assert stats["generated_tokens"] == len(result["tokens"]) - 1  # the decode calls after prefill


def test_pieces_map_back_to_ids_only_when_unambiguous():
    table = {"a": [5], "": [0, 1]}
    assert llm_runner.ids_from_pieces(["a", "", "zz"], table) == [5, None, None]


class FakeTokenizer:
    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def bos_tok(self) -> int:
        return 2

    def encode(self, text: str, bos: int, eos: int) -> list[int]:
        return [2] * (bos + self.adds_bos) + [7]


def test_bos_is_asked_for_only_when_the_tokenizer_does_not_add_it():
    assert llm_runner.bos_to_add(FakeTokenizer(adds_bos=False), "x") == 1
    assert llm_runner.bos_to_add(FakeTokenizer(adds_bos=True), "x") == 0


def bench_spec_for(workdir: Path, parity: dict, **changes) -> dict:
    """The part of the device benchmark's spec (remote_bench.bench_spec) the runner's block reads."""
    return {
        "tokenizer": str(tokenizer_of(workdir)),
        "parity_prompts": [p["prompt"] for p in parity["prompts"]],
        "parity_prompt_ids": [p["prompt_ids"] for p in parity["prompts"]],
        "max_new_tokens": MAX_NEW_TOKENS,
        "threads": 2,
        "peer_timeout_s": 600,
        **changes,
    }


@needs_binding
def test_the_bench_runs_the_runner_in_a_process_of_its_own_and_compares_it_with_its_loop(workflow):
    folder = workflow["workdir"] / VARIANTS["int4"]
    parity = read_json(folder / "parity.json")
    loop = [p["pte_tokens"] for p in parity["prompts"]]
    eos = timing.eos_id_set(PteDecoder(folder / "model.pte").metadata)
    block = runner_bench.bench_llm_runner(folder / "model.pte", bench_spec_for(workflow["workdir"], parity), loop, eos)
    assert block["available"], block.get("reason")
    assert block["tokens"] == [timing.until_eos(t, eos) for t in loop] and block["tokens_equal_loop"]
    assert block["prompt_ids_equal_loop"] and block["loop_same_prompts"]["tokens_equal_runner"]
    assert block["stats"]["decode_tps"]["avg"] > 0 and block["loop_same_prompts"]["decode_tps"]["avg"] > 0
    assert set(block["load"]) == {"before", "after", "busy"}


@needs_binding
def test_a_runner_that_cannot_run_is_reported_with_its_reason_not_raised(workflow, tmp_path):
    folder = workflow["workdir"] / VARIANTS["int4"]
    parity = read_json(folder / "parity.json")
    loop = [p["pte_tokens"] for p in parity["prompts"]]
    missing = bench_spec_for(workflow["workdir"], parity, tokenizer=str(tmp_path / "missing.json"))
    block = runner_bench.bench_llm_runner(folder / "model.pte", missing, loop, {1})
    assert not block["available"] and block["reason"].startswith("the runner exited with status 1: ")
    assert "missing.json" in block["reason"]
    no_texts = bench_spec_for(workflow["workdir"], parity, parity_prompts=None)
    assert runner_bench.bench_llm_runner(folder / "model.pte", no_texts, loop, {1})["reason"] == (
        "the host sent no tokenizer or no prompt texts for the runner"
    )


def test_the_loop_is_compared_up_to_the_first_eos_where_the_runner_stops():
    assert timing.until_eos([5, 1, 7, 1], {1, 106}) == [5, 1]
    assert timing.until_eos([5, 6], {1}) == [5, 6]
