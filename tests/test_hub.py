"""The download step's real huggingface_hub code against caches the tests lay out themselves."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TEST_REPO_ID
from gemma_edge.device.files import ArtifactError, read_json
from gemma_edge.model import checkpoint, hub
from gemma_edge.steps import host


def test_seeded_cache_resolves_offline_to_its_commit(seeded_hub, tmp_path):
    cache, commit = seeded_hub
    manifest = host.download(TEST_REPO_ID, "main", str(cache), True, None, tmp_path / "checkpoint.json")
    assert manifest["commit"] == commit
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert (
        read_json(tmp_path / "checkpoint.json")["files"]["model.safetensors"]["sha256"]
        == manifest["files"]["model.safetensors"]["sha256"]
    )


def test_revision_can_be_the_commit_sha(seeded_hub, tmp_path):
    cache, commit = seeded_hub
    manifest = host.download(TEST_REPO_ID, commit, str(cache), True, None, tmp_path / "checkpoint.json")
    assert manifest["commit"] == commit


def test_offline_with_an_empty_cache_says_so(tmp_path):
    with pytest.raises(hub.DownloadError, match="is not in .* and the hub cannot be reached \\(offline\\)"):
        host.download("google/gemma-4-E2B", "main", str(tmp_path / "empty"), True, None, tmp_path / "checkpoint.json")
    assert not (tmp_path / "checkpoint.json").exists()


def test_local_path_is_hashed_in_place(demo_checkpoint, tmp_path):
    manifest = host.download("local/anything", "main", None, True, str(demo_checkpoint), tmp_path / "c.json")
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
    manifest = host.download("local/copy", "main", None, True, str(folder), tmp_path / "c.json")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors is corrupt"):
        checkpoint.load_checkpoint(tmp_path / "c.json")
    assert manifest["files"]["model.safetensors"]["sha256"] != hub.describe_checkpoint(folder)["model.safetensors"]["sha256"]


def test_truncated_blob_in_the_cache_is_named_and_reseeding_repairs_it(demo_checkpoint, tmp_path):
    cache = tmp_path / "hub"
    commit = hub.seed_hub_cache(demo_checkpoint, cache, TEST_REPO_ID)
    blob = (cache / "models--tests--gemma4-tiny/snapshots" / commit / "model.safetensors").resolve()
    with open(blob, "r+b") as handle:
        handle.truncate(blob.stat().st_size // 2)
    out = tmp_path / "checkpoint.json"
    with pytest.raises(hub.DownloadError) as failure:
        host.download(TEST_REPO_ID, "main", str(cache), True, None, out, demo=True)
    assert f"the cached model.safetensors ({blob}) is corrupt" in str(failure.value)
    assert "snakemake --forcerun demo_checkpoint" in str(failure.value)
    assert not out.exists(), "nothing may record a corrupt checkpoint as good"
    assert hub.seed_hub_cache(demo_checkpoint, cache, TEST_REPO_ID) == commit
    manifest = host.download(TEST_REPO_ID, "main", str(cache), True, None, out, demo=True)
    assert manifest["files"]["model.safetensors"]["sha256"] == blob.name


def test_corrupt_hub_file_names_the_command_that_downloads_it_again(tmp_path):
    """A small file is kept in git: its blob is named by git's sha1 of it, not by sha256."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--model/snapshots/0123456789abcdef0123456789abcdef01234567"
    config = b'{"model_type": "gemma4_text"}\n'
    blob = cache / "models--org--model/blobs" / hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(config)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(os.path.relpath(blob, snapshot))
    repair = hub.repair_command("org/model", snapshot.name, str(cache), demo=False)
    hub.check_cached_files(snapshot, repair)  # intact
    blob.write_bytes(config[:-2])
    with pytest.raises(
        hub.DownloadError,
        match=r"the cached config.json .* is corrupt.*repair it with `hf download org/model "
        r"config.json --revision 0123456789abcdef0123456789abcdef01234567 --cache-dir .* --force-download`",
    ):
        hub.check_cached_files(snapshot, repair)


class _HubStandIn:
    """A loopback HTTP server answering every hub API call with one error, as the hub does."""

    def __init__(self, status: int, error_code: str):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                self.send_response(status)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", f"{error_code} (loopback stand-in)")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


def _download_against(url: str, tmp_path) -> subprocess.CompletedProcess:
    code = (
        "import sys; sys.path.insert(0, 'src'); from gemma_edge.steps import host; "
        f"host.download('google/gemma-4-E2B', 'main', {str(tmp_path / 'cache')!r}, False, None, {str(tmp_path / 'c.json')!r})"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update({"HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home")})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    "status, error_code, message",
    [
        (401, "GatedRepo", "is a gated model: accept its licence on its Hugging Face page, then set HF_TOKEN"),
        (404, "RepoNotFound", "was not found on the Hugging Face hub (or is private)"),
    ],
)
def test_hub_refusals_are_explained(tmp_path, status, error_code, message):
    hub_stand_in = _HubStandIn(status, error_code)
    try:
        result = _download_against(hub_stand_in.url, tmp_path)
    finally:
        hub_stand_in.close()
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "c.json").exists()
