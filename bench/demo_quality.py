"""How good is a demo checkpoint, and how long did it take to train? For tuning the demo model's training.

Run from the repository root, one at a time (training is single-threaded, measuring is too; each
takes a core for its duration, plus about 15 s to measure):

    # the workflow's settings (config.yaml demo.*, demo_model.py's defaults): train, time, measure
    .venv/bin/python bench/demo_quality.py build .bench/demo-default
    # other settings: --steps, --seed, and --set for lines_every, windows (lines or random) or any
    # train_demo_model keyword (seq_len, batch_size, lr, warmup, beta2). The settings before
    # 2026-11 (800 steps, random windows of the whole corpus; about 3.5 minutes), bit for bit:
    .venv/bin/python bench/demo_quality.py build .bench/demo-800 --steps 800 --set lines_every=1 \\
        --set windows=random --set lr=3e-3 --set warmup=20 --set beta2=0.999
    # measure a checkpoint built elsewhere, e.g. by the workflow
    # (results/demo-hub/models--local--gemma4-tiny/snapshots/<commit>); --lines-every says which
    # lines it trained on, for the trained/other split (default: demo_model.TRAIN_LINES_EVERY)
    .venv/bin/python bench/demo_quality.py measure DIR

Reported (printed, and written to DIR/quality.json next to the train.json `build` writes):

- training: wall time of train_demo_model alone (`train s`), its CPU time (`cpu s`: another
  process on the same core inflates it less than the wall time) and the whole build's wall time;
  the final training loss (the last batch, as the workflow records it);
- on config.yaml's verify.prompts with verify.max_new_tokens: the FP32 model's greedy continuation
  and the top-1/top-2 logit margin at each generated position, median and 10th percentile over the
  80 positions, and over the 64 of the prompts that open a line training saw (`trained prompts`;
  per prompt in the JSON);
- the quantization-robustness proxy: teacher-forced top-1 agreement, on those continuations,
  between the FP32 model and the same model with torchao 8da4w applied in eager mode as the
  workflow's quantize step configures it (Int8DynamicActivationIntxWeightConfig,
  weight_dtype=torch.int4, PerGroup(G)), for G = 32 and 128. Like the workflow, only linears whose
  input width G divides are quantized (at G = 128 the per-layer projections, input width 32, stay
  FP32). Embeddings stay FP32 here (the workflow makes them INT8 per row; this proxy leaves that out);
- the same FP32 loss and 8da4w agreement over the whole corpus, where one flip weighs far less
  than the 1.25 points it does among 80 prompt positions: `strided` (consecutive 64-token windows,
  BOS in place of the first token, as the old settings trained), `lines` (BOS and the first 64
  tokens of each line, as a prompt is fed) and, when training saw only some lines, `lines_trained`
  and `lines_other` (text the model never saw, so its loss there is high by design).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from gemma_edge import demo_model  # noqa: E402
from gemma_edge.parity import eager_reference, encode_prompts, top2_margin  # noqa: E402

CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
CORPUS = REPO / "resources/demo_corpus.txt"
GROUP_SIZES = (32, 128)
CORPUS_WINDOW = 64  # the training sequence length of the original settings: a fixed yardstick


def build(out_dir: Path, steps: int, seed: int, options: dict) -> dict:
    """Train and save a checkpoint with these settings, timing train_demo_model itself."""
    timed = {}
    original = demo_model.train_demo_model

    def timing_train(*args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            # Wall time, and this process's CPU time: the wall time grows when another process
            # shares the core, the CPU time much less.
            timed["train_s"], timed["train_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu

    demo_model.train_demo_model = timing_train
    try:
        started = time.perf_counter()
        facts = demo_model.build_demo_checkpoint(CORPUS, out_dir, steps, seed, train_options=options)
        facts["build_s"] = time.perf_counter() - started
    finally:
        demo_model.train_demo_model = original
    facts.update(timed, train_options=options)
    (out_dir / "train.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def quantized_copy(model, group_size: int):
    """The model with 8da4w on every linear whose input width `group_size` divides (as quantize.py does)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    quantized = copy.deepcopy(model)
    # The lm_head is tied to the token table: quantize_ gives the linear its own INT4 weight and
    # leaves the embedding's FP32 table alone.
    eligible = lambda module, fqn: (isinstance(module, torch.nn.Linear) and module.in_features % group_size == 0  # noqa: E731
                                    and module.out_features > 1)
    counted = [fqn for fqn, m in quantized.named_modules() if eligible(m, fqn)]
    kept = [fqn for fqn, m in quantized.named_modules() if isinstance(m, torch.nn.Linear) and not eligible(m, fqn)]
    quantize_(quantized, config, filter_fn=eligible)
    return quantized, len(counted), len(kept)


