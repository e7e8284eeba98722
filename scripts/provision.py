"""Snakemake step: make sure the device can run the benchmark; record its facts."""

from gemma_edge import deploy
from gemma_edge.steplog import rule_log


def main(snakemake):
    i = snakemake.input
    deploy.provision(
        snakemake.wildcards.target,
        snakemake.params.settings,
        snakemake.output.device,
        platform_path=i.get("platform"),
        wheelhouse_path=i.get("wheelhouse"),
        wheel_dir=i.get("wheels"),
        house=deploy.Housekeeping.of(snakemake.config["targets"][snakemake.wildcards.target]),  # re-runs nothing
    )


with rule_log(snakemake.log[0], "provision"):
    main(snakemake)
