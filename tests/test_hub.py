"""The download step's real huggingface_hub code against caches the tests lay out themselves."""

import shutil

import pytest

from conftest import TEST_REPO_ID
from gemma_edge import hub, pipeline
from gemma_edge.artifacts import ArtifactError, read_json


def test_seeded_cache_resolves_offline_to_its_commit(seeded_hub, tmp_path):
    cache, commit = seeded_hub
    manifest = pipeline.download(TEST_REPO_ID, "main", str(cache), True, None, tmp_path / "checkpoint.json")
    assert manifest["commit"] == commit
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert read_json(tmp_path / "checkpoint.json")["files"]["model.safetensors"]["sha256"] == manifest["files"]["model.safetensors"]["sha256"]


def test_revision_can_be_the_commit_sha(seeded_hub, tmp_path):
    cache, commit = seeded_hub
    manifest = pipeline.download(TEST_REPO_ID, commit, str(cache), True, None, tmp_path / "checkpoint.json")
    assert manifest["commit"] == commit


def test_offline_with_an_empty_cache_says_so(tmp_path):
    with pytest.raises(hub.DownloadError, match="is not in .* and the hub cannot be reached \\(offline\\)"):
        pipeline.download("google/gemma-4-E2B", "main", str(tmp_path / "empty"), True, None, tmp_path / "checkpoint.json")
    assert not (tmp_path / "checkpoint.json").exists()


def test_local_path_is_hashed_in_place(demo_checkpoint, tmp_path):
    manifest = pipeline.download("local/anything", "main", None, True, str(demo_checkpoint), tmp_path / "c.json")
    assert manifest["commit"] is None and manifest["path"] == str(demo_checkpoint)


def test_checkpoint_without_tokenizer_is_refused(demo_checkpoint, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(demo_checkpoint, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(hub.DownloadError, match="lacks tokenizer.json"):
        hub.describe_checkpoint(folder)


def test_corrupted_checkpoint_file_is_caught(demo_checkpoint, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(demo_checkpoint, folder)
    manifest = pipeline.download("local/copy", "main", None, True, str(folder), tmp_path / "c.json")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors is corrupt"):
        pipeline.load_checkpoint(tmp_path / "c.json")
    assert manifest["files"]["model.safetensors"]["sha256"] != hub.describe_checkpoint(folder)["model.safetensors"]["sha256"]
