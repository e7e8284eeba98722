"""Snakemake step: verify.prompts plus verify.max_new_tokens within export.max_seq_len, counted with
the model's own tokenizer as soon as it exists, before the model's first export (rules/export.smk
says why the settings come from the config and not from params)."""

import logging

from gemma_edge.artifacts import read_json, write_json
from gemma_edge.config import check_prompts_fit, checkpoint_prompt_counts
from gemma_edge.steplog import rule_log

log = logging.getLogger("context_check")


def main(snakemake):
    prompts = snakemake.config["verify"]["prompts"]
    max_new_tokens = snakemake.config["verify"]["max_new_tokens"]
    max_seq_len = snakemake.config["export"]["max_seq_len"]
    counts = checkpoint_prompt_counts(snakemake.input.checkpoint, prompts)
    if counts is None:
        log.info("the checkpoint has no tokenizer.json: the verify step counts the prompts with the .pte's")
    else:
        log.info("positions per prompt, BOS included: %s; max_new_tokens %d; max_seq_len %d", counts, max_new_tokens, max_seq_len)
    check_prompts_fit(prompts, counts, max_new_tokens, max_seq_len)
    tokenizer = f"{read_json(snakemake.input.checkpoint)['path']}/tokenizer.json" if counts is not None else None
    # What this record says holds whatever the config later says: the plan-time check takes over.
    write_json(snakemake.output.record, {"checkpoint": str(snakemake.input.checkpoint), "tokenizer": tokenizer})


with rule_log(snakemake.log[0], "context_check"):
    main(snakemake)
