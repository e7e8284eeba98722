"""The emulated Raspberry Pi 5: fast checks of its parts, and one real run when the sysroot exists."""

from __future__ import annotations

import subprocess

import pytest

from conftest import qemu_unavailable, require
from gemma_edge.reach import emulator, loopback_sshd
from gemma_edge.reach.loopback_sshd import SshServer
from gemma_edge.reach.qemu import QEMU, EmulatorError, register_binfmt
from gemma_edge.reach.sysroot import PI5_FEATURES, build_sysroot, host_apt_uris, pi5_cpuinfo, read_stamp


def test_pi5_cpuinfo_has_cortex_a76_processors():
    text = pi5_cpuinfo(3)
    blocks = [block for block in text.split("\n\n") if block.startswith("processor")]
    assert [block.splitlines()[0] for block in blocks] == ["processor\t: 0", "processor\t: 1", "processor\t: 2"]
    for block in blocks:
        fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
        assert fields["CPU implementer"] == "0x41" and fields["CPU part"] == "0xd0b" and fields["CPU architecture"] == "8"
        assert {"asimddp", "asimdhp", "fphp", "atomics", "lrcpc", "dcpop", "crc32", "aes"} <= set(fields["Features"].split())
    assert "Raspberry Pi 5" in text.splitlines()[-1]


@pytest.mark.needs_sshd
def test_setenv_reaches_commands_through_a_real_sshd(tmp_path):
    require(loopback_sshd.unavailable())  # a server of its own
    home = tmp_path / "device-home"  # a home without shell start-up files, so nothing rewrites PATH
    home.mkdir()
    environment = {"GEMMA_EDGE_PROBE": "two words", "PATH": f"{tmp_path}/bin:/usr/bin:/bin", "HOME": str(home)}
    server = SshServer.create(tmp_path / "sshd", environment=environment).start()
    try:
        result = subprocess.run(
            [
                "ssh",
                "-i",
                str(server.client_key),
                "-o",
                f"UserKnownHostsFile={server.known_hosts}",
                "-o",
                "BatchMode=yes",
                "-p",
                str(server.port),
                "root@127.0.0.1",
                'printf "%s|%s|%s" "$GEMMA_EDGE_PROBE" "$PATH" "$HOME"',
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"two words|{tmp_path}/bin:/usr/bin:/bin|{home}"


def test_setenv_refuses_values_sshd_cannot_carry(tmp_path):
    with pytest.raises(ValueError, match="quote"):
        SshServer.create(tmp_path, environment={"BAD": 'say "hi"'})


def test_missing_qemu_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu-aarch64-static on this PATH
    with pytest.raises(EmulatorError, match=r"qemu-aarch64-static is not installed: apt-get install qemu-user-static"):
        emulator.check_emulator(tmp_path)
    with pytest.raises(EmulatorError, match="apt-get install qemu-user-static"):
        register_binfmt()


def test_missing_sysroot_says_to_run_setup(tmp_path):
    require(qemu_unavailable())
    with pytest.raises(EmulatorError, match="run `python -m gemma_edge.reach.emulator setup` first"):
        emulator.check_emulator(tmp_path)


def test_serve_without_openssh_says_what_to_install_in_one_sentence(tmp_path, monkeypatch, capsys):
    python = tmp_path / "sysroot/usr/bin/python3.11"
    python.parent.mkdir(parents=True)
    python.touch()
    monkeypatch.setattr(loopback_sshd, "SSHD", str(tmp_path / "no-sshd"))
    assert emulator.main(["serve", "--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error == (
        "error: the emulated Pi's sshd cannot start: sshd is not installed (Debian: openssh-server, openssh-client)\n"
    )


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_EDGE_EMULATOR", str(tmp_path / "emu"))
    assert emulator.default_root() == tmp_path / "emu"
    monkeypatch.delenv("GEMMA_EDGE_EMULATOR")
    assert emulator.default_root().parts[-3:] == (".cache", "gemma-edge", "emulator")


def test_device_environment_points_qemu_at_the_sysroot(tmp_path):
    assert emulator.device_environment(tmp_path) == {"QEMU_LD_PREFIX": str(tmp_path / "sysroot"), "QEMU_CPU": "cortex-a76"}
    assert emulator.device_path(tmp_path).startswith(f"{tmp_path}/sysroot/usr/bin:")


@pytest.fixture(scope="module")
def built_root():
    """The emulator as the README sets it up (cached per machine: a second setup builds nothing)."""
    require(qemu_unavailable())
    root = emulator.default_root()
    emulator.setup(root)
    return root


def test_guest_is_an_aarch64_cortex_a76(built_root):
    seen = emulator.check_emulator(built_root)
    assert seen["machine"] == "aarch64" and seen["cpu_part"] == "0xd0b" and seen["binfmt"] == "aarch64"
    assert set(PI5_FEATURES) <= set(seen["features"].split())
    assert seen["python"].startswith("3.11.")


def test_setup_again_builds_nothing(built_root):
    stamp = read_stamp(built_root)
    again = build_sysroot(built_root)
    assert again["unchanged"] and again["packages"] == stamp["packages"]
    assert (built_root / "sysroot/proc/cpuinfo").read_text() == pi5_cpuinfo(__import__("os").cpu_count())


def test_packages_come_from_the_hosts_own_apt_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://sources.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://security.example/debian-security bookworm-security main\n")
    assert host_apt_uris("bookworm", tmp_path) == ["http://mirror.example/debian"]
    assert host_apt_uris("bookworm-security", tmp_path) == ["http://security.example/debian-security"]
    assert host_apt_uris("trixie", tmp_path) == []


def test_missing_mmdebstrap_says_how_to_install_it_and_leaves_nothing(tmp_path, monkeypatch):
    qemu = tmp_path / "bin" / QEMU  # found, so the sysroot is the next thing setup needs
    qemu.parent.mkdir()
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", str(qemu.parent))
    with pytest.raises(EmulatorError, match="mmdebstrap is not installed: apt-get install mmdebstrap"):
        build_sysroot(tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []
