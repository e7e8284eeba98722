# verify.prompts, counted with the model's own tokenizer, plus verify.max_new_tokens within
# export.max_seq_len, checked as soon as the tokenizer exists and before the model's first export.
# Once a checkpoint is downloaded, verify_prompts (rules/common.smk) checks every config this way
# before any job; on a fresh clone there is no tokenizer yet while the run is planned, and without
# this step an overflow would surface in verify, after export, quantize and lower. (A job cannot
# tell which targets were asked for, so this one checks whatever they are: every .pte of the
# export is verified before a device gets it.) The step reads the verify and export settings from
# the config, not as params, and its record depends on the checkpoint alone: a later change of
# prompts, max_new_tokens or max_seq_len never re-runs it, nor export through it (the plan-time
# check covers every later config). Not ancient(): whenever this step re-ran, Snakemake 9.27 would
# then judge none of the steps after it, and miss their own changes (a verify param, say).
rule context_check:
    input:
        checkpoint=rules.download.output.manifest,
    output:
        record="results/{model}/context_check.json",
    log:
        "logs/{model}/context_check.log",
    benchmark:
        "benchmarks/{model}/context_check.tsv"
    localrule: True
    conda:
        "../envs/torch.yaml"
    message:
        "Counting verify.prompts with {wildcards.model}'s tokenizer against export.max_seq_len before its export"
    script:
        "../scripts/context_check.py"


rule export:
    input:
        checkpoint=rules.download.output.manifest,
        context=rules.context_check.output.record,
    output:
        program="results/{model}/fp32/program.pt2",
        manifest="results/{model}/fp32/program.pt2.manifest.json",
    log:
        "logs/{model}/fp32/export.log",
    benchmark:
        "benchmarks/{model}/fp32/export.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("export"),
    params:
        max_seq_len=config["export"]["max_seq_len"],
        attention=config["export"]["attention"],
    message:
        "torch.export of {wildcards.model} with an in-graph KV cache of {params.max_seq_len} positions"
    script:
        "../scripts/export.py"
