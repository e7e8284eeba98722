"""Snakemake step: set the engines' numbers and the steps' costs side by side (perf.json, perf.md)."""

from gemma_edge.steps import measure
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    i, o = snakemake.input, snakemake.output
    engines = {name: getattr(i, name) for name in ("pte", "eager", "llamacpp", "litert") if hasattr(i, name)}
    measure.perf_table(engines, snakemake.params.step_benchmarks, i.pte_manifest, i.gguf_manifest, i.checkpoint, o.json, o.table)


with rule_log(snakemake.log[0], "perf_table"):
    main(snakemake)
