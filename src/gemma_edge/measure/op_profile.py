"""Where a decoded token's time goes inside a .pte, or with `--prefill` a prompt's prefill call:
ExecuTorch's own event tracer (ETDump), read back with its Inspector, split into XNNPACK delegate
calls (and the XNNPACK operators inside them) and the portable / custom operators run between them
(those the tracer times only as a whole, the LLM custom ops among them, named by the .pte's own
instructions).

    python -m gemma_edge.measure.op_profile results/e2b-4l/int4-g128/xnnpack-auto/model.pte --tokens 32
    python -m gemma_edge.measure.op_profile results/e2b-4l/int4-g128/xnnpack-auto/model.pte --prefill

Every event is timed, so a profiled token is slower than an untraced one; the shares, not the
absolute milliseconds, are the result. The traced run's wall time per token is printed beside them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from gemma_edge.device.xnnpack_ops import load_traced, operator_kind
from gemma_edge.workflow.table import text_table

# One ETDump event: its name, whether it is an operator inside a delegate, its raw times (one per
# run of the method), and the index of the method's instruction it times (None inside a delegate).
Event = tuple[str, bool, list[float], int | None]
DELEGATE_CALL = "DELEGATE_CALL"
OPERATOR_CALL = "OPERATOR_CALL"
NATIVE_PREFIX = "native_call_"
SLOWEST = 5


def run_decode(
    module, prompt_len: int, new_tokens: int, per_call: int, decode_method: str = "forward", token: int = 5
) -> tuple[float, int]:
    """Prefill `prompt_len` tokens in calls of at most `per_call`, then decode `new_tokens` one at a
    time with `decode_method`; returns the decode seconds and the number of prefill calls."""
    starts = range(0, prompt_len, per_call)
    for start in starts:
        length = min(per_call, prompt_len - start)
        ids = torch.full((1, length), token, dtype=torch.long)
        module.run_method("forward", (ids, torch.arange(start, start + length, dtype=torch.long)))
    begin = time.perf_counter()
    for i in range(new_tokens):
        module.run_method(
            decode_method, (torch.tensor([[token]], dtype=torch.long), torch.tensor([prompt_len + i], dtype=torch.long))
        )
    return time.perf_counter() - begin, len(starts)


def op_kind(name: str) -> str:
    """An event's operator with its instance number dropped: 'Add (ND) #3' -> 'Add (ND)',
    'native_call_cat.out' -> 'cat.out'."""
    return operator_kind(name.removeprefix(NATIVE_PREFIX))


def decode_share(raw: list[float], runs: int, decoded: int) -> float:
    """Milliseconds per decoded token of one event: its raw times in the last `decoded` runs (those
    after the prefill calls), averaged."""
    if len(raw) != runs:
        raise ValueError(f"an event ran {len(raw)} times, not once per run ({runs})")
    return sum(raw[-decoded:]) / decoded


def summarise_events(events: list[Event], runs: int, decoded: int, operators: dict[int, str] | None = None) -> dict:
    """Per-token milliseconds from ETDump events (name, is_delegated_op, raw times per run, instruction;
    the last `decoded` runs are the decode steps, those before them the prefill): the delegate calls
    and the operator calls between them, each with its parts.

    An OPERATOR_CALL event spans one portable / custom kernel and holds a `native_call_*` event
    when the kernel is a native one; a DELEGATE_CALL spans one XNNPACK subgraph and holds its
    operators (is_delegated_op). Totals come from the spans, parts from what they hold. An operator
    call that holds nothing (the LLM custom ops) is named by its instruction in `operators`
    (`instruction_operators`), with its calls per token."""
    totals = {DELEGATE_CALL: 0.0, OPERATOR_CALL: 0.0}
    counts = {DELEGATE_CALL: 0, OPERATOR_CALL: 0}
    xnnpack, portable = defaultdict(float), defaultdict(float)
    unnamed = defaultdict(lambda: [0.0, 0])  # operator calls holding no native_call event: [ms, calls]
    slowest = []  # single XNNPACK operators, with the delegate call they run in
    for index, (name, delegated, raw, instruction) in enumerate(events):
        ms = decode_share(raw, runs, decoded)
        if name in totals:
            totals[name] += ms
            counts[name] += 1
            if name == OPERATOR_CALL and not holds_native_call(events, index):
                entry = unnamed[(operators or {}).get(instruction, "unnamed operator")]
                entry[0] += ms
                entry[1] += 1
        elif delegated:
            xnnpack[op_kind(name)] += ms
            slowest.append((ms, f"{name} (delegate call {counts[DELEGATE_CALL] + 1})"))
        elif name.startswith(NATIVE_PREFIX):
            portable[op_kind(name)] += ms
    named = sum(portable.values())
    return {
        "delegate_calls": counts[DELEGATE_CALL],
        "delegate_ms": totals[DELEGATE_CALL],
        "operator_calls": counts[OPERATOR_CALL],
        "operator_ms": totals[OPERATOR_CALL],
        "xnnpack_ms": dict(sorted(xnnpack.items(), key=lambda kv: -kv[1])),
        "portable_ms": dict(sorted(portable.items(), key=lambda kv: -kv[1])),
        # operator-call time outside every native_call event: the calls that hold none (the LLM custom
        # ops, named in custom_ops) and the other calls' own dispatch
        "custom_ms": max(0.0, totals[OPERATOR_CALL] - named),
        # delegate time outside every XNNPACK operator: the delegate's own work per call (setting
        # inputs and outputs, reshaping for the token count) and dispatch
        "delegate_overhead_ms": max(0.0, totals[DELEGATE_CALL] - sum(xnnpack.values())),
        "slowest_ms": {name: ms for ms, name in sorted(slowest, reverse=True)[:SLOWEST]},
        "custom_ops": {
            name: {"ms": ms, "calls": calls} for name, (ms, calls) in sorted(unnamed.items(), key=lambda kv: -kv[1][0])
        },
    }


def holds_native_call(events: list[Event], index: int) -> bool:
    """Whether the OPERATOR_CALL at `index` holds a native kernel's event (the one after it)."""
    return index + 1 < len(events) and events[index + 1][0].startswith(NATIVE_PREFIX)


