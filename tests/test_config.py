"""Bad configuration stops the run before any job, with one sentence naming the key."""

import pytest

from conftest import snakemake, write_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"quantization": {"grop_size": 64}}, "unknown key quantization.grop_size"),
        ({"colour": "blue"}, "unknown key colour"),
        ({"export": {"max_seq_len": "long"}}, "export.max_seq_len is 'long', but must be of type integer"),
        ({"quantization": {"group_size": 100}}, "quantization.group_size is 100, but must be one of 32, 64, 128, 256"),
        ({"export": {"attention": "flash"}}, "export.attention is 'flash', but must be one of executorch, transformers"),
        ({"lowering": {"per_op_mode": "sometimes"}}, "lowering.per_op_mode is 'sometimes', but must be one of auto, true, false"),
        ({"model": "nope"}, "model is 'nope', which is not an entry of models (known: demo, e2b-35l, e2b-4l, e2b-8l, gemma-4-E2B)"),
        ({"models": {"broken": {"revision": "main"}}}, "models.broken is missing the required key 'repo_id'"),
        ({"perf": {"prompt_lengths": [120]}}, "perf.prompt_lengths + perf.new_tokens (152) exceed export.max_seq_len (128)"),
        ({"models": {"demo": {"repo_id": "local/gemma4-tiny", "demo": True, "synthetic": {"shape": "e2b", "layers": 2}}}},
         "models.demo.synthetic.layers: 2 is less than the minimum of 3"),
        ({"models": {"demo": {"repo_id": "local/gemma4-tiny", "local_path": "/no/such/folder"}}},
         "models.demo.local_path '/no/such/folder' is not a directory"),
    ],
)
def test_bad_config_gives_one_clear_sentence(tmp_path, overrides, message):
    config = write_config(tmp_path / "bad.yaml", overrides)
    result = snakemake(tmp_path, "-n", "--configfile", str(config), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-2000:]
    assert "Job stats" not in output
    assert not (tmp_path / "results").exists()


def test_configfile_override_changes_nested_value(tmp_path):
    """The documented way to override a nested key: a second --configfile, merged over config.yaml."""
    config = write_config(tmp_path / "g64.yaml", {"quantization": {"group_size": 64}})
    result = snakemake(tmp_path, "-n", "--configfile", str(config))
    assert "results/demo/int4-g64/xnnpack-auto/parity.json" in result.stdout
    assert "int4-g128" not in result.stdout


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, "--lint", check=False)
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr, result.stdout + result.stderr
