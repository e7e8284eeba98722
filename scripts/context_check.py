"""Snakemake step: verify.prompts plus verify.max_new_tokens within export.max_seq_len, counted with
the model's own tokenizer as soon as it exists, before the model's first export (rules/export.smk
says why the settings come from the config and not from params)."""

from gemma_edge.steps import host
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    config = snakemake.config
    host.context_check(
        snakemake.input.checkpoint,
        config["verify"]["prompts"],
        config["verify"]["max_new_tokens"],
        config["export"]["max_seq_len"],
        snakemake.output.record,
    )


with rule_log(snakemake.log[0], "context_check"):
    main(snakemake)
