"""Snakemake step: make sure the device can run the benchmark; record its facts."""
from gemma_edge import deploy
from gemma_edge.steplog import rule_log


def main(snakemake):
    deploy.provision(snakemake.wildcards.target, snakemake.params.settings, snakemake.output.device)


with rule_log(snakemake.log[0], "provision"):
    main(snakemake)
