"""The quality step: perplexity and KL divergence of the real .pte against eager FP32 on the demo's
held-out text, the held-out text itself, and the gates and the synthetic-model refusal. (llama.cpp's
GGUFs are scored in the sweep, tests/test_sweep.py, which builds them anyway.)"""

import math
import re

import pytest
import torch

from conftest import QUALITY_TOKENS, REPO, snakemake
from gemma_edge.device.files import read_json, sha256_file
from gemma_edge.measure.quality import (
    Gates,
    compare_tokenizations,
    eager_logits,
    gate_failures,
    scored_positions,
    summarise,
    text_chunks,
    text_ids,
    token_scores,
)
from gemma_edge.model.checkpoint import load_checkpoint
from gemma_edge.model.demo_model import TRAIN_LINES_EVERY
from gemma_edge.steps import measure

HELDOUT = REPO / "resources/quality/demo_heldout.txt"
CORPUS = REPO / "resources/demo_corpus.txt"
INT4 = "results/tiny/int4-g128/xnnpack-auto"
FP32 = "results/tiny/fp32/xnnpack-auto"


def word_runs(lines, n):
    return {tuple(words[i : i + n]) for line in lines for words in [line.split()] for i in range(len(words) - n + 1)}


def test_the_demo_held_out_text_is_not_in_what_the_demo_model_trains_on():
    corpus = CORPUS.read_text(encoding="utf-8").splitlines()
    heldout = HELDOUT.read_text(encoding="utf-8").splitlines()
    trained = corpus[::TRAIN_LINES_EVERY]
    assert len(heldout) > 100 and not set(heldout) & set(corpus)
    # Training windows run on from a trained line into the next ones: nothing of the whole corpus,
    # not only its trained lines, may reappear, down to six words in a row.
    assert word_runs(heldout, 6) and not word_runs(heldout, 6) & word_runs(corpus, 6)
    assert not word_runs(heldout, 6) & word_runs(trained, 6)
    # The same kind of text: docstring paragraphs, one a line, as long as the corpus's.
    assert min(map(len, heldout)) >= 40 and sum(map(len, heldout)) / len(heldout) > 80


def test_chunks_open_with_bos_hold_the_context_and_drop_a_partial_last_one():
    ids = list(range(10, 10 + 300))
    chunks = text_chunks(ids, 2, 128, 10_000)
    assert [len(c) for c in chunks] == [128, 128] and all(c[0] == 2 for c in chunks)
    assert chunks[0][1:] + chunks[1][1:] == ids[:254]  # consecutive text, the last 46 tokens left out
    assert len(text_chunks(ids, 2, 128, 200)) == 1  # max_tokens caps the text read
    with pytest.raises(ValueError, match="fewer than one chunk of the exported context"):
        text_chunks(ids[:100], 2, 128, 10_000)
    assert scored_positions(128, "all") == range(0, 127)
    assert scored_positions(128, "second_half") == range(64, 127)


def test_kl_perplexity_and_top1_follow_their_definitions():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(5, 11, generator=generator) * 3
    candidate = reference + 0.5 * torch.randn(5, 11, generator=generator)
    targets = torch.tensor([0, 3, 7, 10, 2])
    scores = token_scores(reference, candidate, targets)
    p, q = torch.softmax(reference.double(), -1), torch.softmax(candidate.double(), -1)
    assert torch.allclose(scores["kl"], (p * (p / q).log()).sum(-1))
    assert torch.allclose(scores["nll"], -q[range(5), targets].log())
    assert scores["top1_same"].tolist() == (p.argmax(-1) == q.argmax(-1)).tolist()
    summary = summarise(scores)
    assert summary["perplexity"] == pytest.approx(math.exp(float(-q[range(5), targets].log().mean())))
    assert summary["ppl_ratio"] == pytest.approx(summary["perplexity"] / summary["fp32_perplexity"])
    assert summary["kl"]["median"] == pytest.approx(float(scores["kl"].median()))
    assert summary["kl"]["max"] >= summary["kl"]["p99"] >= summary["kl"]["median"] > 0
    same = summarise(token_scores(reference, reference, targets))
    assert same["kl"]["max"] == pytest.approx(0, abs=1e-12) and same["top1_agreement"] == 1 and same["ppl_ratio"] == 1


def test_gates_are_checked_only_when_set():
    summary = {"kl": {"mean": 0.2}, "ppl_ratio": 1.05, "top1_agreement": 0.8}
    assert gate_failures(summary, Gates()) == []
    assert gate_failures(summary, Gates(max_mean_kl=0.1, max_ppl_ratio=1.1, min_top1_agreement=0.9)) == [
        "mean KL divergence 0.2 > 0.1",
        "top-1 agreement 0.8000 < 0.9",
    ]


def test_a_tokenizer_difference_is_located_as_pieces():
    pieces = {1: "▁a", 2: ".\n", 3: ".", 4: "\n"}.get
    assert compare_tokenizations([1, 2], [1, 2], pieces)["identical"]
    differs = compare_tokenizations([1, 2, 1], [1, 3, 4, 1], pieces)
    assert differs == {
        "identical": False,
        "ours": 3,
        "theirs": 4,
        "first_difference": 1,
        "ours_from_there": [".\n", "▁a"],
        "theirs_from_there": [".", "\n", "▁a"],
    }


