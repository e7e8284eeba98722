"""A tiny Gemma 4 built locally and deterministically, so the whole workflow runs with no network.

The architecture features that make Gemma 4 hard to export are all switched on (sliding and full
attention layers, per-layer input embeddings, shared KV layers, final logit softcapping), at widths
small enough to train in about half a minute on one core. Training matters: a randomly initialised
model has near-flat logits on which INT4 noise flips most greedy tokens, so parity on it would say
nothing. The trained model has real margins between its top tokens.

It learns a quarter of the corpus rather than all of it: every TRAIN_LINES_EVERY-th line (95 of
378, 6,108 of 24,595 tokens), in windows that open with BOS at the start of a line, as a prompt
does. In 120 steps that gives the verify prompts' continuations larger top-2 margins, and an eager
8da4w copy that agrees with them more often, than 800 steps of windows at random offsets in the
whole corpus gave (the numbers, and the script that measured both, are in the commit that made
the change). The tokenizer still learns the whole corpus, so token counts do not depend on this;
the lines in between are text the model has not seen.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's own vocabulary
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


# The demo model trains on every 4th line of the corpus from the first: lines 1, 5, 9, …, which
# include the four the default verify prompts open (41, 81, 121, 241; tests/test_demo_model.py).
TRAIN_LINES_EVERY = 4

# Two sliding layers then a full one, twice; the last three layers reuse the KV of the last unshared
# layer of their type (1 and 2). The unshared ones end sliding, full, as E2B's do (layers 13 and 14),
# which llama.cpp relies on when it maps shared layers to their donors (llama-model.cpp).
DEMO_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
DEMO_KV_SHARED_LAYERS = 3
# A window a quarter of the default max_seq_len (128): every verify prompt longer than 32 tokens, and
# every generation past it, runs through the ring buffers (E2B's window is 512, its context 4096+).
DEMO_SLIDING_WINDOW = 16
# 4 specials, 256 byte tokens and 508 learned pieces (characters and in-word merges): the corpus in
# 24,235 tokens (24,593 with the 512-entry byte-level BPE used before the tokenizer became Gemma's own
# byte-fallback kind, the one llama.cpp's converter reads), the verify prompts in as many as before.
DEMO_VOCAB = 768


def demo_text_config(
    vocab_size: int, layer_types: list[str] = DEMO_LAYER_TYPES, num_kv_shared_layers: int = DEMO_KV_SHARED_LAYERS
):
    """Gemma 4 text config at toy widths; every linear input width is a multiple of 32."""
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=64,
        layer_types=list(layer_types),
        sliding_window=DEMO_SLIDING_WINDOW,
        num_kv_shared_layers=num_kv_shared_layers,
        hidden_size_per_layer_input=32,
        final_logit_softcapping=30.0,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )


def build_tokenizer(corpus: str, vocab_size: int, merges_from: int | None = None):
    """A Gemma-style tokenizer, as llama.cpp's converter expects one: spaces as '▁', BPE with byte
    fallback (<0x00>…<0xFF>), trained on `corpus`'s lines to `merges_from` entries (default:
    `vocab_size`), then padded with <unusedN> entries to `vocab_size`; `<bos>` is prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # Pieces never span two words, as SentencePiece's split_by_whitespace ensures for Gemma: else a
    # prompt ending "… of" would end in a piece ("▁of") the training text only ever had merged
    # with the next word ("▁of▁the"). Needed for training only; the saved tokenizer, like Gemma's,
    # has no pre-tokenizer (its merges cannot cross a word anyway).
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    alphabet = ["▁"] + [chr(c) for c in range(33, 127)] + ["\n", "\t"]
    trainer = trainers.BpeTrainer(
        vocab_size=merges_from or vocab_size,
        special_tokens=SPECIAL_TOKENS + byte_tokens,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise ValueError(f"the trained vocabulary ({len(vocab)}) is already larger than {vocab_size}")
    for index in range(vocab_size - len(vocab)):
        vocab[f"<unused{index}>"] = len(vocab)
    spec["model"]["unk_token"] = None
    spec["pre_tokenizer"] = None
    # The byte tokens are ordinary vocabulary entries in Gemma's tokenizer, not special ones.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    padded = Tokenizer.from_str(json.dumps(spec))
    padded.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return padded


def training_batches(
    token_ids: list[int], seq_len: int, batch_size: int, steps: int, seed: int, line_starts: list[int] | None = None
):
    """Deterministic random windows of the tokenized corpus, each opened by BOS.

    With `line_starts` (token offsets) a window is BOS and then seq_len tokens from the start of a
    line (running on into the next lines), as a prompt is fed; a line too near the end to fill one
    (the demo's last) is not drawn. Without, a window starts anywhere and BOS replaces its first token."""
    data = torch.tensor(token_ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    if line_starts is not None:
        candidates = torch.tensor([s for s in line_starts if s + seq_len <= len(data)])
        bos = torch.full((batch_size, 1), BOS_ID, dtype=torch.long)
    for _ in range(steps):
        if line_starts is None:
            starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
            windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
            windows[:, 0] = BOS_ID
        else:
            starts = candidates[torch.randint(0, len(candidates), (batch_size,), generator=generator)]
            windows = torch.cat([bos, torch.stack([data[s : s + seq_len] for s in starts.tolist()])], dim=1)
        yield windows[:, :-1], windows[:, 1:]


def line_start_tokens(encoding, corpus: str) -> list[int]:
    """Token offsets at which a line of `corpus` begins (from the encoding's character offsets)."""
    char_starts = {0} | {i + 1 for i, ch in enumerate(corpus) if ch == "\n"}
    return [i for i, (start, _) in enumerate(encoding.offsets) if start in char_starts]


def train_demo_model(
    model,
    token_ids: list[int],
    steps: int,
    seed: int,
    seq_len: int = 64,
    batch_size: int = 16,
    lr: float = 1e-2,
    warmup: int = 10,
    beta2: float = 0.95,
    line_starts: list[int] | None = None,
):
    """Teach the tiny model the corpus so its greedy choices have real margins. Returns final loss.

    AdamW, linear warm-up then cosine decay to zero. The defaults are the workflow's; 800 steps at
    lr 3e-3, warm-up 20, beta2 0.999 on random windows of the whole corpus were the settings before."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.0)

    def factor(s):
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    loss_value = float("nan")
    started = time.perf_counter()
    for step, (inputs, targets) in enumerate(training_batches(token_ids, seq_len, batch_size, steps, seed, line_starts)):
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if step % 50 == 0 or step == steps - 1:
            log.info("demo training step %d/%d loss %.3f", step + 1, steps, loss_value)
    log.info("demo training: %d steps in %.1f s", steps, time.perf_counter() - started)
    model.eval()
    return loss_value


def build_demo_checkpoint(
    corpus_path: Path, out_dir: Path, train_steps: int, seed: int, vocab_size: int = DEMO_VOCAB, train_options: dict | None = None
) -> dict:
    """Write a Hugging Face style checkpoint (config, safetensors, tokenizer) of the demo model.

    `train_options` override the training settings, to compare them:
    lines_every (default TRAIN_LINES_EVERY), windows ("lines", the default, or "random") and any
    keyword of train_demo_model. The workflow uses the defaults."""
    from transformers import Gemma4ForCausalLM, GenerationConfig

    corpus = Path(corpus_path).read_text(encoding="utf-8")
    tokenizer = build_tokenizer(corpus, vocab_size)
    encoding = tokenizer.encode(corpus, add_special_tokens=False)
    token_ids = encoding.ids
    options = dict(train_options or {})
    starts = line_start_tokens(encoding, corpus)
    every = int(options.pop("lines_every", TRAIN_LINES_EVERY))
    train_ids, train_starts = [], []
    for start, end in list(zip(starts, starts[1:] + [len(token_ids)]))[::every]:
        train_starts.append(len(train_ids))
        train_ids += token_ids[start:end]
    if options.pop("windows", "lines") == "lines":
        options["line_starts"] = train_starts
    log.info(
        "demo corpus: %d characters, %d tokens, vocabulary %d; training on %d of its %d lines (%d tokens)",
        len(corpus),
        len(token_ids),
        tokenizer.get_vocab_size(),
        len(train_starts),
        len(starts),
        len(train_ids),
    )

    torch.manual_seed(seed)
    with _single_thread():
        model = Gemma4ForCausalLM(demo_text_config(tokenizer.get_vocab_size()))
        final_loss = train_demo_model(model, train_ids, train_steps, seed, **options)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer(tokenizer, out_dir)
    return {
        "final_loss": final_loss,
        "train_steps": train_steps,
        "seed": seed,
        "corpus_tokens": len(token_ids),
        "train_lines": len(train_starts),
        "train_tokens": len(train_ids),
    }


def write_tokenizer(tokenizer, out_dir: Path) -> None:
    """tokenizer.json plus the tokenizer_config.json transformers' AutoTokenizer reads."""
    tokenizer.save(str(Path(out_dir) / "tokenizer.json"))
    (Path(out_dir) / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
            },
            indent=2,
        )
        + "\n"
    )


class _single_thread:
    """Train on one thread so the weights do not depend on the machine's core count."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
