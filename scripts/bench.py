"""Snakemake step: benchmark decode on the device and pull back bench.json and the parity log."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    i, o, target = snakemake.input, snakemake.output, snakemake.params.target
    device.bench(
        target,
        snakemake.params.settings,
        snakemake.params.bench,
        deployed=i.deployed,
        device=i.device,
        pte_manifest=i.pte_manifest,
        host_parity=i.host_parity,
        checkpoint=i.checkpoint,
        out_bench=o.bench,
        out_parity_log=o.parity_log,
        out_parity=o.parity,
        house=device.housekeeping(snakemake.config, target),
    )


with rule_log(snakemake.log[0], "bench"):
    main(snakemake)
