"""Bad configuration stops the run before any job, with one sentence naming the key."""

import copy
import re

import pytest
import yaml

from conftest import DEFAULT_CONFIG, REPO, TEST_REPO_ID, snakemake, write_config
from gemma_edge.workflow.config import load_schema, step_memory_mb, validate_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"quantization": {"grop_size": 64}}, "unknown key quantization.grop_size"),
        ({"colour": "blue"}, "unknown key colour"),
        ({"export": {"dtype": "float32"}}, "export.dtype was removed: the export is always float32"),
        ({"export": {"max_seq_len": "long"}}, "export.max_seq_len is 'long', but must be of type integer"),
        ({"quantization": {"group_size": 100}}, "quantization.group_size is 100, but must be one of 32, 64, 128, 256"),
        ({"export": {"attention": "flash"}}, "export.attention is 'flash', but must be one of executorch, transformers"),
        ({"lowering": {"per_op_mode": "sometimes"}}, "lowering.per_op_mode is 'sometimes', but must be one of auto, true, false"),
        ({"lowering": {"decode_method": "always"}}, "lowering.decode_method is 'always', but must be one of auto, true, false"),
        (
            {"quality": {"scored_positions": "middle"}},
            "quality.scored_positions is 'middle', but must be one of all, second_half",
        ),
        ({"quality": {"gates": {"max_mean_kl": "small"}}}, "quality.gates.max_mean_kl is 'small', but must be of type"),
        (
            {"model": "nope"},
            f"model is 'nope', which is not an entry of models (known: {', '.join(sorted(DEFAULT_CONFIG['models']))})",
        ),
        ({"models": {"broken": {"revision": "main"}}}, "models.broken is missing the required key 'repo_id'"),
        (
            {"models": {"demo": {"repo_id": "local/gemma4-tiny", "demo": True, "synthetic": {"shape": "e2b", "layers": 2}}}},
            "models.demo.synthetic.layers: 2 is less than the minimum of 3",
        ),
        (
            {"models": {"demo": {"repo_id": "local/gemma4-tiny", "local_path": "/no/such/folder"}}},
            "models.demo.local_path '/no/such/folder' is not a directory",
        ),
    ],
)
def test_bad_config_gives_one_clear_sentence(tmp_path, overrides, message):
    config = write_config(tmp_path / "bad.yaml", overrides)
    result = snakemake(tmp_path, "-n", "--configfile", str(config), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-2000:]
    assert "Job stats" not in output
    assert "ConfigError in file" not in output  # the sentence alone, not Snakemake's frame around it
    assert not (tmp_path / "results").exists()


def test_keys_left_out_take_the_schemas_defaults_in_every_models_entry():
    """Snakemake's validate(set_default=True) fills them: in a model entry given only its repo, in a
    synthetic shape given no layers, and not into a synthetic left null (a trained demo model)."""
    config = copy.deepcopy(DEFAULT_CONFIG)
    config["models"]["shape"] = {"repo_id": "local/shape", "demo": True, "synthetic": {"shape": "e2b"}}
    config["models"]["plain"] = {"repo_id": "org/model"}
    del config["export"]["max_seq_len"]
    filled = validate_config(config, REPO / "schemas/config.schema.yaml")
    assert filled is config
    assert config["models"]["shape"]["synthetic"] == {"shape": "e2b", "layers": 4}
    assert config["models"]["plain"] == {
        "repo_id": "org/model",
        "revision": "main",
        "local_path": None,
        "hub_cache": None,
        "offline": False,
        "demo": False,
        "synthetic": None,
    }
    assert config["export"]["max_seq_len"] == 128


def test_full_size_models_reserve_their_own_memory_so_no_two_heavy_steps_share_the_host():
    """The top-level memory_mb fits the demo model; E2B's entries carry their measured peaks, and any
    two of those exceed the default profile's mem_mb, so Snakemake runs them one at a time."""
    config = validate_config(copy.deepcopy(DEFAULT_CONFIG), REPO / "schemas/config.schema.yaml")
    cap = int(
        next(
            r for r in yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())["resources"] if r.startswith("mem_mb=")
        ).split("=")[1]
    )
    heavy = ("export", "quantize", "lower", "gguf")
    for model in ("e2b-35l", "gemma-4-E2B"):
        peaks = [step_memory_mb(config, model, step) for step in heavy]
        assert min(peaks) * 2 > cap, (model, peaks)
    assert step_memory_mb(config, "e2b-35l", "lower") > config["memory_mb"]["lower"]
    assert [step_memory_mb(config, "demo", step) for step in heavy] == [config["memory_mb"][step] for step in heavy]
    assert step_memory_mb(config, "demo", "lower") * 2 < cap  # two demo lowerings fit side by side


