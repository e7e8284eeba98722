"""Snakemake step: benchmark decode on the device and pull back bench.json and the parity log."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    i, o = snakemake.input, snakemake.output
    device.bench(
        device.target_of(snakemake.config, snakemake.params.target, snakemake.params.settings),
        snakemake.params.bench,
        device.BenchInputs(i.deployed, i.device, i.pte_manifest, i.host_parity, i.checkpoint),
        device.BenchOutputs(o.bench, o.parity_log, o.parity),
    )


with rule_log(snakemake.log[0], "bench"):
    main(snakemake)
