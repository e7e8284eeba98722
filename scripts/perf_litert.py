"""Snakemake step: time LiteRT-LM's prefill and decode of the .litertlm on this host."""
from pathlib import Path

from gemma_edge import perf
from gemma_edge.steplog import rule_log


def main(snakemake):
    perf.bench_litert(Path(snakemake.input.model), snakemake.params.spec, Path(snakemake.input.requirements),
                      Path(snakemake.output.result))


with rule_log(snakemake.log[0], "perf_litert"):
    main(snakemake)
