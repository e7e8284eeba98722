"""Put the .pte, its tokenizer and the peers' programs and models on a device, atomically, skipping
what is already there, after removing the deployments it no longer keeps."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from gemma_edge.device.files import read_json, sha256_file, write_json
from gemma_edge.reach import device_storage, ssh
from gemma_edge.reach.target import Layout, Target, connection, holding_device
from gemma_edge.workflow.manifest import portable_path

log = logging.getLogger(__name__)


def deploy(
    target: Target, pte: Path, tokenizer: Path, out: Path, peers: list[dict] | None = None, configured: str | None = None
) -> dict:
    """Put the .pte and tokenizer on the device, and each peer engine's program and model (see
    `place_peers`), atomically, skipped when already there. On a device reached over SSH, first
    remove the earlier deployments it no longer keeps (gemma_edge.reach.device_storage), so the disk
    check before each upload counts the space they held; `configured` is the configured variant
    (<model>/<quant>/xnnpack-<mode>), whose newest deployment stays."""
    started = time.monotonic()
    pte_sha = sha256_file(pte)
    variant = "/".join(Path(pte).parts[-4:-1])  # results/<model>/<quant>/xnnpack-<mode>/model.pte
    removed, uploads = [], []
    if target.is_local:
        # Relative to the working directory (where the local benchmark runs) when inside it.
        files = {
            "pte": {"path": portable_path(pte), "sha256": pte_sha, "uploaded": False, "seconds": 0.0},
            "tokenizer": {"path": portable_path(tokenizer), "uploaded": False, "seconds": 0.0},
        }
        placed = place_peers(
            peers or [],
            lambda local, kind: {
                "path": portable_path(local),
                "uploaded": False,
                "sha256": sha256_file(local),
            },
        )
    else:
        layout = target.layout
        timeout, short = target.timeouts.transfer_s, target.timeouts.command_s
        folder = f"{layout.models}/{pte_sha[:16]}"
        peer_folders = {sha256_file(local)[:16] for local, _ in peer_files_to_place(peers or [])}
        with connection(target) as client, holding_device(client, target, f"deploy {variant}"):
            # Uploads an earlier run lost with its connection live in the models' folders.
            ssh.remove_stale_uploads(client, layout.models, short)
            listing = device_storage.list_device(client, target.python, layout.work, short)
            old_models, old_peers = device_storage.plan_removal(
                listing, pte_sha[:16], configured, target.house.keep_models, peer_folders
            )
            removed = device_storage.remove_folders(client, layout.work, old_models, old_peers, short)
            ssh.run(client, ["mkdir", "-p", folder], short)

            def put(local: Path, remote: str, kind: str) -> dict:
                placed_file = ssh.upload_atomically(client, local, remote, timeout)
                if kind == "program":
                    ssh.run(client, ["chmod", "+x", remote], short)
                uploads.append({"host": portable_path(local), "device": remote, "kind": kind})
                return placed_file

            files = {
                "pte": put(pte, f"{folder}/model.pte", "pte"),
                "tokenizer": put(tokenizer, f"{folder}/tokenizer.json", "tokenizer"),
            }
            placed = place_peers(peers or [], lambda local, kind: upload_peer_file(client, layout, short, local, kind, put))
            device_storage.write_marker(client, folder, variant, sorted(peer_folders), short)
    record = {
        "target": target.name,
        "kind": target.kind,
        "variant": variant,
        "files": files,
        "peers": placed,
        "uploads": uploads,
        "removed": removed,
        "peer_folders": sorted(peer_folders) if not target.is_local else [],
        "weight_bytes": weights_of(pte, peers or []),
        "seconds": time.monotonic() - started,
    }
    write_json(out, record)
    return record


def weights_of(pte: Path, peers: list[dict]) -> dict:
    """Weight bytes a decoded token reads (weight_bytes), from the host's copies of the .pte and of
    each peer's model: the device benchmark sets its tok/s against them."""
    from gemma_edge.measure.weight_bytes import readable_weight_bytes

    weights = {"pte": readable_weight_bytes(Path(pte))}
    for peer in peers:  # a model weight_bytes cannot read gets None: no fraction claimed
        if "model" in peer and Path(peer["model"]).exists():
            weights[peer["name"]] = readable_weight_bytes(Path(peer["model"]))
    return weights


def place_peers(peers: list[dict], put) -> list[dict]:
    """Each peer with its program and model where the device runs them (`put(local, kind)` returns
    {"path", "sha256"}), or, when its program could not be built for the device, the reason."""
    placed = []
    for peer in peers:
        entry = {key: value for key, value in peer.items() if key not in ("program", "model", "reason")}
        program = read_json(peer["program"]) if "program" in peer else {"available": False, "reason": peer["reason"]}
        if not program["available"]:
            placed.append({**entry, "available": False, "reason": program["reason"]})
            continue
        binary = put(Path(program["binary"]), program.get("kind", "program"))
        model = put(Path(peer["model"]), "model")
        placed.append(
            {
                **entry,
                "available": True,
                "binary": binary["path"],
                "model": model["path"],
                "model_sha256": model["sha256"],
                "binary_sha256": program["sha256"],
            }
        )
    return placed


def peer_files_to_place(peers: list[dict]) -> list[tuple[Path, str]]:
    """(host file, kind) of each file `place_peers` puts on the device: each available peer's
    program and model."""
    files = []
    for peer in peers:
        program = read_json(peer["program"]) if "program" in peer else {"available": False}
        if program["available"]:
            files += [(Path(program["binary"]), program.get("kind", "program")), (Path(peer["model"]), "model")]
    return files


def upload_peer_file(client, layout: Layout, timeout_s: float, local: Path, kind: str, put) -> dict:
    """A peer's program (made executable), runtime wheel or model under <workdir>/peers/<sha256
    prefix>/, placed with `put(local, remote, kind)`."""
    digest = sha256_file(local)
    folder = f"{layout.peers}/{digest[:16]}"
    ssh.run(client, ["mkdir", "-p", folder], timeout_s)
    ssh.remove_stale_uploads(client, folder, timeout_s)
    return put(local, f"{folder}/{local.name}", kind)


def restore_removed_files(client, target: Target, deployed: dict) -> None:
    """Upload again what this deployment placed on the device and a later deploy removed (it
    keeps only `keep_models` earlier deployments), and mark the deployment as just used."""
    short = target.timeouts.command_s
    uploads = deployed.get("uploads", [])
    missing = set(device_storage.missing_on_device(client, [u["device"] for u in uploads], short))
    for upload in (u for u in uploads if u["device"] in missing):
        log.info("%s was removed from the device since its deploy (keep_models); uploading it again", upload["device"])
        ssh.run(client, ["mkdir", "-p", os.path.dirname(upload["device"])], short)
        ssh.upload_atomically(client, Path(upload["host"]), upload["device"], target.timeouts.transfer_s)
        if upload["kind"] == "program":
            ssh.run(client, ["chmod", "+x", upload["device"]], short)
    if "variant" in deployed:
        folder = os.path.dirname(deployed["files"]["pte"]["path"])
        device_storage.write_marker(client, folder, deployed["variant"], deployed.get("peer_folders", []), short)
