"""A real Slurm for the tests: Debian's slurm-wlm and munge, started as root in a directory of the test's own
(its slurm.conf, keys, state, logs), on free ports, so nothing of the host's Slurm (if any) is touched.
One node (this host, on 127.0.0.1), or with a `NodeNetwork` (tests/e2e/netns.py) one slurmd per network
namespace, each node with its own name and address, slurmctld on the bridge's address in the root namespace.
`SlurmCluster.env` is the environment every client command needs (SLURM_CONF).

munged runs once, in the root namespace: its socket is a file, reached from every namespace, and all nodes
share its key, as a cluster's nodes do."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    from tests.e2e.netns import NodeNetwork

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["sbatch", "slurmctld", "slurmd", "munged", "mungekey"]


def missing_programs() -> List[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def apt_install(packages: List[str]) -> Optional[str]:
    """apt-get install `packages`; returns why it cannot be done (not root, no apt), or None. An apt failure
    as root raises: in CI that is an error, not a reason to skip."""
    if os.geteuid() != 0:
        return f"installing {packages} needs root"
    if shutil.which("apt-get") is None:
        return f"this machine has no apt-get to install {packages}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return None


def install() -> Optional[str]:
    """Install the Debian packages when a program is missing; returns why Slurm cannot be had, or None."""
    if not missing_programs():
        return None
    reason = apt_install(PACKAGES)
    if reason:
        return f"Slurm is not installed ({', '.join(missing_programs())} missing) and {reason}"
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
    """munged + slurmctld + one slurmd per node, one partition `debug` holding every node. Use it as
    `with SlurmCluster(root) as cluster:` (or SlurmCluster(root, network)): the daemons stop on the way out,
    also when start-up fails."""

    def __init__(self, root: Path, network: Optional["NodeNetwork"] = None):
        self.root = root
        self.network = network
        self.host = socket.gethostname().split(".")[0]
        if network is None:
            self.nodes, self.addresses, self.controller = [self.host], ["127.0.0.1"], "127.0.0.1"
        else:
            self.nodes, self.addresses, self.controller = network.names, network.addresses, network.gateway
        self.conf = root / "slurm.conf"
        self.env: Dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: List[subprocess.Popen] = []

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool/{node}" for node in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)  # munged wants the socket's directory searchable by everyone
        key, sock = r / "munge.key", r / "munge.sock"
        self.run(_sbin("mungekey"), "--create", "--force", f"--keyfile={key}")
        key.chmod(0o600)
        self.run(_sbin("munged"), "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={r / 'munged.pid'}",
                 f"--seed-file={r / 'munged.seed'}", f"--log-file={r / 'log' / 'munged.log'}")
        cpus = os.cpu_count() or 1
        # Every node is this machine: each may claim all of its CPUs and most of its memory.
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        nodes = [f"NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
                 for n, a in zip(self.nodes, self.addresses)]
        self.conf.write_text("\n".join([
            "ClusterName=magitest",
            f"SlurmctldHost={self.host}({self.controller})",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # A requeued job may start cred_expire + 1 s after it ended (default 120 s); 10 s keeps tests short.
            f"AuthInfo=socket={sock},cred_expire=10",
            # One SlurmdPort for all nodes: each slurmd listens in its own network namespace.
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            # %n: the node's name, so that the slurmds of one machine keep apart their spool, pid and log.
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            # No cgroups in a container: processes are tracked by parentage, no task binding.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
            "ReturnToService=2", "MinJobAge=3600",  # finished jobs stay visible to scontrol
            *nodes,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self._daemon("slurmctld", [_sbin("slurmctld"), "-D", "-i"])
        for i, node in enumerate(self.nodes):
            # Without a network the node is this host under its own name; with one, slurmd finds its node
            # name from the hostname its namespace gives it, as on a cluster.
            prefix = self.network.exec_prefix(i) if self.network else []
            self._daemon(f"slurmd-{node}", [*prefix, _sbin("slurmd"), "-D"])
        deadline = time.monotonic() + timeout
        states: Dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if len(states) == len(self.nodes) and all(s in ("idle", "mixed", "allocated") for s in states.values()):
                return
            time.sleep(1)
        raise RuntimeError(f"Slurm did not come up in {timeout:.0f}s (nodes {states}); see {r / 'log'}:\n{self.logs()}")

    def _daemon(self, name: str, cmd: List[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "w") as log:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def node_states(self) -> Dict[str, str]:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2) if out.returncode == 0 else {}

    def run(self, *cmd: str) -> str:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def run_quiet(self, *cmd: str) -> str:
        """stdout of a client command, or "" when it fails (the controller may already be gone)."""
        try:
            result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return ""
        return result.stdout.strip() if result.returncode == 0 else ""

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
        if self.conf.exists():
            self.run_quiet("scancel", "--user=root")
            # Let the slurmds end the job steps before they stop themselves (a step can outlive its slurmd).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run_quiet("squeue", "-h", "-o", "%i"):
                time.sleep(1)
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        sock = self.root / "munge.sock"
        subprocess.run([_sbin("munged"), "--stop", f"--socket={sock}"], capture_output=True)
