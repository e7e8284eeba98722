"""The heavy host steps through a real single-node SLURM cluster, the device steps local."""

import re

import pytest

import slurm
from conftest import REPO, require, snakemake
from gemma_edge.device.files import read_json


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require(slurm.available())
    started = slurm.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield started
    started.stop()


def test_heavy_steps_run_as_slurm_jobs_and_device_steps_stay_local(deployed, cluster):
    # Group size 64, which the sweep (tests/test_sweep.py, same working directory) then finds built;
    # forced, so the heavy steps go to SLURM whichever test ran first.
    target = "results/local/tiny/int4-g64/xnnpack-auto/bench.json"
    result = snakemake(
        deployed["workdir"],
        "--workflow-profile",
        str(REPO / "profiles/slurm"),
        target,
        "--configfile",
        *deployed["configs"],
        "--forcerun",
        "quantize",
    )
    output = result.stdout + result.stderr
    submitted = set(re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S*/slurm_logs/rule_(\w+)/", output))
    # LiteRT-LM's conversion for group size 64 is a heavy step too, unless the sweep built it first.
    assert {"quantize", "lower", "verify"} <= submitted <= {"quantize", "lower", "verify", "litert_model"}, output[-3000:]
    for local_rule in ("deploy_local", "bench_local"):
        assert re.search(rf"Finished jobid: \d+ \(Rule: {local_rule}\)", output)
    bench = read_json(deployed["workdir"] / target)
    assert bench["quantization"]["group_size"] == 64
    assert bench["parity"]["identical_to_host_pte"] == bench["parity"]["prompts"]
