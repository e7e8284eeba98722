"""The README's shell commands, read from its ```sh blocks, and a way to run one as written: the
tests run the README's own lines, so a command that stops working fails a test."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
EMULATOR_SECTION = "The emulated Pi 5"


def readme_commands(text: str | None = None) -> dict[str, list[str]]:
    """The shell commands of each `## ` section's ```sh blocks, by section title, comments left
    out and continuation lines joined."""
    text = README.read_text() if text is None else text
    commands: dict[str, list[str]] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = section.partition("\n")
        for block in re.findall(r"^```sh\n(.*?)^```", body, flags=re.M | re.S):
            joined = re.sub(r"\s*\\\n\s*", " ", block)
            lines = [line.strip() for line in joined.splitlines()]
            commands.setdefault(title.strip(), []).extend(line for line in lines if line and not line.startswith("#"))
    return commands


def emulator_commands() -> dict[str, str]:
    """The README's emulator commands by their verb: setup, serve and stop."""
    lines = readme_commands()[EMULATOR_SECTION]
    return {line.split()[-1]: line for line in lines if "-m gemma_edge.reach.emulator " in line}


def run_readme_line(line: str, cwd: Path = REPO, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run one README line with bash in `cwd`, as a user would paste it; fails with its output."""
    result = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"`{line}` failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def fresh_checkout(folder: Path) -> Path:
    """The checkout's tracked and new files, as a clone would hold them (uncommitted edits
    included), with this checkout's virtualenv linked in, as the README's set-up leaves it."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    (folder / ".venv").symlink_to(REPO / ".venv")
    return folder
