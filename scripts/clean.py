"""Snakemake step: remove everything the workflow put on a device but its virtualenv."""

from pathlib import Path

from gemma_edge import deploy
from gemma_edge.steplog import rule_log


def main(snakemake):
    target = snakemake.params.target
    house = deploy.Housekeeping.of(snakemake.config["targets"][target])
    deploy.clean(target, snakemake.params.settings, Path("results") / target, house)


with rule_log(snakemake.log[0], "clean"):
    main(snakemake)
