"""A device's storage kept in bounds: which deployed programs stay on it, and what goes.

Each deploy puts its `.pte` and tokenizer in `<workdir>/models/<sha256 prefix>/` and the peers'
files in `<workdir>/peers/<sha256 prefix>/`, and writes `variant.json` beside the `.pte`: the
variant it is (`<model>/<quant>/xnnpack-<mode>`), when it was last deployed or benchmarked, and
the peer folders it uses. Before it uploads, a deploy keeps the folder it deploys, the newest
folder of the configured variant (the one `results/<target>/bench.json` reports) and the
`keep_models` most recently used others, and removes the rest, with the peer folders no kept
program uses. A bench step whose files were removed since its deploy uploads them again.

The device is listed by its own Python, standard library only, in one command.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from pathlib import Path

from gemma_edge.reach import ssh
from gemma_edge.reach.target import Target, connection, holding_device

log = logging.getLogger(__name__)

MARKER = "variant.json"

LISTING = r"""
import json, os, sys
work, marker = sys.argv[1], sys.argv[2]
found = {}
for kind in ("models", "peers"):
    folder = os.path.join(work, kind)
    entries = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        size = 0
        for root, _, files in os.walk(path):
            for file in files:
                try:
                    size += os.lstat(os.path.join(root, file)).st_size
                except OSError:
                    pass
        record = {}
        try:
            with open(os.path.join(path, marker)) as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            pass
        entries.append({"name": name, "bytes": size, "marker": record, "mtime": os.stat(path).st_mtime})
    found[kind] = entries
print(json.dumps(found))
"""


def list_device(client, python: str, work: str, timeout_s: float) -> dict:
    """{"models": [...], "peers": [...]}: each folder's name, bytes, marker and mtime."""
    _, out, _ = ssh.run(client, [python, "-c", LISTING, work, MARKER], timeout_s)
    return json.loads(out)


def last_used(entry: dict) -> float:
    return float(entry["marker"].get("used", entry["mtime"]))


def plan_removal(
    listing: dict, deploying: str, configured: str | None, keep_recent: int, peers_in_use: set[str]
) -> tuple[list[dict], list[dict]]:
    """The model and peer folders to remove: all but the folder being deployed, the newest folder
    of the configured variant, the `keep_recent` most recently used others, and the peer folders
    these (or the deploy under way, `peers_in_use`) use. Folders without a marker (deployed before
    markers) count as used when last modified."""
    models = listing.get("models", [])
    others = sorted((m for m in models if m["name"] != deploying), key=last_used, reverse=True)
    kept = {deploying}
    newest_configured = next((m for m in others if configured and m["marker"].get("variant") == configured), None)
    if newest_configured:
        kept.add(newest_configured["name"])
    kept |= {m["name"] for m in [m for m in others if m["name"] not in kept][:keep_recent]}
    in_use = set(peers_in_use)
    for model in models:
        if model["name"] in kept:
            in_use |= set(model["marker"].get("peers", []))
    remove_models = [m for m in models if m["name"] not in kept]
    remove_peers = [p for p in listing.get("peers", []) if p["name"] not in in_use]
    return remove_models, remove_peers


def remove_folders(client, work: str, models: list[dict], peers: list[dict], timeout_s: float) -> list[dict]:
    """Remove the planned folders on the device; what was removed, as recorded in deployed.json."""
    paths = [f"{work}/models/{m['name']}" for m in models] + [f"{work}/peers/{p['name']}" for p in peers]
    if not paths:
        return []
    ssh.run(client, ["rm", "-rf", "--", *paths], timeout_s)
    removed = [{"folder": f"models/{m['name']}", "variant": m["marker"].get("variant"), "bytes": m["bytes"]} for m in models] + [
        {"folder": f"peers/{p['name']}", "bytes": p["bytes"]} for p in peers
    ]
    log.info(
        "removed %d earlier deployment folder(s) from the device (%.1f MB): %s",
        len(removed),
        sum(r["bytes"] for r in removed) / 1e6,
        ", ".join(f"{r['folder']} ({r['variant']})" if r.get("variant") else r["folder"] for r in removed),
    )
    return removed


def write_marker(client, folder: str, variant: str, peers: list[str], timeout_s: float) -> None:
    """variant.json in a deployed folder: what it is, when it was last used, which peer folders it uses."""
    record = json.dumps({"variant": variant, "used": time.time(), "peers": sorted(set(peers))})
    path, temporary = shlex.quote(f"{folder}/{MARKER}"), shlex.quote(f"{folder}/{MARKER}.tmp")
    command = f"printf '%s\\n' {shlex.quote(record)} > {temporary} && mv -f {temporary} {path}"
    ssh.run_shell(client, command, timeout_s)


def missing_on_device(client, paths: list[str], timeout_s: float) -> list[str]:
    """Which of `paths` the device does not have."""
    if not paths:
        return []
    script = "for p in " + " ".join(shlex.quote(p) for p in paths) + '; do [ -e "$p" ] || printf "%s\\n" "$p"; done'
    _, out, _ = ssh.run_shell(client, script, timeout_s)
    return [line for line in out.splitlines() if line]


def clean(target: Target, results: Path) -> dict:
    """Remove everything the workflow put on an SSH device but its virtualenv: deployed programs,
    peers, the wheelhouse and the benchmark runner. This host's records of what the device held
    (`results/<target>/device.json` and every `deployed.json`) go too, so the next run provisions
    (installing nothing) and deploys again."""
    removed = []
    if not target.is_local:
        layout, short = target.layout, target.timeouts.command_s
        paths = [layout.models, layout.peers, layout.wheelhouse, layout.runner]
        with connection(target) as client, holding_device(client, target, "clean", remove=True):
            _, out, _ = ssh.run_shell(
                client, "du -sk -- " + " ".join(shlex.quote(p) for p in paths) + " 2>/dev/null", short, check=False
            )
            removed = [
                {"path": path, "bytes": int(kb) * 1024}
                for kb, path in (line.split("\t", 1) for line in out.splitlines() if "\t" in line)
            ]
            ssh.run(client, ["rm", "-rf", "--", *paths], short)
        log.info(
            "%s: removed %s (%.1f MB); the virtualenv stays",
            target.name,
            ", ".join(r["path"] for r in removed) or "nothing (the device held none of it)",
            sum(r["bytes"] for r in removed) / 1e6,
        )
    records = [Path(results) / "device.json", *sorted(Path(results).rglob("deployed.json"))]
    for record in records:
        if record.exists():
            record.unlink()
    return {"target": target.name, "removed": removed, "records_removed": [str(r) for r in records]}
