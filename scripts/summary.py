"""Snakemake step: the sweep's table (CSV + JSON) and plots."""

from gemma_edge.steps import measure
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    o = snakemake.output
    plots = {"decode": o.decode, "prefill": o.prefill, "size": o.size, "parity": o.parity, "quality": o.quality}
    measure.summary(snakemake.input.benches, snakemake.input.qualities, o.csv, o.json, plots)


with rule_log(snakemake.log[0], "summary"):
    main(snakemake)
