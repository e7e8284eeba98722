"""Byte-identical artifacts: the same config, pins and machine give the same program.pt2 and .pte
bytes, and nothing inside an artifact or manifest names the working directory or this checkout, so
a moved working directory re-runs nothing."""

import os
import shutil
import sys

import pytest
import yaml

from conftest import REPO, TEST_REPO_ID, WORKFLOW_TARGETS, snakemake, write_config
from gemma_edge.build.export import relative_stack_trace
from gemma_edge.device.files import read_json, sha256_file
from gemma_edge.steps import host

PTE = "results/tiny/int4-g128/xnnpack-auto/model.pte"
ARTIFACTS = ["results/tiny/fp32/program.pt2", "results/tiny/int4-g128/program.pt2", PTE]


@pytest.fixture(scope="module")
def rebuilt(workflow, tmp_path_factory):
    """A second build from nothing in a fresh working directory, same config (export, quantize,
    lower; the session's `workflow` run is the first). The caller's own hash seed differs on
    purpose: the workflow fixes the steps' seed whatever the environment says."""
    workdir = tmp_path_factory.mktemp("rebuilt")
    config = write_config(workdir / "test-config.yaml", yaml.safe_load(workflow["config"].read_text()))
    snakemake(workdir, "--cores", "2", PTE, "--configfile", str(config), env={"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "1"})
    return workdir


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_a_second_build_from_nothing_gives_the_same_bytes(workflow, rebuilt, artifact):
    first, second = sha256_file(workflow["workdir"] / artifact), sha256_file(rebuilt / artifact)
    assert first == second, f"{artifact}: {first} on the first build, {second} on the second"
    assert read_json(rebuilt / f"{artifact}.manifest.json")["sha256"] == second


def test_a_moved_working_directory_reruns_nothing_and_names_neither_place(workflow, tmp_path):
    """Copy the finished working directory (timestamps kept, as `cp -a` does) and dry-run the same
    targets there: nothing to do. No artifact or manifest names the old working directory, this
    checkout or the virtualenv (the test config's hub cache, outside the working directory, is the
    user's input and may be named)."""
    source, moved = workflow["workdir"], tmp_path / "moved"
    keep = {".snakemake", "results", "logs", "benchmarks", workflow["config"].name}

    def ignore(folder, names):  # only what the fixture's targets need, not later tests' extras
        if os.path.samefile(folder, source):
            return [n for n in names if n not in keep]
        return [n for n in names if n != "tiny"] if os.path.samefile(folder, source / "results") else []

    shutil.copytree(source, moved, symlinks=True, ignore=ignore)
    result = snakemake(moved, "-n", *WORKFLOW_TARGETS, "--configfile", str(moved / workflow["config"].name))
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-3000:]
    places = {str(source), os.path.realpath(source), str(REPO), os.path.realpath(REPO), sys.prefix, os.path.realpath(sys.prefix)}
    for path in sorted((moved / "results").rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            named = sorted(place for place in places if place.encode() in data)
            assert not named, f"{path.relative_to(moved)} names {named}"


def test_a_hub_cache_inside_the_working_directory_is_recorded_relative(seeded_hub, tmp_path, monkeypatch):
    """The demo's hub cache (results/demo-hub) lives in the working directory; snapshot_download
    reports it as an absolute path, which the download manifest must not keep."""
    cache, commit = seeded_hub
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache, "results/demo-hub", symlinks=True)
    manifest = host.download(TEST_REPO_ID, "main", "results/demo-hub", True, None, tmp_path / "checkpoint.json")
    assert manifest["path"] == f"results/demo-hub/models--{TEST_REPO_ID.replace('/', '--')}/snapshots/{commit}"
    assert read_json(tmp_path / "checkpoint.json")["path"] == manifest["path"]


def test_stack_traces_name_files_relative_to_their_import_root():
    roots = ["/venv/lib/python3.11/site-packages", "/checkout/src"]
    trace = (
        'File "/checkout/src/gemma_edge/model/decoder.py", line 358, in forward\n    x = f(y)\n'
        'File "/venv/lib/python3.11/site-packages/transformers/activations.py", line 7, in g\n'
        'File "/elsewhere/tool.py", line 1, in h\nFile "<eval_with_key>.3", line 5, in forward'
    )
    assert relative_stack_trace(trace, roots) == (
        'File "gemma_edge/model/decoder.py", line 358, in forward\n    x = f(y)\n'
        'File "transformers/activations.py", line 7, in g\n'
        'File "tool.py", line 1, in h\nFile "<eval_with_key>.3", line 5, in forward'
    )
