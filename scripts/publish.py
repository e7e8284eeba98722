"""Snakemake step: publish the configured variant's benchmark at results/<target>/."""

import shutil

from gemma_edge.artifacts import atomic_output
from gemma_edge.steplog import rule_log


def main(snakemake):
    for key in ("bench", "parity_log", "parity"):
        with atomic_output(snakemake.output[key]) as tmp:
            shutil.copyfile(snakemake.input[key], tmp)


with rule_log(snakemake.log[0], "current_bench"):
    main(snakemake)
