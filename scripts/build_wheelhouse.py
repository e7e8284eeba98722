"""Snakemake step: download the device's wheels on this host, for the device's platform."""

from gemma_edge import wheelhouse
from gemma_edge.artifacts import read_json, write_json
from gemma_edge.steplog import rule_log


def main(snakemake):
    platform = wheelhouse.device_platform(read_json(snakemake.input.platform))
    record = wheelhouse.build_wheelhouse(
        dict(snakemake.params.pins), platform, snakemake.output.wheels, snakemake.params.torch_index
    )
    write_json(snakemake.output.record, record)


with rule_log(snakemake.log[0], "wheelhouse"):
    main(snakemake)