def instruction_operators(pte_path: Path, method: str) -> dict[int, str]:
    """The operator each kernel-call instruction of `method` runs, by instruction index, named as the
    lowering record names them (llama::custom_sdpa, overload out -> llama.custom_sdpa.out); read from
    the .pte's flatbuffer alone."""
    from gemma_edge.measure.pte_weights import read_program

    _, program = read_program(pte_path)
    plan = next(plan for plan in program.execution_plan if plan.name == method)
    names = {}
    for index, instruction in enumerate(plan.chains[0].instructions):
        op_index = getattr(instruction.instr_args, "op_index", None)
        if op_index is not None:
            operator = plan.operators[op_index]
            names[index] = f"{operator.name.replace('::', '.')}.{operator.overload}".removesuffix(".")
    return names


def read_events(etdump: Path) -> list[tuple[list[Event], int]]:
    """Each Execute block's events of an ETDump file (one block per method run, in the order the
    methods first ran), and how many times its method ran. An event's instruction is the index of
    the method's instruction it times (the Inspector keeps it as a private field)."""
    from executorch.devtools import Inspector

    inspector = Inspector(etdump_path=str(etdump))
    blocks = []
    for block in inspector.event_blocks:
        if block.name == "Execute":
            events = [
                (e.name, bool(e.is_delegated_op), list(e.perf_data.raw), getattr(e, "_instruction_id", None))
                for e in block.events
                if e.perf_data
            ]
            blocks.append((events, max(len(event[2]) for event in events)))
    return blocks


