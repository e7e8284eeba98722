"""The JSON manifest each artifact carries (its sha256, its inputs', the params and the package
versions that made it), and the check that an artifact still matches it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

from gemma_edge.device.files import ArtifactError, peak_rss_mb, read_json, sha256_file, write_json

MANIFEST_SUFFIX = ".manifest.json"
TRACKED_PACKAGES = ("torch", "executorch", "torchao", "transformers", "huggingface_hub", "tokenizers", "safetensors")


def package_versions(names=TRACKED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
