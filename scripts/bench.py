"""Snakemake step: benchmark decode on the device and pull back bench.json and the parity log."""

from gemma_edge import deploy
from gemma_edge.steplog import rule_log


def main(snakemake):
    i, o = snakemake.input, snakemake.output
    deploy.bench(
        snakemake.params.target,
        snakemake.params.settings,
        snakemake.params.bench,
        i.deployed,
        i.device,
        i.pte_manifest,
        i.host_parity,
        i.checkpoint,
        o.bench,
        o.parity_log,
        o.parity,
        deploy.Housekeeping.of(snakemake.config["targets"][snakemake.params.target]),  # from the config: re-runs nothing
    )


with rule_log(snakemake.log[0], "bench"):
    main(snakemake)
