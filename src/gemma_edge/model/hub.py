"""Fetch a checkpoint with huggingface_hub and describe it in a manifest; seed a hub cache offline."""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
from pathlib import Path

from gemma_edge.device.files import ArtifactError, atomic_output, sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
REQUIRED_FILES = ("config.json", "tokenizer.json")


class DownloadError(RuntimeError):
    """The checkpoint could not be obtained; the message says what to do."""


def download_checkpoint(repo_id: str, revision: str, cache_dir: str | None, offline: bool) -> Path:
    """Resolve `repo_id@revision` to a local snapshot folder, downloading only the checkpoint files."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    offline = offline or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    where = cache_dir or "the default Hugging Face cache"
    log.info("resolving %s@%s (%s, cache: %s)", repo_id, revision, "offline" if offline else "online", where)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=CHECKPOINT_PATTERNS,
        )
    except hf_errors.GatedRepoError as error:
        raise DownloadError(
            f"{repo_id} is a gated model: accept its licence on its Hugging Face page, then set HF_TOKEN "
            "(or run `hf auth login`) so this workflow can download it"
        ) from error
    except hf_errors.RepositoryNotFoundError as error:
        raise DownloadError(
            f"{repo_id} was not found on the Hugging Face hub (or is private): check models.<name>.repo_id, "
            "or set HF_TOKEN if it is a private repository you can read"
        ) from error
    except hf_errors.RevisionNotFoundError as error:
        raise DownloadError(f"{repo_id} has no revision {revision!r}: check models.<name>.revision") from error
    except hf_errors.LocalEntryNotFoundError as error:
        raise DownloadError(
            f"{repo_id}@{revision} is not in {where} and the hub cannot be reached (offline): "
            "connect to the network once, or point models.<name>.local_path at a checkpoint folder"
        ) from error
    except (hf_errors.HfHubHTTPError, OSError) as error:
        raise DownloadError(f"downloading {repo_id}@{revision} failed: {error}") from error
    return Path(folder)


def blob_digest(path: Path, expected: str) -> str:
    """`path`'s content hash of the kind the hub names its cache blob by: sha256 for an LFS file
    (64 hex digits), git's blob sha1 for a small file kept in git (40)."""
    if len(expected) == 64:
        return sha256_file(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_cached_files(folder: Path, repair: str) -> dict[str, str]:
    """Every file of a hub snapshot must hash to the name of the cache blob it links to (the hub's
    recorded etag); raise DownloadError naming the first that does not, and `repair`, the command
    that fixes it ({name} is replaced by the file's name). Returns the sha256 it verified (LFS
    files, the large ones) by file name, so they are not read a second time."""
    verified = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_symlink() or not any(path.match(p) for p in CHECKPOINT_PATTERNS):
            continue
        blob = path.resolve()
        expected = blob.name
        if len(expected) not in (40, 64) or not all(c in "0123456789abcdef" for c in expected):
            continue  # not a hub blob (a cache laid out by hand): nothing recorded to check against
        log.info("checking %s against the hub's hash", path.name)
        actual = blob_digest(blob, expected)
        if actual != expected:
            raise DownloadError(
                f"the cached {path.name} ({blob}) is corrupt: it hashes to {actual[:12]}…, not the hub's "
                f"{expected[:12]}…; repair it with {repair.format(name=path.name)}"
            )
        if len(expected) == 64:
            verified[path.name] = actual
    return verified


def repair_command(repo_id: str, revision: str, cache_dir: str | None, demo: bool) -> str:
    """The command that replaces a corrupt cached file of `repo_id` (a demo model is re-seeded)."""
    if demo:
        return "`snakemake --forcerun demo_checkpoint` plus your usual arguments (it rebuilds and re-seeds the demo model)"
    cache = f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir else ""
    return f"`hf download {shlex.quote(repo_id)} {{name}} --revision {shlex.quote(revision)}{cache} --force-download`"


def describe_checkpoint(folder: Path, known_sha256: dict[str, str] | None = None) -> dict:
    """sha256 and size of every checkpoint file in `folder` (symlinks into the hub cache resolved);
    files in `known_sha256` were just hashed and are not read again."""
    known_sha256 = known_sha256 or {}
    folder = Path(folder)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and any(path.match(p) for p in CHECKPOINT_PATTERNS):
            digest = known_sha256.get(path.name) or sha256_file(path)
            files[path.name] = {"sha256": digest, "size_bytes": path.stat().st_size}
    missing = [name for name in REQUIRED_FILES if name not in files]
    if not any(name.endswith(".safetensors") for name in files):
        missing.append("*.safetensors")
    if missing:
        raise DownloadError(f"checkpoint at {folder} lacks {', '.join(missing)}")
    return files


def verify_checkpoint(manifest: dict) -> Path:
    """Re-hash the files a download manifest lists; raise ArtifactError naming any that changed."""
    folder = Path(manifest["path"])
    for name, recorded in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise ArtifactError(f"checkpoint file {path} is missing; re-run the download step")
        actual = sha256_file(path)
        if actual != recorded["sha256"]:
            raise ArtifactError(
                f"checkpoint file {path} is corrupt: sha256 {actual[:12]}… differs from the "
                f"{recorded['sha256'][:12]}… recorded at download; delete it from the cache and re-run"
            )
    return folder


def seed_hub_cache(checkpoint_dir: Path, cache_dir: Path, repo_id: str, revision: str = "main") -> str:
    """Lay `checkpoint_dir` out as a Hugging Face hub cache entry for `repo_id`; return its commit sha.

    The layout (blobs named by content hash, a snapshot folder of links, a ref naming the commit)
    is the one `snapshot_download` reads, so offline runs go through the real download code.
    """
    checkpoint_dir, cache_dir = Path(checkpoint_dir), Path(cache_dir)
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in checkpoint_dir.iterdir() if p.is_file())
    hashes = {p.name: sha256_file(p) for p in files}
    commit = hashlib.sha1("".join(f"{n}:{h}\n" for n, h in hashes.items()).encode()).hexdigest()
    snapshot = repo_folder / "snapshots" / commit
    (repo_folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = repo_folder / "blobs" / hashes[path.name]
        if blob.exists() and sha256_file(blob) != hashes[path.name]:
            log.warning("the cached blob of %s was corrupt; replacing it", path.name)
            blob.unlink()
        if not blob.exists():
            with atomic_output(blob) as tmp:
                shutil.copyfile(path, tmp)
        link = snapshot / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo_folder / "refs").mkdir(exist_ok=True)
    (repo_folder / "refs" / revision).write_text(commit)
    return commit
