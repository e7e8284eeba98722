"""Atomic artifact writing, hashing and the JSON manifest each artifact carries."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import sys
from pathlib import Path

MANIFEST_SUFFIX = ".manifest.json"
TRACKED_PACKAGES = ("torch", "executorch", "torchao", "transformers", "huggingface_hub", "tokenizers", "safetensors")


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt or does not match its manifest."""


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_rss_bytes() -> int:
    """Peak resident memory so far of this process or of any child it waited for (a converter
    subprocess, say), whichever is larger. Exact, unlike sampling, which misses short spikes."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return scale * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def temp_path_for(path: Path) -> Path:
    """A hidden name beside `path` that keeps its suffix (torch.export.load wants a .pt2 name)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: Path):
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    Whatever fails inside the block (including a full disk) leaves neither the temporary file
    nor a partial `path` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        if error.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise ArtifactError(f"disk full while writing {path} ({free / 1e6:.1f} MB free on that filesystem)") from error
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if Path(path).is_dir():
            shutil.rmtree(path)
        else:
            os.remove(path)


def portable_path(path) -> str:
    """`path` relative to the working directory if it lies inside it, else absolute.

    What a step records about files of its own working directory (a hub cache it seeded, an
    artifact) must not name that directory, or a copied working directory would point back into
    the original; a path outside it (a user's hub cache, a local checkpoint folder) is kept whole.
    """
    absolute = os.path.abspath(path)
    for here, there in ((os.getcwd(), absolute), (os.path.realpath(os.getcwd()), os.path.realpath(absolute))):
        if there == here or there.startswith(here.rstrip(os.sep) + os.sep):
            return os.path.relpath(there, here)
    return absolute


def write_json(path: Path, payload) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def manifest_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def write_manifest(artifact: Path, inputs: dict, params: dict, extra: dict | None = None, manifest: Path | None = None) -> dict:
    """Describe `artifact`: its sha256, the sha256 of each input, the params and package versions."""
    artifact = Path(artifact)
    payload = {
        "artifact": artifact.name,
        "sha256": sha256_file(artifact),
        "size_bytes": artifact.stat().st_size,
        "inputs": {name: {"path": portable_path(p), "sha256": sha256_file(p)} for name, p in inputs.items()},
        "params": params,
        "versions": package_versions(),
        "peak_rss_mb": peak_rss_mb(),  # of the step that made the artifact, up to now
    }
    if extra:
        payload.update(extra)
    write_json(manifest or manifest_path(artifact), payload)
    return payload


def verify_against_manifest(artifact: Path, manifest: Path | None = None) -> dict:
    """Check `artifact` against the sha256 its manifest recorded; raise ArtifactError on mismatch."""
    artifact = Path(artifact)
    manifest = Path(manifest or manifest_path(artifact))
    if not artifact.exists():
        raise ArtifactError(f"{artifact} is missing")
    if not manifest.exists():
        raise ArtifactError(f"{artifact} has no manifest at {manifest}")
    recorded = read_json(manifest)
    actual = sha256_file(artifact)
    if actual != recorded["sha256"]:
        raise ArtifactError(
            f"{artifact} is corrupt: its sha256 is {actual[:12]}… but {manifest.name} recorded {recorded['sha256'][:12]}…; "
            "delete it and re-run the workflow to rebuild it"
        )
    return recorded
