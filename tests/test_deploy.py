"""Deploy and benchmark through a real OpenSSH server on loopback, and on the local target."""

import getpass

import pytest

from conftest import snakemake, write_config
from gemma_edge.artifacts import read_json, sha256_file

VARIANT = "tiny/int4-g128/xnnpack-auto"
INT4 = f"results/{VARIANT}"


@pytest.mark.parametrize("target", ["loopback", "local"])
def test_bench_json_holds_real_figures(deployed, target):
    bench = read_json(deployed["workdir"] / f"results/{target}/bench.json")
    assert bench["schema"] == "gemma-edge.bench/1" and bench["target"] == target
    assert bench["pte"]["sha256"] == sha256_file(deployed["workdir"] / INT4 / "model.pte")
    assert bench["quantization"]["group_size"] == 128
    assert bench["model"]["commit"]
    assert [run["prompt_tokens"] for run in bench["runs"]] == [8, 32]
    for run in bench["runs"]:
        for figure in ("prefill_tps", "decode_tps", "ttft_s"):
            stats = run[figure]
            assert len(stats["samples"]) == 2 and all(s > 0 for s in stats["samples"])
            assert stats["min"] <= stats["median"] <= stats["max"]
    assert bench["load_s"] > 0 and bench["peak_rss_bytes"] > 10_000_000
    assert bench["versions"]["device"]["executorch"] == "1.5.1"
    assert bench["device"]["cores"] >= 1 and bench["device"]["memory_bytes"] > 0


@pytest.mark.parametrize("target", ["loopback", "local"])
def test_device_reproduces_the_host_tokens(deployed, target):
    parity = read_json(deployed["workdir"] / f"results/{target}/parity.json")
    host = read_json(deployed["workdir"] / INT4 / "parity.json")
    assert len(parity["prompts"]) == len(host["prompts"])
    for row, reference in zip(parity["prompts"], host["prompts"]):
        assert row["prompt_ids"] == reference["prompt_ids"]
        assert row["device_tokens"] == reference["pte_tokens"]
    log = (deployed["workdir"] / f"results/{target}/parity.log").read_text()
    assert f"{len(host['prompts'])}/{len(host['prompts'])} prompts identical to the host's run" in log


def test_upload_landed_on_the_device_with_its_hash(deployed):
    record = read_json(deployed["workdir"] / "results/loopback" / VARIANT / "deployed.json")
    pte = record["files"]["pte"]
    assert pte["uploaded"]
    assert sha256_file(pte["path"]) == pte["sha256"]
    assert (deployed["remote"] / "runner/gemma_edge/device_bench.py").exists()
    assert not list(deployed["remote"].rglob("*.tmp-*"))


def test_second_run_does_not_upload_again(deployed):
    result = snakemake(deployed["workdir"], "-n", "results/loopback/bench.json", "--configfile", *deployed["configs"])
    assert "Nothing to be done" in result.stdout + result.stderr
    deployed_json = f"results/loopback/{VARIANT}/deployed.json"
    snakemake(deployed["workdir"], "--cores", "1", deployed_json, "--configfile", *deployed["configs"], "--forcerun", "deploy_loopback")
    record = read_json(deployed["workdir"] / deployed_json)
    assert not record["files"]["pte"]["uploaded"] and not record["files"]["tokenizer"]["uploaded"]


def test_unreachable_device_fails_with_one_sentence_and_no_output(workflow, tmp_path):
    config = write_config(tmp_path / "dead.yaml", {"targets": {"dead": {
        "kind": "ssh", "host": "127.0.0.1", "port": 9, "ssh_config": None, "connect_timeout_s": 3}}})
    result = snakemake(workflow["workdir"], "--cores", "1", "results/dead/bench.json", "--configfile",
                       str(workflow["config"]), str(config), check=False)
    assert result.returncode != 0
    assert f"probe failed: {getpass.getuser()}@127.0.0.1:9 is unreachable" in result.stdout + result.stderr
    assert not (workflow["workdir"] / "results/dead").exists()
