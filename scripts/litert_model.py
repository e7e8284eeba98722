"""Snakemake step: the checkpoint converted to a LiteRT-LM .litertlm by Google's litert-torch."""

from pathlib import Path

from gemma_edge import litert
from gemma_edge.steplog import rule_log


def main(snakemake):
    python = litert.converter_python(Path(snakemake.params.python))
    litert.convert_in(
        python,
        Path(snakemake.input.checkpoint),
        Path(snakemake.output.model),
        snakemake.wildcards.litert_recipe,
        snakemake.params.max_seq_len,
    )


with rule_log(snakemake.log[0], "litert_model"):
    main(snakemake)
