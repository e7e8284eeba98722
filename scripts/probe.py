"""Snakemake step: what the device is, from its own system Python, before anything is installed."""

from gemma_edge import deploy
from gemma_edge.steplog import rule_log


def main(snakemake):
    target = snakemake.wildcards.target
    house = deploy.Housekeeping.of(snakemake.config["targets"][target])  # from the config: re-runs nothing
    deploy.probe(target, snakemake.params.settings, snakemake.output.platform, house)


with rule_log(snakemake.log[0], "probe"):
    main(snakemake)