def module_events(module) -> list[tuple[list[Event], int]]:
    """read_events of what a traced module has recorded so far, through a scratch ETDump file."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace.etdp"
        module.write_etdump_result_to_file(str(path))
        return read_events(path)


def profile_decode(pte_path: Path, prompt_len: int, new_tokens: int, threads: int) -> dict:
    """One traced warm-up decode (discarded with its module), then one traced decode on a fresh
    load: its breakdown per token and its wall time per token."""
    from gemma_edge.device.runtime import DECODE_METHOD, flush_denormals

    flush_denormals(threads)  # as the runtime wrapper runs every .pte
    module = load_traced(pte_path)
    per_call = int(module.run_method("get_max_seq_len", ())[0])  # a long prompt takes several calls
    method = DECODE_METHOD if DECODE_METHOD in module.method_names() else "forward"  # as PteDecoder decodes
    run_decode(module, prompt_len, new_tokens, per_call, method)  # warm-up; its events are dropped with the module
    module = load_traced(pte_path)
    seconds, prefill_calls = run_decode(module, prompt_len, new_tokens, per_call, method)
    events, runs = module_events(module)[-1]  # the decoding method's: forward's when it decodes too
    expected = new_tokens if method == DECODE_METHOD else prefill_calls + new_tokens
    if runs != expected:
        raise RuntimeError(f"the trace holds {runs} runs of {method}, expected {expected}")
    summary = summarise_events(events, runs, new_tokens, instruction_operators(pte_path, method))
    summary.update(
        {
            "pte": str(pte_path),
            "threads": threads,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "method": method,
            "traced_ms_per_token": 1000 * seconds / new_tokens,
        }
    )
    return summary


def profile_prefill(pte_path: Path, prompt_len: int, threads: int, calls: int = 4) -> dict:
    """One traced warm-up prefill (discarded with its module), then `calls` traced prefills of a
    `prompt_len`-token prompt at position 0 on a fresh load, each one `forward` call (the cache is
    written over each time): the breakdown and wall time per call. The call ends with the last
    position's logits, so the lm_head is in it once."""
    from gemma_edge.device.runtime import flush_denormals

    flush_denormals(threads)
    module = load_traced(pte_path)
    per_call = int(module.run_method("get_max_seq_len", ())[0])
    if prompt_len > per_call:
        raise ValueError(f"a {prompt_len}-token prompt takes more than one call of this .pte (at most {per_call} tokens)")
    run_decode(module, prompt_len, 0, per_call)
    module = load_traced(pte_path)
    begin = time.perf_counter()
    for _ in range(calls):
        run_decode(module, prompt_len, 0, per_call)
    seconds = time.perf_counter() - begin
    events, runs = module_events(module)[0]  # forward's block
    if runs != calls:
        raise RuntimeError(f"the trace holds {runs} runs of forward, expected {calls}")
    summary = summarise_events(events, runs, runs, instruction_operators(pte_path, "forward"))
    summary.update(
        {
            "pte": str(pte_path),
            "threads": threads,
            "prompt_tokens": prompt_len,
            "calls": calls,
            "method": "forward",
            "unit": "prefill call",
            "traced_ms_per_call": 1000 * seconds / calls,
        }
    )
    return summary


def render(summary: dict, top: int = 12) -> str:
    total = summary["delegate_ms"] + summary["operator_ms"]
    share = lambda ms: f"{ms:.3f} ms, {100 * ms / total:.1f} %"  # noqa: E731
    unit = summary.get("unit", "token")
    if unit == "token":
        what = f"{summary['new_tokens']} decoded tokens; traced {summary['traced_ms_per_token']:.2f} ms/token wall"
    else:
        what = f"prefilled in one call, {summary['calls']} calls traced; traced {summary['traced_ms_per_call']:.2f} ms/call wall"
    lines = [
        f"{summary['pte']} ({summary['method']}): {summary['threads']} threads, prompt {summary['prompt_tokens']}, {what}",
        f"per {unit}: {summary['delegate_calls']} XNNPACK delegate calls {share(summary['delegate_ms'])}, "
        f"{summary['operator_calls']} operator calls {share(summary['operator_ms'])}",
        "",
        "XNNPACK operators (inside the delegate calls):",
    ]
    xnnpack = [(name, ms) for name, ms in list(summary["xnnpack_ms"].items())[:top]]
    xnnpack.append(("(the delegate outside its operators)", summary["delegate_overhead_ms"]))
    lines += shares(xnnpack, total, unit)
    lines += ["", "slowest single XNNPACK operators:"]
    lines += shares(summary["slowest_ms"].items(), total, unit)
    lines += ["", "operators between the delegate calls:"]
    between = [("LLM custom ops, and other calls timed whole", summary["custom_ms"]), *summary["portable_ms"].items()]
    lines += shares(between, total, unit)
    lines += ["", "operator calls with no kernel event of their own (the LLM custom ops among them), named by instruction:"]
    custom = [(f"{name} ({entry['calls']} calls)", entry["ms"]) for name, entry in summary["custom_ops"].items()]
    lines += shares(custom, total, unit)
    return "\n".join(lines)


def shares(rows, total: float, unit: str = "token") -> list[str]:
    """A section of the profile: each name's ms per token (or prefill call) and its share, indented."""
    cells = [[name, f"{ms:.3f}", f"{100 * ms / total:.1f}"] for name, ms in rows]
    return ["  " + line for line in text_table(["", f"ms/{unit}", "%"], cells, "lrr").splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pte", type=Path)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (default 64)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded and profiled (default 32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", action="store_true", help="profile the prompt's prefill call instead of decoding")
    args = parser.parse_args(argv)
    if args.prefill:
        try:
            print(render(profile_prefill(args.pte, args.prompt, args.threads)))
        except ValueError as error:
            parser.exit(2, f"op_profile: {error}\n")
    else:
        print(render(profile_decode(args.pte, args.prompt, args.tokens, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
