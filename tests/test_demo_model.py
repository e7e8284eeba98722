"""What the demo model trains on, checked without training it."""

from pathlib import Path

import torch
import yaml

from gemma_edge.model.demo_model import (
    BOS_ID,
    DEMO_VOCAB,
    TRAIN_LINES_EVERY,
    build_tokenizer,
    line_start_tokens,
    training_batches,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = (REPO / "resources/demo_corpus.txt").read_text(encoding="utf-8")


def test_verify_prompts_open_lines_the_demo_model_trains_on_and_one_it_never_saw():
    """config.yaml says so of its default prompts; the demo trains on every TRAIN_LINES_EVERY-th line only."""
    *seen, unseen = yaml.safe_load((REPO / "config.yaml").read_text())["verify"]["prompts"]
    lines = CORPUS.splitlines()
    for prompt in seen:
        trained = [i for i, line in enumerate(lines) if line.startswith(prompt) and i % TRAIN_LINES_EVERY == 0]
        assert trained, f"{prompt!r} opens no line the demo model trains on"
    assert unseen not in CORPUS


def test_training_windows_open_with_bos_then_a_line_and_repeat_with_the_seed():
    tokenizer = build_tokenizer(CORPUS, DEMO_VOCAB)
    encoding = tokenizer.encode(CORPUS, add_special_tokens=False)
    starts = line_start_tokens(encoding, CORPUS)
    assert len(starts) == len(CORPUS.splitlines())
    firsts = {encoding.ids[s] for s in starts}
    batches = list(training_batches(encoding.ids, 64, 4, 3, seed=0, line_starts=starts))
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, 64)
        assert (inputs[:, 0] == BOS_ID).all() and set(inputs[:, 1].tolist()) <= firsts
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    again = list(training_batches(encoding.ids, 64, 4, 3, seed=0, line_starts=starts))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
