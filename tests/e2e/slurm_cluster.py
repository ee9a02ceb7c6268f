"""A real single-node Slurm for the tests: Debian's slurm-wlm and munge, started as root in a directory of
the test's own (its slurm.conf, keys, state, logs), on free ports, so nothing of the host's Slurm (if any)
is touched. `SlurmCluster.env` is the environment every client command needs (SLURM_CONF)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["sbatch", "slurmctld", "slurmd", "munged", "mungekey"]


def missing_programs() -> List[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def install() -> Optional[str]:
    """Install the Debian packages when a program is missing; returns why Slurm cannot be had (not root,
    no apt), or None. An apt failure as root raises: in CI that is an error, not a reason to skip."""
    if not missing_programs():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(missing_programs())} missing) and installing {PACKAGES} needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and this machine has no apt-get to install slurm-wlm and munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    if missing_programs():
        raise RuntimeError(f"installed {PACKAGES} but still missing: {missing_programs()}")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, one partition `debug` holding it."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env: Dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: List[subprocess.Popen] = []

    def start(self, timeout: float = 60.0) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)  # munged wants the socket's directory searchable by everyone
        key, sock = r / "munge.key", r / "munge.sock"
        self.run(_sbin("mungekey"), "--create", "--force", f"--keyfile={key}")
        key.chmod(0o600)
        self.run(_sbin("munged"), "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={r / 'munged.pid'}",
                 f"--seed-file={r / 'munged.seed'}", f"--log-file={r / 'log' / 'munged.log'}")
        cpus = os.cpu_count() or 1
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text("\n".join([
            "ClusterName=magitest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # A requeued job may start cred_expire + 1 s after it ended (default 120 s); 10 s keeps tests short.
            f"AuthInfo=socket={sock},cred_expire=10",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            # No cgroups in a container: processes are tracked by parentage, no task binding.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
            "ReturnToService=2", "MinJobAge=3600",  # finished jobs stay visible to scontrol
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        for daemon, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D"])):
            log = open(r / "log" / f"{daemon}.out", "w")
            self.procs.append(subprocess.Popen([_sbin(daemon), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(1)
        raise RuntimeError(f"Slurm did not come up in {timeout:.0f}s; see {r / 'log'}:\n{self.logs()}")

    def run(self, *cmd: str) -> str:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")))

    def sbatch(self, *args: str, cwd: Path, env: Optional[Dict[str, str]] = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id))
        fields = {}
        for token in text.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, job_id: int, until, timeout: float, what: str) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id}: not {what} after {timeout:.0f}s ({self.job(job_id)})\n{self.logs()}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        sock = self.root / "munge.sock"
        subprocess.run([_sbin("munged"), "--stop", f"--socket={sock}"], capture_output=True)
