rule quantize:
    input:
        program=rules.export.output.program,
    output:
        program=f"results/{variant.QUANTIZED}/program.pt2",
        manifest=f"results/{variant.QUANTIZED}/program.pt2.manifest.json",
    log:
        f"logs/{variant.QUANTIZED}/quantize.log",
    benchmark:
        f"benchmarks/{variant.QUANTIZED}/quantize.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("quantize"),
    params:
        group_size=lambda wc: int(wc.group_size),
        embeddings=config["quantization"]["embeddings"],
    message:
        "INT8 dynamic activations + INT4 weights, group size {wildcards.group_size}"
    script:
        "../scripts/quantize.py"
