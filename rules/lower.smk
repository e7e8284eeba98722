rule lower:
    input:
        program="results/{model}/{quant}/program.pt2",
        checkpoint=rules.download.output.manifest,
    output:
        pte=f"results/{variant.VARIANT}/model.pte",
        manifest=f"results/{variant.VARIANT}/model.pte.manifest.json",
    log:
        f"logs/{variant.VARIANT}/lower.log",
    benchmark:
        f"benchmarks/{variant.VARIANT}/lower.tsv"
    conda:
        "../envs/torch.yaml"
    # Lowering is single-threaded Python (torch's fake-tensor retracing): its CPU time equals its wall
    # time from the demo to 35 layers (docs/design.md). One core leaves the other to the next job.
    threads: 1
    resources:
        mem_mb=memory_mb("lower"),
    params:
        per_op_mode=lambda wc: variant.per_op_mode_of(wc.mode),
        decode_method=config["lowering"]["decode_method"],
    message:
        "Lowering {wildcards.model}/{wildcards.quant} to XNNPACK (per_op_mode {params.per_op_mode})"
    script:
        "../scripts/lower.py"
