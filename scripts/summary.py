"""Snakemake step: the sweep's table (CSV + JSON) and plots."""

from gemma_edge import summary
from gemma_edge.steplog import rule_log


def main(snakemake):
    o = snakemake.output
    rows = summary.summarise(list(snakemake.input.benches), o.csv, o.json, list(snakemake.input.qualities))
    summary.plot_all(rows, {"decode": o.decode, "prefill": o.prefill, "size": o.size, "parity": o.parity, "quality": o.quality})


with rule_log(snakemake.log[0], "summary"):
    main(snakemake)