def test_configfile_override_changes_nested_value(tmp_path):
    """The documented way to override a nested key: a second --configfile, merged over config.yaml."""
    config = write_config(tmp_path / "g64.yaml", {"quantization": {"group_size": 64}})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert "results/demo/int4-g64/xnnpack-auto/parity.json" in result.stdout
    assert "int4-g128" not in result.stdout


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, "--lint", check=False)
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize(
    "overrides, targets, message",
    [
        (
            {"perf": {"prompt_lengths": [120]}},
            ["perf"],
            "perf.prompt_lengths + perf.new_tokens (152) exceed export.max_seq_len (128)",
        ),
        (
            {"bench": {"prompt_lengths": [120]}},
            ["results/local/bench.json"],
            "bench.prompt_lengths + bench.new_tokens (152) exceed export.max_seq_len (128)",
        ),
        (
            {"export": {"max_seq_len": 16}},
            [],
            "verify.prompts[0] ('Describe the usual properties of', at least 2 tokens) plus "
            "verify.max_new_tokens (16) exceed export.max_seq_len (16)",
        ),
    ],
)
def test_lengths_that_do_not_fit_the_context_stop_the_run_before_any_job(tmp_path, overrides, targets, message):
    config = write_config(tmp_path / "long.yaml", overrides)
    result = snakemake(tmp_path, "-n", *targets, "--configfile", str(config), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output, output[-2000:]
    assert "Job stats" not in output
    assert "InputFunctionException" not in output and "Traceback" not in output  # the sentence alone


@pytest.mark.parametrize("overrides", [{"perf": {"prompt_lengths": [120]}}, {"bench": {"prompt_lengths": [120]}}])
def test_lengths_of_steps_not_requested_are_not_held_against_the_run(tmp_path, overrides):
    config = write_config(tmp_path / "long.yaml", overrides)
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert "verify" in result.stdout


def test_verify_prompts_are_counted_with_the_models_tokenizer(seeded_hub, tmp_path):
    """Once the checkpoint is downloaded its tokenizer counts each prompt exactly: the default
    prompts take 7 to 16 positions, so 8 new tokens do not fit 12 even though 2 + 8 would."""
    cache, _ = seeded_hub
    config = write_config(
        tmp_path / "short.yaml",
        {
            "model": "tiny",
            "export": {"max_seq_len": 12},
            "verify": {"max_new_tokens": 8},
            "models": {"tiny": {"repo_id": TEST_REPO_ID, "hub_cache": str(cache), "offline": True}},
        },
    )
    before = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert "verify" in before.stdout  # without the tokenizer only the lower bound (2 + 8 <= 12) applies
    snakemake(tmp_path, "--cores", "1", "results/tiny/checkpoint.json", "--configfile", str(config))
    result = snakemake(tmp_path, "-n", "--configfile", str(config), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(
        r"verify.prompts\[0\] \('Describe the usual properties of', \d+ tokens\) plus verify.max_new_tokens \(8\) "
        r"exceed export.max_seq_len \(12\)",
        output,
    ), output[-2000:]


def test_the_schema_offers_the_gguf_types_the_converter_knows():
    """The schema's gguf_type and the converter's table (rules/common.smk's wildcard too) agree."""
    from gemma_edge.peers.gguf_convert import GGUF_TYPES

    assert load_schema(REPO / "schemas/config.schema.yaml")["$defs"]["gguf_type"]["enum"] == list(GGUF_TYPES)


def test_a_target_read_from_a_bare_entry_takes_the_schemas_defaults():
    """Target.of fills what an entry leaves out with its own defaults: they are the schema's, so a
    target built outside the workflow (tests, the emulator's helper) behaves as a configured one."""
    from gemma_edge.reach.target import Target

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["targets"]["pi"] = {"kind": "ssh", "host": "pi"}
    validate_config(config, REPO / "schemas/config.schema.yaml")
    assert Target.of("pi", config["targets"]["pi"]) == Target.of("pi", {"kind": "ssh", "host": "pi"})
    target = Target.of("pi", config["targets"]["pi"])
    assert target.layout.python == "gemma-edge/venv/bin/python" and target.layout.models == "gemma-edge/models"
    assert target.ssh.host == "pi" and target.ssh.connect_timeout_s == config["targets"]["pi"]["connect_timeout_s"]
