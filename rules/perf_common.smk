# Paths, inputs and settings of the performance benchmark's rules (rules/perf.smk): which files
# each engine times, which step costs the table reads, and what the engines' timing depends on.

# The performance benchmark's engines time this host: one at a time, whatever their thread count.
workflow.register_resource("host_bench", 1)


def perf_path():
    return f"results/perf/{variant_dir().removeprefix('results/')}/perf.md"


def projection_path():
    return f"results/perf/projection/{variant_dir().split('/', 2)[2]}/projection.md"


def perf_projection_inputs(wildcards):
    folder = variant.lowered(wildcards.quant, wildcards.mode)
    return [f"results/perf/{model}/{folder}/perf.json" for model in config["perf"]["projection"]["models"]]


def perf_engine_artifact(wildcards):
    """What each engine runs: the .pte, the checkpoint (eager) or the GGUF (llama.cpp)."""
    model, engine_variant = wildcards.model, wildcards.engine_variant
    return {
        "pte": f"results/{model}/{engine_variant}/model.pte",
        "eager": f"results/{model}/checkpoint.json",
        "llamacpp": f"results/{model}/llamacpp/model-{engine_variant}.gguf",
    }[wildcards.engine]


def perf_spec(wildcards):
    """What the engines' timing depends on (and nothing else, so other perf keys re-run nothing)."""
    check_lengths_fit(config, "perf")
    timing = ("threads", "prompt_lengths", "new_tokens", "repetitions", "warmup")
    return {**{key: config["perf"][key] for key in timing}, "max_seq_len": config["export"]["max_seq_len"]}


def perf_engine_results(wildcards):
    """Each timed engine's result file (eager FP32 only with perf.eager)."""
    model, folder = wildcards.model, variant.lowered(wildcards.quant, wildcards.mode)
    results = {
        "pte": f"results/perf/{model}/{folder}/pte.json",
        "eager": f"results/perf/{model}/fp32/eager.json",
        "llamacpp": f"results/perf/{model}/{config['perf']['gguf_type']}/llamacpp.json",
    }
    if not config["perf"]["eager"]:
        del results["eager"]
    if config["perf"]["litert"] and litert_set_up():
        results["litert"] = f"results/perf/{model}/{litert_recipe('int4', wildcards.quant)}/litert.json"
    return results


def perf_table_inputs(wildcards):
    model, folder = wildcards.model, variant.lowered(wildcards.quant, wildcards.mode)
    return {
        **perf_engine_results(wildcards),
        "pte_manifest": f"results/{model}/{folder}/model.pte.manifest.json",
        "gguf_manifest": f"results/{model}/llamacpp/model-{config['perf']['gguf_type']}.gguf.manifest.json",
        "checkpoint": f"results/{model}/checkpoint.json",
    }


def perf_step_benchmarks(wildcards):
    """Per step behind the table: its Snakemake benchmark file (wall time) and the file in which it
    recorded its exact peak RSS (Snakemake's sampled max_rss misses short spikes)."""
    model, quant, mode = wildcards.model, wildcards.quant, wildcards.mode
    entry = config["models"][model]
    gguf_type = config["perf"]["gguf_type"]
    folder = variant.lowered(quant, mode)
    steps = {}
    if entry["demo"]:
        repo = hub_folder_name(entry["repo_id"])
        steps["build checkpoint"] = (f"benchmarks/demo/{repo}.tsv", f"{DEMO_HUB}/{repo}.json")
    steps["download"] = (f"benchmarks/{model}/download.tsv", None)
    steps["export"] = (f"benchmarks/{model}/fp32/export.tsv", f"results/{model}/fp32/program.pt2.manifest.json")
    if quant != "fp32":
        steps["quantize"] = (f"benchmarks/{model}/{quant}/quantize.tsv", f"results/{model}/{quant}/program.pt2.manifest.json")
    steps["lower"] = (f"benchmarks/{model}/{folder}/lower.tsv", f"results/{model}/{folder}/model.pte.manifest.json")
    steps[f"gguf ({gguf_type})"] = (
        f"benchmarks/{model}/llamacpp/gguf-{gguf_type}.tsv",
        f"results/{model}/llamacpp/model-{gguf_type}.gguf.manifest.json",
    )
    results = perf_engine_results(wildcards)
    if "litert" in results:
        recipe = litert_recipe("int4", quant)
        steps[f"litert ({recipe})"] = (
            f"benchmarks/{model}/litert/model-{recipe}.tsv",
            f"results/{model}/litert/model-{recipe}.litertlm.manifest.json",
        )
    engines = (("bench .pte", "pte"), ("bench eager", "eager"), ("bench llama.cpp", "llamacpp"), ("bench LiteRT-LM", "litert"))
    for name, engine in engines:
        if engine in results:  # results/perf/… and benchmarks/perf/… mirror each other (rule perf_engine).
            steps[name] = (results[engine].replace("results/", "benchmarks/", 1).replace(".json", ".tsv"), results[engine])
    return {name: {"benchmark": tsv, "peak_from": peak} for name, (tsv, peak) in steps.items()}
