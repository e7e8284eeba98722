"""A device's storage over weeks of use: a deploy keeps the program it deploys, the configured
variant's and `keep_models` recent others; a benchmark of a removed program uploads it again;
`clean_<target>` leaves only the virtualenv. Through a real OpenSSH server on loopback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conftest import snakemake, write_config
from gemma_edge.device.files import sha256_file
from gemma_edge.reach import deploy, device_storage, ssh
from gemma_edge.reach.target import Housekeeping, Target, connection

GROUP_SIZES = [32, 64, 128, 256, 512]


def entry(name: str, used: float, variant: str | None = None, peers=(), size: int = 10) -> dict:
    marker = {"variant": variant, "used": used, "peers": list(peers)} if variant else {}
    return {"name": name, "bytes": size, "marker": marker, "mtime": used}


def test_the_plan_keeps_the_deploy_the_configured_variant_and_the_most_recent_others():
    listing = {
        "models": [
            entry("a", 1, "m/int4-g32/xnnpack-auto", ["p1"]),  # configured, oldest
            entry("b", 2, "m/int4-g64/xnnpack-auto", ["p2"]),
            entry("c", 3, "m/int4-g128/xnnpack-auto", ["p3"]),
            entry("old", 0.5),  # deployed before markers: counts as used when last modified
            entry("d", 4, "m/int4-g256/xnnpack-auto", ["p4"]),
        ],
        "peers": [entry(p, 1) for p in ("p1", "p2", "p3", "p4", "p5", "orphan")],
    }
    models, peers = device_storage.plan_removal(listing, "d", "m/int4-g32/xnnpack-auto", keep_recent=1, peers_in_use={"p5"})
    assert [m["name"] for m in models] == ["b", "old"]  # kept: d (deploying), a (configured), c (most recent other)
    assert [p["name"] for p in peers] == ["p2", "orphan"]  # kept: those a, c and d use, and the deploy's own
    models, _ = device_storage.plan_removal(listing, "new", None, keep_recent=0, peers_in_use=set())
    assert {m["name"] for m in models} == {"a", "b", "c", "d", "old"}


def fake_variant(root: Path, group_size: int) -> Path:
    """A .pte-sized stand-in at a variant's path: deploy places bytes, it does not read programs."""
    pte = root / f"results/tiny/int4-g{group_size}/xnnpack-auto/model.pte"
    pte.parent.mkdir(parents=True)
    pte.write_bytes(os.urandom(200_000) + str(group_size).encode())
    return pte


def device_programs(remote: Path) -> dict[str, str]:
    """{folder: variant} of the programs on the device."""
    return {
        folder.name: json.loads((folder / device_storage.MARKER).read_text())["variant"]
        for folder in sorted((remote / "models").iterdir())
    }


def test_five_deploys_leave_only_the_kept_programs_and_a_removed_one_comes_back_to_be_benchmarked(sshd, tmp_path):
    remote = tmp_path / "device/gemma-edge"
    target = Target.of("loopback", sshd.target(remote), Housekeeping(keep_models=1))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    configured = "tiny/int4-g32/xnnpack-auto"
    records = []
    for group_size in GROUP_SIZES:
        pte = fake_variant(tmp_path, group_size)
        out = pte.parent / "deployed.json"
        records.append(deploy.deploy(target, pte, tokenizer, out, configured=configured))
        assert len(device_programs(remote)) <= 3  # the deploy's own, the configured variant's, one recent
    assert set(device_programs(remote).values()) == {configured, "tiny/int4-g256/xnnpack-auto", "tiny/int4-g512/xnnpack-auto"}
    removed = [r["variant"] for record in records for r in record["removed"]]
    assert removed == ["tiny/int4-g64/xnnpack-auto", "tiny/int4-g128/xnnpack-auto"]

    # g64's deploy record still names its program, which a later deploy removed: its benchmark
    # uploads it again, whole, before it runs.
    g64 = records[1]
    assert not Path(g64["files"]["pte"]["path"]).exists()
    with connection(target) as client:
        deploy.restore_removed_files(client, target, g64)
    assert sha256_file(g64["files"]["pte"]["path"]) == g64["files"]["pte"]["sha256"]
    assert Path(g64["files"]["tokenizer"]["path"]).exists()


def test_clean_leaves_only_the_virtualenv_and_forgets_what_the_device_held(deployed, sshd, tmp_path):
    """clean_<target> on copies of the deployed working directory and of the loopback device's
    folder: what deploy and provision put there goes, a virtualenv stays, and this host's records
    go so that the next run deploys again."""
    workdir, remote = tmp_path / "workdir", tmp_path / "device/gemma-edge"
    shutil.copytree(deployed["workdir"], workdir, symlinks=True)
    shutil.copytree(deployed["remote"], remote, symlinks=True)
    (remote / "venv/bin").mkdir(parents=True)
    (remote / "venv/bin/python").write_text("")
    assert (remote / "models").is_dir() and (remote / "runner").is_dir()
    config = write_config(tmp_path / "clean.yaml", {"targets": {"loopback": sshd.target(remote)}})
    first = str(workdir / Path(deployed["configs"][0]).name)
    result = snakemake(workdir, "--cores", "1", "clean_loopback", "--configfile", first, str(config))
    assert sorted(path.name for path in remote.iterdir()) == ["venv"]
    assert not (workdir / "results/loopback/device.json").exists()
    assert not list((workdir / "results/loopback").rglob("deployed.json"))
    log = workdir / "logs/targets/loopback/clean.log"
    assert "the virtualenv stays" in log.read_text(), result.stdout[-2000:]
    # Asked again, it runs again (no output to be up to date), and finds nothing left to remove.
    snakemake(workdir, "--cores", "1", "clean_loopback", "--configfile", first, str(config))
    assert "nothing (the device held none of it)" in log.read_text()
    # The next run provisions (installing nothing) and deploys again.
    dry = snakemake(workdir, "-n", "results/loopback/bench.json", "--configfile", first, str(config))
    assert "deploy_loopback" in dry.stdout and "provision" in dry.stdout


def test_the_device_listing_reads_sizes_and_markers(sshd, tmp_path):
    remote = tmp_path / "device/gemma-edge"
    (remote / "models/abc").mkdir(parents=True)
    (remote / "models/abc/model.pte").write_bytes(b"x" * 1000)
    (remote / "models/abc" / device_storage.MARKER).write_text(json.dumps({"variant": "v", "used": 5.0}))
    (remote / "peers/p").mkdir(parents=True)
    target = Target.of("loopback", sshd.target(remote))
    with connection(target) as client:
        listing = device_storage.list_device(client, target.python, str(remote), 30)
        assert device_storage.missing_on_device(client, [str(remote / "models/abc/model.pte"), str(remote / "nope")], 30) == [
            str(remote / "nope")
        ]
        ssh.run(client, ["true"], 10)
    (model,) = listing["models"]
    assert model["name"] == "abc" and model["marker"]["variant"] == "v" and model["bytes"] >= 1000
    assert [p["name"] for p in listing["peers"]] == ["p"]
