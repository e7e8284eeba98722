"""Snakemake step: what the device is, from its own system Python, before anything is installed."""

from gemma_edge import deploy
from gemma_edge.steplog import rule_log


def main(snakemake):
    deploy.probe(snakemake.wildcards.target, snakemake.params.settings, snakemake.output.platform)


with rule_log(snakemake.log[0], "probe"):
    main(snakemake)