@pytest.fixture(scope="module")
def scored(workflow, tmp_path_factory):
    """The quality step on the shared INT4 .pte (the test config scores the demo's held-out text,
    8 chunks), and its function on the shared FP32 .pte with the same settings (one process start
    less: most of a demo step's time is importing torch)."""
    workdir = workflow["workdir"]
    snakemake(workdir, "--cores", "2", f"{INT4}/quality.json", "--configfile", str(workflow["config"]))
    out = tmp_path_factory.mktemp("fp32-quality")
    fp32 = measure.quality(
        "pte",
        workdir / FP32 / "model.pte",
        workdir / "results/tiny/checkpoint.json",
        HELDOUT,
        "resources/quality/demo_heldout.txt",
        {"max_tokens": QUALITY_TOKENS, "scored_positions": "all"},
        {},
        False,
        2,
        out / "quality.json",
        out / "quality.json.manifest.json",
    )
    return {"workdir": workdir, "int4": read_json(workdir / INT4 / "quality.json"), "fp32": fp32}


def test_fp32_pte_scores_like_eager_fp32_and_int4_pays_for_its_bits(scored):
    int4, fp32 = scored["int4"]["summary"], scored["fp32"]["summary"]
    # The FP32 .pte computes what eager FP32 does, up to XNNPACK's summation order.
    assert fp32["kl"]["max"] < 1e-3 and fp32["top1_agreement"] > 0.99
    assert fp32["ppl_ratio"] == pytest.approx(1, abs=1e-3)
    # INT4 weights and INT8 activations move the distributions by orders of magnitude more.
    assert int4["kl"]["mean"] > 100 * fp32["kl"]["mean"] and int4["top1_agreement"] < fp32["top1_agreement"]
    assert int4["kl"]["p99"] > int4["kl"]["median"] > 0
    # Same text, same ids, same reference.
    assert scored["int4"]["tokens"]["ids_sha256"] == scored["fp32"]["tokens"]["ids_sha256"]
    assert int4["fp32_perplexity"] == fp32["fp32_perplexity"]
    assert int4["tokens"] == fp32["tokens"] == QUALITY_TOKENS
    assert scored["int4"]["variant"] == "int4-g128 fused" and scored["int4"]["meaningful"]
    assert (
        scored["int4"]["chunks"]
        == {"count": 8, "context": 128, "scored_positions": "all", "why": scored["int4"]["chunks"]["why"]}
        and "BOS" in scored["int4"]["chunks"]["why"]
    )


def test_fp32_perplexity_is_what_transformers_own_loss_gives(scored, workflow):
    """Independent of our KL code: the mean of transformers' cross-entropy loss over the same
    chunks (each chunk's mean over the same 127 positions, all chunks equally long)."""
    model, manifest = load_checkpoint(workflow["workdir"] / "results/tiny/checkpoint.json")
    ids = text_ids(workflow["workdir"] / manifest["path"] / "tokenizer.json", HELDOUT.read_text(encoding="utf-8"))
    chunks = text_chunks(ids, 2, 128, QUALITY_TOKENS)
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([c]), labels=torch.tensor([c])).loss) for c in chunks]
    assert scored["int4"]["summary"]["fp32_perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)
    assert eager_logits(model, chunks[0]).shape == (127, 768)


def test_the_quality_step_leaves_a_manifest_log_and_benchmark(scored):
    workdir = scored["workdir"]
    manifest = read_json(workdir / INT4 / "quality.json.manifest.json")
    assert manifest["sha256"] == sha256_file(workdir / INT4 / "quality.json")
    assert manifest["inputs"]["artifact"]["sha256"] == sha256_file(workdir / INT4 / "model.pte")
    assert manifest["text_sha256"] == sha256_file(HELDOUT)
    assert manifest["params"]["settings"] == {"max_tokens": QUALITY_TOKENS, "scored_positions": "all"}
    assert scored["int4"]["artifact"]["sha256"] == manifest["inputs"]["artifact"]["sha256"]
    assert scored["int4"]["text"]["configured"] == "resources/quality/demo_heldout.txt"
    log = (workdir / "logs/tiny/int4-g128/xnnpack-auto/quality.log").read_text()
    assert re.search(r"int4-g128 fused: 1016 tokens, perplexity [\d.]+ \(FP32 [\d.]+, ratio", log)
    assert (workdir / "benchmarks/tiny/int4-g128/xnnpack-auto/quality.tsv").exists()


def test_a_missed_gate_fails_with_one_sentence_and_keeps_the_result_aside(workflow, tmp_path):
    workdir = workflow["workdir"]
    settings = {"max_tokens": 254, "scored_positions": "second_half"}
    with pytest.raises(
        RuntimeError,
        match=r"quality gates missed by int4-g128 fused: mean KL divergence [\d.e-]+ > 1e-06 "
        r"\(details in .*quality.rejected.json\)",
    ):
        measure.quality(
            "pte",
            workdir / INT4 / "model.pte",
            workdir / "results/tiny/checkpoint.json",
            HELDOUT,
            "held-out",
            settings,
            {"max_mean_kl": 1e-6},
            False,
            2,
            tmp_path / "quality.json",
            tmp_path / "quality.json.manifest.json",
        )
    rejected = read_json(tmp_path / "quality.rejected.json")
    assert not (tmp_path / "quality.json").exists()
    assert rejected["failures"] and rejected["summary"]["tokens"] == 2 * 63  # positions 64..126 of 2 chunks


def test_a_randomly_initialised_model_is_not_scored_and_says_why(workflow, tmp_path):
    workdir = workflow["workdir"]
    result = measure.quality(
        "pte",
        workdir / INT4 / "model.pte",
        workdir / "results/tiny/checkpoint.json",
        HELDOUT,
        "held-out",
        {"max_tokens": 254, "scored_positions": "all"},
        {},
        True,
        2,
        tmp_path / "quality.json",
        tmp_path / "quality.json.manifest.json",
    )
    assert result["meaningful"] is False and "summary" not in result
    assert "randomly initialised" in result["reason"] and "say nothing" in result["reason"]
    assert read_json(tmp_path / "quality.json") == result
