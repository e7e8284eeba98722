"""Snakemake step: extrapolate every step's peak RSS and wall time per layer to full depth."""

from gemma_edge.steps import measure
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    measure.perf_projection(
        snakemake.input.reports, snakemake.params.shape, snakemake.params.layers, snakemake.output.json, snakemake.output.table
    )


with rule_log(snakemake.log[0], "perf_projection"):
    main(snakemake)
