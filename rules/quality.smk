# What quantization costs in quality: perplexity and KL divergence against eager FP32 on a held-out
# text (gemma_edge.measure.quality), for each .pte variant and for llama.cpp's GGUFs of the same checkpoint,
# on the same token ids. The GGUFs' scores do not depend on the group size, so a group-size change
# re-scores only the new .pte.


rule quality:
    input:
        artifact=rules.lower.output.pte,
        checkpoint=rules.download.output.manifest,
        text=quality_text,
    output:
        quality=report(
            f"results/{variant.VARIANT}/quality.json",
            caption="../report/quality.rst",
            category="Quality",
        ),
        manifest=f"results/{variant.VARIANT}/quality.json.manifest.json",
    log:
        f"logs/{variant.VARIANT}/quality.log",
    benchmark:
        f"benchmarks/{variant.VARIANT}/quality.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("quality"),
    params:
        engine="pte",
        text=quality_text_name,
        settings=quality_settings(),
        gates=config["quality"]["gates"],
        synthetic=is_synthetic,
    message:
        "Perplexity and KL divergence of {input.artifact} against eager FP32"
    script:
        "../scripts/quality.py"


rule quality_gguf:
    input:
        artifact=rules.gguf.output.gguf,
        checkpoint=rules.download.output.manifest,
        text=quality_text,
    output:
        quality=report(
            "results/{model}/llamacpp/quality-{gguf_type}.json",
            caption="../report/quality.rst",
            category="Quality",
        ),
        manifest="results/{model}/llamacpp/quality-{gguf_type}.json.manifest.json",
    log:
        "logs/{model}/llamacpp/quality-{gguf_type}.log",
    benchmark:
        "benchmarks/{model}/llamacpp/quality-{gguf_type}.tsv"
    conda:
        "../envs/perf.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("quality"),
    params:
        engine="llamacpp",
        text=quality_text_name,
        # The .pte's context is its own metadata; the GGUF gets the same, export.max_seq_len.
        settings=quality_settings(context=config["export"]["max_seq_len"]),
        gates=None,
        synthetic=is_synthetic,
    message:
        "Perplexity and KL divergence of llama.cpp's {wildcards.gguf_type} GGUF against eager FP32, on our token ids"
    script:
        "../scripts/quality.py"
