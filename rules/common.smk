import json
import re

from gemma_edge.peers.gguf_convert import GGUF_TYPES
from gemma_edge.workflow import variant
from gemma_edge.workflow.config import (
    HOUSEKEEPING_KEYS,
    check_lengths_fit,
    check_prompts_fit,
    checkpoint_prompt_counts,
    requirement_pins,
    step_memory_mb,
)

# Paths and config lookups shared by every stage. Artifacts live under results/<model>/<quant>/…
# so that models, group sizes and lowering modes coexist and switching back is free.


wildcard_constraints:
    model=r"[A-Za-z0-9._-]+",
    quant=variant.QUANT_PATTERN,
    mode=variant.MODE_PATTERN,
    group_size=r"\d+",
    target="|".join(re.escape(t) for t in config["targets"]) or "(?!)",
    engine=r"pte|eager|llamacpp",
    engine_variant="|".join([variant.lowered(f"({variant.QUANT_PATTERN})", f"({variant.MODE_PATTERN})"), "fp32", *GGUF_TYPES]),
    gguf_type="|".join(GGUF_TYPES),
    litert_recipe=rf"int8|{variant.QUANT_PATTERN}",


DEMO_HUB = "results/demo-hub"


def model_entry(wildcards):
    return config["models"][wildcards.model]


def memory_mb(step):
    """A heavy step's mem_mb resource, per model (models.<name>.memory_mb over memory_mb)."""
    return lambda wildcards: step_memory_mb(config, wildcards.model, step)


def quant_dir():
    return variant.quant_dir(config["quantization"]["group_size"])


def variant_dir():
    """results/<model>/int4-g<N>/xnnpack-<mode> of the configured variant."""
    configured = variant.variant_dir(config["model"], config["quantization"]["group_size"], config["lowering"]["per_op_mode"])
    return f"results/{configured}"


def swept_variants():
    """<model>/int4-g<N>/xnnpack-<mode> of each variant the sweep takes."""
    sweep = config["sweep"]
    return [variant.variant_dir(config["model"], group, mode) for group in sweep["group_sizes"] for mode in sweep["per_op_modes"]]


def parity_path():
    return f"{variant_dir()}/parity.json"


def hub_cache(wildcards):
    entry = model_entry(wildcards)
    return DEMO_HUB if entry["demo"] else entry["hub_cache"]


def demo_marker(wildcards):
    entry = model_entry(wildcards)
    if not entry["demo"]:
        return []
    return f"{DEMO_HUB}/{hub_folder_name(entry['repo_id'])}.json"


def demo_entry(wildcards):
    """The `models` entry that a results/demo-hub/<owner--name>.json marker builds."""
    for entry in config["models"].values():
        if entry["demo"] and hub_folder_name(entry["repo_id"]) == wildcards.repo:
            return entry
    raise ValueError(f"no demo model in config models has the repo id {wildcards.repo.replace('--', '/', 1)}")


def hub_folder_name(repo_id):
    """owner/name as the single path component owner--name."""
    return "--".join(repo_id.split("/"))


def device_settings(target):
    """A target's settings as its steps' params: without the housekeeping keys (keep_models, …),
    which the step scripts read from the config themselves, so that changing one re-runs nothing."""
    return {key: value for key, value in config["targets"][target].items() if key not in HOUSEKEEPING_KEYS}


def target_settings(wildcards):
    return device_settings(wildcards.target)


def runtime_pins():
    """The executorch and torch releases pinned in requirements.txt (the ones the .pte is lowered
    with), which every device's wheelhouse pins: a change of either re-runs the wheelhouse steps.
    Read from the pins, not the running interpreter, so that Snakemake itself needs neither
    installed (--sdm conda)."""
    pins = requirement_pins(Path(workflow.basedir) / "requirements.txt")
    return {name: pins[name] for name in ("executorch", "torch")}


def provision_inputs(wildcards):
    """An SSH device is probed first; one that gets a virtualenv needs its wheelhouse too."""
    settings = config["targets"][wildcards.target]
    if settings["kind"] == "local":
        return {}
    inputs = {"platform": f"results/{wildcards.target}/platform.json"}
    if settings["create_venv"]:
        inputs["wheelhouse"] = f"results/{wildcards.target}/wheelhouse.json"
        inputs["wheels"] = f"results/{wildcards.target}/wheelhouse"
    return inputs


def current_variant_file(name):
    """results/<target>/<model>/<quant>/xnnpack-<mode>/<name> for the configured variant."""

    def path(wildcards):
        return f"results/{wildcards.target}/{variant_dir().removeprefix('results/')}/{name}"

    return path


def sweep_benches():
    return [f"results/{target}/{swept}/bench.json" for target in config["sweep"]["targets"] for swept in swept_variants()]


def sweep_qualities():
    """Each swept variant's quality.json, and the GGUFs' (bench.peers.llamacpp) when llama.cpp is set up."""
    paths = [f"results/{swept}/quality.json" for swept in swept_variants()]
    if Path(llamacpp_converter()).is_file():
        paths += [
            f"results/{config['model']}/llamacpp/quality-{gguf_type}.json" for gguf_type in config["bench"]["peers"]["llamacpp"]
        ]
    return paths


# The quality step (rules/quality.smk).


