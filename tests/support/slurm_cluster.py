"""A private one-node SLURM for the tests: munged, slurmctld and slurmd from Debian's packages,
started as root from a config in a temp dir (free ports, its own munge key and socket, state and
logs in the dir), so it touches no system SLURM and no system munged. Torn down by PID.

    cluster = SlurmCluster.start(tmp_dir)     # raises SlurmUnavailable with the reason
    cluster.env()                             # the environment for sbatch/scontrol/squeue (SLURM_CONF)
    cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def can_start() -> bool:
    """Whether `SlurmCluster.start` has what it needs here (the packages, root)."""
    return all(_which(n) for n in DAEMONS + CLIENTS + ("mungekey",)) and os.geteuid() == 0


class SlurmUnavailable(RuntimeError):
    pass


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _node_line(host: str) -> str:
    """This machine as slurmd sees it (`slurmd -C`), memory trimmed so the node is never drained
    for having less than it claims."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0].split()
    fields = dict(f.split("=", 1) for f in first if "=" in f)
    mem = int(int(fields.get("RealMemory", "2000")) * 0.8)
    return f"NodeName={host} CPUs={fields.get('CPUs', os.cpu_count())} RealMemory={mem} State=UNKNOWN"


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def start(cls, root: Path, kill_wait: int = 30) -> "SlurmCluster":
        missing = [n for n in DAEMONS + CLIENTS + ("mungekey",) if not _which(n)]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (Debian: slurmctld slurmd "
                                   "slurm-client munge; tests/run.sh installs them as root)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the private SLURM needs root (slurmd runs jobs as their user)")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            (root / d).mkdir(exist_ok=True)
        key, sock = root / "munge.key", root / "munge.sock"
        subprocess.run([_which("mungekey"), "-c", "-f", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        conf = root / "slurm.conf"
        conf.write_text("\n".join([
            "ClusterName=avsrtest", f"SlurmctldHost={host}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
            "ReturnToService=2", "JobRequeue=1", f"KillWait={kill_wait}", "MinJobAge=600",
            "InactiveLimit=0", "SlurmctldTimeout=30", "SlurmdTimeout=60",
            _node_line(host),
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        cluster = cls(root, conf)
        env = cluster.env()
        try:
            cluster._spawn("munged", [_which("munged"), "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                                      f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                                      f"--seed-file={root / 'munged.seed'}"], env)
            cluster._wait(lambda: sock.exists(), 20, "munged socket")
            cluster._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)], env)
            cluster._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(conf)], env)
            cluster._wait(cluster._node_idle, 60, "node idle in sinfo")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, name: str, cmd: list[str], env: dict) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {p.returncode}: {self.logs(name)}")
            if time.time() > deadline:
                raise SlurmUnavailable(f"no {what} after {timeout} s: {self.logs()}")
            time.sleep(0.5)

    def _node_idle(self) -> bool:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env(), capture_output=True, text=True, timeout=30)
        return p.returncode == 0 and p.stdout.strip() == "idle"

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def logs(self, *names: str) -> str:
        out = []
        for name in names or DAEMONS:
            for suffix in (".out", ".log"):
                f = self.root / f"{name}{suffix}"
                if f.is_file():
                    out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Jobs first (SLURM ends their processes), then the daemons in reverse order, by PID:
        SIGTERM, then SIGKILL after 15 s."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            env = self.env()
            try:          # a controller too slow to answer must not keep the daemons alive
                subprocess.run(["scancel", "--user", str(os.geteuid())], env=env, capture_output=True, timeout=60)
                deadline = time.time() + 90
                while time.time() < deadline and set(subprocess.run(
                        ["squeue", "-h", "-o", "%t"], env=env, capture_output=True, text=True,
                        timeout=60).stdout.split()) & {"R", "CG", "CF"}:
                    time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs.clear()
