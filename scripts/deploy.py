"""Snakemake step: upload the .pte, tokenizer and peer engines to the device, atomically and sha256-checked."""

from pathlib import Path

from gemma_edge import deploy, variant
from gemma_edge.artifacts import read_json
from gemma_edge.steplog import rule_log


def main(snakemake):
    tokenizer = Path(read_json(snakemake.input.checkpoint)["path"]) / "tokenizer.json"
    config = snakemake.config  # housekeeping, read here so that no change of it re-runs the step
    configured = variant.variant_dir(config["model"], config["quantization"]["group_size"], config["lowering"]["per_op_mode"])
    deploy.deploy(
        snakemake.params.target,
        snakemake.params.settings,
        snakemake.input.pte,
        tokenizer,
        snakemake.output.deployed,
        snakemake.params.peers,
        configured=configured,
        house=deploy.Housekeeping.of(config["targets"][snakemake.params.target]),
    )


with rule_log(snakemake.log[0], "deploy"):
    main(snakemake)
