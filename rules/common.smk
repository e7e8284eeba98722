import re

# Paths and config lookups shared by every stage. Artifacts live under results/<model>/<quant>/…
# so that models, group sizes and lowering modes coexist and switching back is free.


wildcard_constraints:
    model=r"[A-Za-z0-9._-]+",
    quant=r"fp32|int4-g\d+",
    mode=r"auto|fused|perop",
    group_size=r"\d+",
    target="|".join(re.escape(t) for t in config["targets"]) or "(?!)",


PER_OP_DIR = {"auto": "auto", True: "perop", False: "fused"}
PER_OP_MODE = {"auto": "auto", "perop": "true", "fused": "false"}
DEMO_HUB = "results/demo-hub"


def model_entry(wildcards):
    return config["models"][wildcards.model]


def quant_dir():
    return f"int4-g{config['quantization']['group_size']}"


def variant_dir():
    """results/<model>/int4-g<N>/xnnpack-<mode> of the configured variant."""
    mode = PER_OP_DIR[config["lowering"]["per_op_mode"]]
    return f"results/{config['model']}/{quant_dir()}/xnnpack-{mode}"


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


def hub_folder_name(repo_id):
    """owner/name as the single path component owner--name."""
    return "--".join(repo_id.split("/"))


def target_settings(wildcards):
    return config["targets"][wildcards.target]


def current_variant_file(name):
    """results/<target>/<model>/<quant>/xnnpack-<mode>/<name> for the configured variant."""

    def path(wildcards):
        return f"results/{wildcards.target}/{variant_dir().removeprefix('results/')}/{name}"

    return path


def sweep_benches():
    sweep = config["sweep"]
    modes = [PER_OP_DIR[m] for m in sweep["per_op_modes"]]
    return [
        f"results/{target}/{config['model']}/int4-g{group}/xnnpack-{mode}/bench.json"
        for target in sweep["targets"]
        for group in sweep["group_sizes"]
        for mode in modes
    ]


for _target in config["targets"]:
    workflow.register_resource(f"device_{_target}", 1)
