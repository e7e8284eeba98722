"""Snakemake step: the checkpoint converted to a LiteRT-LM .litertlm by Google's litert-torch."""

from gemma_edge.steps import peers
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    peers.litert_model(
        snakemake.params.python,
        snakemake.input.checkpoint,
        snakemake.output.model,
        snakemake.wildcards.litert_recipe,
        snakemake.params.max_seq_len,
    )


with rule_log(snakemake.log[0], "litert_model"):
    main(snakemake)
