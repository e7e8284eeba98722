rule verify:
    input:
        pte=rules.lower.output.pte,
        checkpoint=rules.download.output.manifest,
    output:
        parity=report(
            f"results/{variant.VARIANT}/parity.json",
            caption="../report/parity.rst",
            category="Parity",
        ),
        table=f"results/{variant.VARIANT}/parity.log",
    log:
        f"logs/{variant.VARIANT}/verify.log",
    benchmark:
        f"benchmarks/{variant.VARIANT}/verify.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("verify"),
    params:
        prompts=verify_prompts,
        max_new_tokens=config["verify"]["max_new_tokens"],
        gates=config["verify"]["gates"],
    message:
        "Token parity of {input.pte} against eager FP32"
    script:
        "../scripts/verify.py"
