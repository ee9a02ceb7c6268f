"""Compute nodes on one machine for the multi-node Slurm test: a Linux bridge in the root network namespace
and, per node, a network namespace with its own address (a veth pair into the bridge), plus, for the daemon
started on it, its own hostname (a UTS namespace) and an /etc/hosts naming every node (bind-mounted in a
private mount namespace). So a node's name resolves to its own address, as on a cluster:
torchrun's rendezvous recognises the host node by it, and gloo binds to it. The addresses are 10.213.<x>.0/24
on the bridge alone: no route, forwarding or NAT leads off the machine. Files are shared (one file system), so
the repository, the run directories and munge's socket are the same on every node."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _tag() -> str:
    """Part of every name made here: two test processes (pytest workers) keep theirs apart."""
    return f"{os.getpid() % 0xFFFF:04x}"


def unavailable() -> Optional[str]:
    """Why namespaced nodes cannot be made here (not root, no `ip`/`unshare`, the kernel refuses), or None.
    `ip` is installed (Debian's iproute2) when missing and we are root, as slurm_cluster.install() does for
    Slurm; a failed install as root raises."""
    if os.geteuid() != 0:
        return "network namespaces for the Slurm nodes need root (ip netns add, veth, bridge)"
    if shutil.which("ip") is None:
        from tests.e2e.slurm_cluster import apt_install

        reason = apt_install(["iproute2"])
        if reason:
            return f"no `ip` command: {reason}"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command (util-linux) to start a node's daemon in its namespaces"
    probe, veth, bridge = f"magi-probe-{os.getpid()}", f"mgp{_tag()}", f"mgq{_tag()}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace (ip netns add: {made.stderr.strip()})"
        made = _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a veth pair into a network namespace ({made.stderr.strip()})"
        made = _ip("link", "add", bridge, "type", "bridge", check=False)
        if made.returncode != 0:
            return f"cannot create a bridge ({made.stderr.strip()})"
    finally:
        _ip("link", "del", veth, check=False)
        _ip("link", "del", bridge, check=False)
        _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> int:
    """The x of a 10.213.x.0/24 that no interface of this namespace uses (another test run may hold one)."""
    used = _ip("-o", "-4", "addr").stdout
    start = os.getpid() % 200 + 20
    for x in list(range(start, 250)) + list(range(20, start)):
        if f" 10.213.{x}." not in used:
            return x
    raise RuntimeError("no free 10.213.x.0/24 for the test nodes")


class NodeNetwork:
    """`nodes` namespaces node1..nodeN on one bridge; `with NodeNetwork(2, workdir) as net:` creates and removes
    them (on any failure too). `net.exec_prefix(i)` is the command prefix that runs a program on node i."""

    def __init__(self, nodes: int, workdir: Path):
        self.hosts = workdir / "hosts"  # the nodes' /etc/hosts
        tag = _tag()
        self.x = _free_subnet()
        self.bridge = f"mgb{tag}"
        self.names = [f"node{i + 1}" for i in range(nodes)]
        self.namespaces = [f"magi-{tag}-{name}" for name in self.names]
        self.veths = [f"mgv{tag}n{i + 1}" for i in range(nodes)]  # interface names have at most 15 characters
        self.gateway = f"10.213.{self.x}.1"  # the bridge's own address: slurmctld listens there
        self.addresses = [f"10.213.{self.x}.{11 + i}" for i in range(nodes)]

    def __enter__(self) -> "NodeNetwork":
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # The IPv4-mapped IPv6 form too: TCPStore looks up the name of its clients' dual-stack addresses
        # (a warning for each one it cannot name; a cluster's DNS names them).
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(
            f"{a} {n}\n::ffff:{a} {n}\n" for a, n in zip(self.addresses, self.names)))
        for ns, veth, addr in zip(self.namespaces, self.veths, self.addresses):
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def exec_prefix(self, i: int) -> List[str]:
        """Run on node i: in its network namespace, with its hostname and the nodes' /etc/hosts. (Not `ip netns
        exec`: it mounts a fresh /sys, without the cgroup file systems that slurmd requires.)"""
        return ["nsenter", f"--net=/var/run/netns/{self.namespaces[i]}", "unshare", "--mount", "--uts",
                "sh", "-c", 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"',
                self.names[i], str(self.hosts)]

    def pids(self, i: int) -> List[int]:
        out = _ip("netns", "pids", self.namespaces[i], check=False).stdout
        return [int(p) for p in out.split()]

    def destroy(self) -> None:
        """Kill what still runs on the nodes (job steps outliving slurmd), then remove every namespace and
        interface made; each removal is tried whatever became of the others."""
        for i in range(len(self.names)):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in self.pids(i):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 10
                while self.pids(i) and time.monotonic() < deadline:
                    time.sleep(0.2)
        for ns, veth in zip(self.namespaces, self.veths):
            _ip("link", "del", veth, check=False)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> List[str]:
        """What destroy() could not remove (a test asserts it is nothing)."""
        names = _ip("netns", "list", check=False).stdout
        links = _ip("-o", "link", check=False).stdout
        return ([ns for ns in self.namespaces if ns in names]
                + [dev for dev in [self.bridge, *self.veths] if f" {dev}:" in links or f" {dev}@" in links])
