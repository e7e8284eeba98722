"""A single-node SLURM cluster (Debian's slurm-wlm + munge) started and stopped by the tests.

The SLURM executor plugin's job step strips SLURM_* variables before calling srun, so srun inside
a job finds the cluster only through the default /etc/slurm/slurm.conf: the fixture writes it
(marked as its own) and removes it afterwards, and will not touch one it did not write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by the gemma-edge test suite"


def available() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (Debian: slurm-wlm, munge)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        return f"{SLURM_CONF} belongs to another cluster"
    return None


def _ensure_munge() -> None:
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    deadline = time.monotonic() + 10
    while subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("munged did not start")
        time.sleep(0.2)


class SlurmCluster:
    def __init__(self, folder: Path):
        self.folder = folder
        for sub in ("state", "spool", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)

    def config(self) -> str:
        host = socket.gethostname()
        f = self.folder
        return (
            f"{MARKER}\nClusterName=gemmaedgetest\nSlurmctldHost={host}\nSlurmctldPort=16817\nSlurmdPort=16818\n"
            f"SlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nStateSaveLocation={f}/state\n"
            f"SlurmdSpoolDir={f}/spool\nSlurmctldPidFile={f}/slurmctld.pid\nSlurmdPidFile={f}/slurmd.pid\n"
            f"SlurmctldLogFile={f}/log/slurmctld.log\nSlurmdLogFile={f}/log/slurmd.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core_Memory\nMpiDefault=none\nReturnToService=2\nSchedulerType=sched/backfill\n"
            "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n"
            "JobCompType=jobcomp/none\nMinJobAge=600\n"
            f"NodeName={host} CPUs={os.cpu_count()} RealMemory=16000 State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )

    def start(self) -> SlurmCluster:
        _ensure_munge()
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(self.config())
        subprocess.run(["/usr/sbin/slurmctld", "-c"], check=True)
        subprocess.run(["/usr/sbin/slurmd", "-c"], check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()
            if state.startswith("idle"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not become idle: {(self.folder / 'log/slurmctld.log').read_text()[-2000:]}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True)
        for name in ("slurmd", "slurmctld"):
            pid_file = self.folder / f"{name}.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().strip()), 15)
        time.sleep(1)
        if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            SLURM_CONF.unlink()