def quality_text_name(wildcards):
    """The held-out text as configured: the demo model's own (text like its training corpus, not in
    it) for a trained demo model, quality.text for any other."""
    entry = model_entry(wildcards)
    return config["quality"]["demo_text" if entry["demo"] and not entry["synthetic"] else "text"]


def workflow_file(path) -> str:
    """A path as configured, a relative one taken from the workflow's folder (where resources/,
    bench/ and the virtualenvs are), written relative to the working directory when it lies inside
    it. Snakemake records inputs as written: run in the checkout, as the README does, a copy of
    the whole folder (cp -a) then finds the same inputs and re-runs nothing."""
    path = Path(path).expanduser()
    path = path if path.is_absolute() else Path(workflow.basedir).resolve() / path
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def quality_text(wildcards):
    """quality_text_name, relative paths taken from the workflow folder (workflow_file)."""
    return workflow_file(quality_text_name(wildcards))


def quality_settings(**extra):
    return {"max_tokens": config["quality"]["max_tokens"], "scored_positions": config["quality"]["scored_positions"], **extra}


def is_synthetic(wildcards):
    """A randomly initialised model: its quality figures would mean nothing (the step says so)."""
    return bool(model_entry(wildcards)["synthetic"])


for _target in config["targets"]:
    workflow.register_resource(f"device_{_target}", 1)


def llamacpp_converter():
    return workflow_file(config["perf"]["llamacpp_converter"])


def llamacpp_version():
    """The llama-cpp-python release requirements-bench.txt pins (its source carries llama.cpp's)."""
    return requirement_pins(Path(workflow.basedir) / "requirements-bench.txt")["llama-cpp-python"]


def llamacpp_sdist():
    """The source distribution bench/setup-llamacpp.sh downloads: llama-bench is built from it."""
    return workflow_file(f".bench/llama_cpp_python-{llamacpp_version()}.tar.gz")


def litert_python():
    return workflow_file(config["perf"]["litert_python"])


def litert_set_up():
    """LiteRT-LM's converter is there: in its virtualenv (bench/setup-litert.sh), or in
    envs/litert.yaml's environment when rules run in their conda environments (--sdm conda)."""
    from snakemake_interface_executor_plugins.settings import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method or Path(litert_python()).is_file()


def litert_requirements():
    return workflow_file("requirements-litert.txt")


def litert_recipe(recipe, quant):
    """bench.peers.litert's `int4` takes the benchmarked variant's group size, so LiteRT-LM's INT4
    blocks match the .pte's groups; fp32 and int8 are recipes of their own."""
    if recipe != "int4":
        return recipe
    return quant if variant.group_size_of(quant) else quant_dir()


def peer_plan(target):
    """The peers a target benchmarks beside the .pte (bench.peers): per GGUF type and LiteRT-LM
    recipe, the engine's program for the target and the model file, or why the engine cannot run
    (its host set-up missing)."""

    def plan(wildcards):
        peers = []
        unset = (
            None
            if Path(llamacpp_converter()).is_file()
            else "llama.cpp is not set up on this host: run bench/setup-llamacpp.sh once"
        )
        for gguf_type in config["bench"]["peers"]["llamacpp"]:
            peer = {"name": f"llamacpp-{gguf_type}", "engine": "llamacpp", "gguf_type": gguf_type}
            if unset:
                peer["reason"] = unset
            else:
                peer["program"] = f"results/{target}/llamacpp/llama-bench.json"
                peer["model"] = f"results/{wildcards.model}/llamacpp/model-{gguf_type}.gguf"
            peers.append(peer)
        unset = None if litert_set_up() else "LiteRT-LM is not set up on this host: run bench/setup-litert.sh once"
        for recipe in config["bench"]["peers"]["litert"]:
            recipe = litert_recipe(recipe, wildcards.quant)
            peer = {
                "name": f"litert-{recipe}",
                "engine": "litert",
                "recipe": recipe,
                "max_seq_len": config["export"]["max_seq_len"],
            }
            if unset:
                peer["reason"] = unset
            else:
                peer["program"] = f"results/{target}/litert/runtime.json"
                peer["model"] = f"results/{wildcards.model}/litert/model-{recipe}.litertlm"
            peers.append(peer)
        return peers

    return plan


def peer_files(target):
    """The files `peer_plan` names, as the deploy step's inputs."""

    def files(wildcards):
        peers = [peer for peer in peer_plan(target)(wildcards) if "program" in peer]
        return sorted({path for peer in peers for path in (peer["program"], peer["model"])})

    return files


def verify_prompts(wildcards):
    """verify.prompts, each checked against export.max_seq_len with the model's own tokenizer once it
    is downloaded (the check runs as Snakemake builds the jobs, so only when verify is needed).
    Before the download only a lower bound is known: the context_check step (rules/export.smk)
    then counts them as soon as the tokenizer exists, before the model's first export."""
    prompts = config["verify"]["prompts"]
    counts = checkpoint_prompt_counts(f"results/{wildcards.model}/checkpoint.json", prompts)
    check_prompts_fit(prompts, counts, config["verify"]["max_new_tokens"], config["export"]["max_seq_len"])
    return prompts


def bench_settings(wildcards):
    """The bench section, checked against export.max_seq_len when a device benchmark is needed."""
    check_lengths_fit(config, "bench")
    return config["bench"]