def corpus_windows(token_ids: list[int], line_starts: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two yardsticks over the whole corpus, BOS first, as (rows, mask of the targets that count):
    "strided": consecutive windows of CORPUS_WINDOW targets whose first token BOS replaces (how the
    original settings trained); "lines": BOS and then one line, up to CORPUS_WINDOW of its tokens
    (how a prompt is fed), right-padded."""
    step = CORPUS_WINDOW
    strided = torch.tensor([[demo_model.BOS_ID] + token_ids[i + 1 : i + step + 1] for i in range(0, len(token_ids) - step - 1, step)])
    ends = line_starts[1:] + [len(token_ids)]
    lines = torch.full((len(line_starts), step + 1), demo_model.PAD_ID)
    mask = torch.zeros((len(line_starts), step), dtype=torch.bool)
    for row, (start, end) in enumerate(zip(line_starts, ends)):
        piece = token_ids[start : min(end, start + step)]
        lines[row, 0] = demo_model.BOS_ID
        lines[row, 1 : 1 + len(piece)] = torch.tensor(piece)
        mask[row, : len(piece)] = True
    return {"strided": (strided, torch.ones((len(strided), step), dtype=torch.bool)), "lines": (lines, mask)}


def measure(checkpoint: Path, train_options: dict) -> dict:
    from tokenizers import Tokenizer
    from transformers import Gemma4ForCausalLM

    model = Gemma4ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = CONFIG["verify"]["prompts"]
    new_tokens = CONFIG["verify"]["max_new_tokens"]
    encoded = encode_prompts(checkpoint / "tokenizer.json", prompts, demo_model.BOS_ID)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))

    # A prompt is "trained" if it opens a line training saw (config.yaml: four are, one is not).
    every = int(train_options.get("lines_every", demo_model.TRAIN_LINES_EVERY))
    corpus_text = CORPUS.read_text(encoding="utf-8")
    corpus_lines = corpus_text.splitlines()
    references, margins, continuations = [], {"all": [], "trained": [], "unseen": []}, []
    for text, prompt in zip(prompts, encoded):
        tokens, logits = eager_reference(model, prompt, new_tokens)
        references.append((prompt, tokens))
        gaps = [top2_margin(row) for row in logits]
        trained = any(line.startswith(text) and i % every == 0 for i, line in enumerate(corpus_lines))
        margins["all"] += gaps
        margins["trained" if trained else "unseen"] += gaps
        continuations.append({"prompt": text, "trained_line": trained, "continuation": tokenizer.decode(tokens),
                              "margin_median": statistics.median(gaps), "margin_min": min(gaps), "margins": gaps})

    corpus_encoding = tokenizer.encode(corpus_text, add_special_tokens=False)
    windows = corpus_windows(corpus_encoding.ids, demo_model.line_start_tokens(corpus_encoding, corpus_text))
    # Which lines training saw: all, or every lines_every-th from the first.
    trained_line = torch.arange(len(windows["lines"][0])) % every == 0
    subsets = {"strided": ("strided", None), "lines": ("lines", None)}
    if every > 1:
        subsets.update({"lines_trained": ("lines", trained_line), "lines_other": ("lines", ~trained_line)})

    def select(name, values):
        base, rows_wanted = subsets[name]
        mask = windows[base][1] if rows_wanted is None else windows[base][1] & rows_wanted[:, None]
        return values[base][mask]

    corpus, fp32_top1, fp32_loss, fp32_gap = {}, {}, {}, {}
    with torch.no_grad():
        for base, (rows, _) in windows.items():
            logits = model(input_ids=rows[:, :-1]).logits
            top = logits.topk(2, dim=-1).values
            fp32_top1[base] = logits.argmax(-1)
            fp32_loss[base] = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
            fp32_gap[base] = top[..., 0] - top[..., 1]
        for name in subsets:
            losses, gaps = select(name, fp32_loss), select(name, fp32_gap)
            corpus[name] = {"fp32_loss": float(losses.mean()), "margin_median": float(gaps.median()),
                            "margin_p10": float(torch.quantile(gaps, 0.10)), "positions": int(gaps.numel())}

    agreement = {}
    for group_size in GROUP_SIZES:
        quantized, n_quantized, n_kept = quantized_copy(model, group_size)
        agreed = total = 0
        with torch.no_grad():
            for prompt, tokens in references:
                sequence = torch.tensor([prompt + tokens[:-1]])
                logits = quantized(input_ids=sequence).logits[0, len(prompt) - 1 :]
                agreed += sum(int(torch.argmax(row)) == t for row, t in zip(logits, tokens))
                total += len(tokens)
            row = {"prompts_top1": agreed / total, "prompt_positions": total, "quantized_linears": n_quantized, "fp32_linears": n_kept}
            same = {base: quantized(input_ids=rows[:, :-1]).logits.argmax(-1) == fp32_top1[base] for base, (rows, _) in windows.items()}
            for name in subsets:
                row[f"corpus_{name}_top1"] = float(select(name, same).float().mean())
        agreement[f"g{group_size}"] = row
        del quantized

    return {
        "checkpoint": str(checkpoint),
        "margins": {name: {"median": statistics.median(values), "p10": statistics.quantiles(values, n=10, method="inclusive")[0], "min": min(values),
                           "positions": len(values)} for name, values in margins.items() if values},
        "corpus": corpus,
        "agreement_8da4w": agreement,
        "prompts": continuations,
    }


def report(checkpoint: Path, lines_every: int | None = None) -> dict:
    train_facts = checkpoint / "train.json"
    train = json.loads(train_facts.read_text()) if train_facts.exists() else {}
    options = train.get("train_options", {})
    if lines_every is not None:
        options = {**options, "lines_every": lines_every}
    result = measure(checkpoint, options)
    if train:
        result["train"] = train
    (checkpoint / "quality.json").write_text(json.dumps(result, indent=2) + "\n")

    m, c, a = result["margins"]["all"], result["corpus"], result["agreement_8da4w"]
    print(json.dumps(result, indent=2))
    sets = [name for name in ("strided", "lines", "lines_trained") if name in c]
    t = result["margins"].get("trained", {"median": float("nan"), "p10": float("nan")})
    print(f"\n{'train s':>7} {'cpu s':>6} {'build s':>7} {'loss':>6} {'margin med/p10':>14} {'trained prompts':>15} "
          f"{'g32 prompts':>11} {'g128 prompts':>12}  " + "  ".join(f"{name + ': loss, g32, g128':>32}" for name in sets))
    print(f"{train.get('train_s', float('nan')):7.1f} {train.get('train_cpu_s', float('nan')):6.1f} {train.get('build_s', float('nan')):7.1f} "
          f"{train.get('final_loss', float('nan')):6.3f} {m['median']:7.2f}/{m['p10']:5.2f} {t['median']:9.2f}/{t['p10']:5.2f} "
          f"{a['g32']['prompts_top1']:11.4f} {a['g128']['prompts_top1']:12.4f}  "
          + "  ".join(f"{c[name]['fp32_loss']:12.3f} {a['g32'][f'corpus_{name}_top1']:9.4f} {a['g128'][f'corpus_{name}_top1']:9.4f}" for name in sets))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    built = sub.add_parser("build", help="train a checkpoint into DIR (timed), then measure it")
    built.add_argument("dir", type=Path)
    built.add_argument("--steps", type=int, default=CONFIG["demo"]["train_steps"])
    built.add_argument("--seed", type=int, default=CONFIG["demo"]["seed"])
    built.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="lines_every=N, windows=lines|random, or a train_demo_model keyword: seq_len, batch_size, lr, warmup, beta2")
    measured = sub.add_parser("measure", help="measure an existing checkpoint directory")
    measured.add_argument("dir", type=Path)
    measured.add_argument("--lines-every", type=int, help="the lines it trained on (default: demo_model.TRAIN_LINES_EVERY)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)  # measuring on one thread too: deterministic, and leaves the other core alone
    if args.command == "build":
        options = {}
        for item in args.set:
            key, value = item.split("=", 1)
            options[key] = int(value) if key in {"seq_len", "batch_size", "warmup", "lines_every"} else value if key == "windows" else float(value)
        options.setdefault("lines_every", demo_model.TRAIN_LINES_EVERY)
        options.setdefault("windows", "lines")
        args.dir.mkdir(parents=True, exist_ok=True)
        build(args.dir, args.steps, args.seed, options)
    report(args.dir, getattr(args, "lines_every", None))


if __name__ == "__main__":
    main()
