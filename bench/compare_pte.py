"""Decode and prefill speed of two or more .pte files of the same model, side by side in one run.

Usage: .venv/bin/python bench/compare_pte.py A.pte B.pte [...] [--rounds 5] [--prompt 64] [--new 32]
       [--decode-with-forward]

For a lowering change that must not cost decode speed: every program is loaded once, then the
programs take turns, one timed generation each per round (after one untimed warm-up each), so a
machine that slows down or speeds up during the run slows every program alike. Prints mean ±
stddev tok/s per program and checks that all of them produce the same greedy tokens. Run it with
nothing else on the machine (the numbers are per-thread work on a shared two-core host).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pte", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, help="prompt ids below this (default: the first .pte's get_vocab_size)")
    parser.add_argument(
        "--decode-with-forward",
        action="store_true",
        help="decode through `forward` even where a .pte has the one-token method, as ExecuTorch's LLM runner does",
    )
    args = parser.parse_args()

    from gemma_edge.device.bindings import set_threads
    from gemma_edge.device.peer_bench import summarise
    from gemma_edge.device.runtime import PteDecoder, greedy_decode
    from gemma_edge.device.timing import synthetic_prompt, time_generation

    set_threads(args.threads)
    decoders = [PteDecoder(path) for path in args.pte]
    if args.decode_with_forward:
        for decoder in decoders:
            decoder.decode_method = None
    meta = decoders[0].metadata
    prompt = synthetic_prompt(args.prompt, int(meta["get_bos_id"]), args.vocab or int(meta["get_vocab_size"]))
    tokens = [greedy_decode(decoder.step, prompt, args.new) for decoder in decoders]
    samples: list[list[dict]] = [[] for _ in decoders]
    for decoder in decoders:
        time_generation(decoder, prompt, args.new)
    for _ in range(args.rounds):
        for decoder, runs in zip(decoders, samples):
            runs.append(time_generation(decoder, prompt, args.new))
    print(
        f"prompt {args.prompt}, {args.new} new tokens, {args.rounds} rounds, {args.threads} threads, decoding with "
        f"{'forward' if args.decode_with_forward else 'the one-token method where there is one'}"
    )
    print("| .pte | decode tok/s | prefill tok/s | same greedy tokens as the first |\n|---|---:|---:|---|")
    for path, runs, ids in zip(args.pte, samples, tokens):
        decode = summarise([run["decode_tps"] for run in runs])
        prefill = summarise([run["prefill_tps"] for run in runs])
        print(
            f"| {path} | {decode['avg']:.2f} ± {decode['stddev']:.2f} | {prefill['avg']:.0f} ± {prefill['stddev']:.0f} "
            f"| {'yes' if ids == tokens[0] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
