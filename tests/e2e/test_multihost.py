"""The mesh across hosts: three network namespaces stand in for three machines.

Host A runs Redis, the router and the gateway; hosts B and C run slots (0 and 2 on B, 1 on C).
Each host has one interface, its end of a veth pair whose other end sits on a bridge in a fourth
namespace, with addresses in a subnet that exists only inside these namespaces, so the machine's
own network is never touched. Every process is started inside its host with `ip netns exec`, by
the same module and flags `nitsum up` uses, and stopped by its pid; the namespaces go in a
`finally`. The test process cannot reach that network, so its requests run inside host A
(`tests/e2e/netns_client.py`).

What crosses hosts: the prompt's KV from the prefill group on B to the decode group on C, and,
after the plan `p1,d1` (slot 2 idle) becomes `p1,d2`, the weight bytes slot 2 (on B, holding
nothing) fetches from slot 1 (on C, the only slot holding any) over gloo, and the decode group's
TP-2 collectives between C and B. Needs root and `ip netns` (skipped where they are refused).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.supervise import stop_processes

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.213.7"  # exists only inside the test's namespaces
IFNAME = "nt0"  # each host's one interface: its end of a veth pair to the bridge
HOSTS = ("a", "b", "c")
SLOT_HOSTS = ("b", "c", "b")  # slot index -> host: the prefill slot and the decode slot on different hosts
REDIS_PORT, GATEWAY_PORT, ADMIN_PORT = 6379, 8000, 8001  # fresh namespaces: every port is free
ADMIN_KEY = "multihost-admin-key"
# UCX sees one machine (one boot id) and would move NIXL's bytes by CMA, around the network;
# tcp alone makes it go through the veths, as between real hosts.
SLOT_ENV = {"OMP_NUM_THREADS": "1", "UCX_TLS": "tcp"}
KV_BACKEND = "auto"  # the slots' default: NIXL where it passes its self-test, else sockets (both cross hosts)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15, check=False)


def _ip_ok(*args: str) -> None:
    r = _ip(*args)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@pytest.fixture(scope="session")  # before the session's model and engine fixtures
def netns_allowed() -> None:
    """Skips unless this process may make namespaces, bridges and veth pairs (tried on a throwaway one)."""
    if os.geteuid() != 0:
        pytest.skip("multi-host test: needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("multi-host test: no `ip` binary (iproute2) on this machine")
    probe = f"nitsum{os.getpid()}probe"
    try:
        for args in (("netns", "add", probe), ("-n", probe, "link", "add", "br0", "type", "bridge"),
                     ("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")):
            r = _ip(*args)
            if r.returncode != 0:
                reason = (r.stderr.strip().splitlines() or ["failed"])[0]
                pytest.skip(f"multi-host test: `ip {' '.join(args)}` is refused here: {reason}")
    finally:
        _ip("netns", "del", probe)


@dataclass(frozen=True)
class Network:
    prefix: str  # unique per test run: namespaces are global to the machine

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    @staticmethod
    def addr(host: str) -> str:
        return f"{SUBNET}.{HOSTS.index(host) + 1}"


@contextmanager
def network() -> Iterator[Network]:
    """Hosts a, b, c on one bridge (in namespace `br`); every namespace is deleted on the way out."""
    net = Network(f"nitsum{os.getpid()}")
    bridge = net.ns("br")
    made: list[str] = []
    try:
        for ns in (bridge, *map(net.ns, HOSTS)):
            _ip_ok("netns", "add", ns)
            made.append(ns)
            _ip_ok("-n", ns, "link", "set", "lo", "up")
        _ip_ok("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip_ok("-n", bridge, "link", "set", "br0", "up")
        for host in HOSTS:  # both ends are made inside namespaces: no name is ever seen by the machine
            _ip_ok("-n", bridge, "link", "add", f"v{host}", "type", "veth", "peer", "name", IFNAME,
                   "netns", net.ns(host))
            _ip_ok("-n", bridge, "link", "set", f"v{host}", "master", "br0", "up")
            _ip_ok("-n", net.ns(host), "addr", "add", f"{net.addr(host)}/24", "dev", IFNAME)
            _ip_ok("-n", net.ns(host), "link", "set", IFNAME, "up")
        yield net
    finally:
        for ns in reversed(made):  # a namespace's veth ends (and so their peers) go with it
            _ip("netns", "del", ns)


@dataclass
class Processes:
    """The mesh's processes, each inside its host's namespace; stopped by pid, Redis last."""

    net: Network
    log_dir: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def spawn(self, name: str, host: str, module_args: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            # `ip netns exec` execs the command after entering the namespace: the pid is Python's
            proc = subprocess.Popen(["ip", "netns", "exec", self.net.ns(host), sys.executable, "-m", *module_args],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True)
        self.started.append((name, proc))

    def dead(self) -> list[str]:
        return [f"{name} exited with {p.returncode}:\n{self.tail(name)}" for name, p in self.started
                if p.poll() is not None]

    def tail(self, name: str, chars: int = 2500) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        services = [p for name, p in reversed(self.started) if name != "redis"]
        stop_processes(services, timeout_s=10)
        stop_processes([p for name, p in self.started if name == "redis"], timeout_s=5)


def start_mesh(procs: Processes, model: Path) -> None:
    """The processes `nitsum up` starts for `--plan p1,d1 --slots 3`, spread over the hosts."""
    a = Network.addr("a")
    redis_url = f"redis://{a}:{REDIS_PORT}/0"
    procs.spawn("redis", "a", ["services.cluster.redis_server", "--host", a, "--port", str(REDIS_PORT)])
    for index, host in enumerate(SLOT_HOSTS):
        procs.spawn(f"slot{index}", host, [
            "services.node.slot_cli", "--index", str(index), "--model", str(model), "--host", Network.addr(host),
            "--redis-url", redis_url, "--kv-backend", KV_BACKEND, "--kv-cache-gib", "0.25", "--max-num-seqs", "8",
            "--dist-timeout", "30"], SLOT_ENV)
    # The router stores the plan (slot 2 idle) and brings the slots to it once they register.
    procs.spawn("router", "a", ["router.live.service_cli", "--redis-url", redis_url, "--host", a,
                                "--admin-port", str(ADMIN_PORT), "--plan", "p1,d1", "--slots", "3"],
                {"NITSUM_ADMIN_KEY": ADMIN_KEY})
    procs.spawn("gateway", "a", ["services.gateway", "--model", str(model), "--host", a,
                                 "--port", str(GATEWAY_PORT), "--redis-url", redis_url])


def in_host_a(procs: Processes, *args: str, timeout_s: float = 60) -> dict[str, Any]:
    """Run tests/e2e/netns_client.py inside host A; fails with the mesh's logs when a process died."""
    client = subprocess.Popen(["ip", "netns", "exec", procs.net.ns("a"), sys.executable, "-m",
                               "tests.e2e.netns_client", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=ROOT, text=True)
    deadline = time.monotonic() + timeout_s
    while client.poll() is None:
        dead = procs.dead()
        if dead or time.monotonic() > deadline:
            client.kill()
            client.wait()
            raise AssertionError(f"netns_client {args[0]}: " + ("\n".join(dead) or f"no answer in {timeout_s:g}s"))
        time.sleep(0.1)
    out, err = client.communicate()
    assert client.returncode == 0, f"netns_client {' '.join(args[:1])} failed: {err[-3000:]}"
    return json.loads(out.splitlines()[-1])


@pytest.mark.timeout(240)
def test_a_mesh_across_three_hosts_serves_hands_off_kv_and_recuts(
        netns_allowed: None, tiny_model_dir: Path, reference, tmp_path: Path) -> None:
    tok = reference.tokenizer
    prompt, n = tok.encode("Once upon a time"), 24
    want = tok.decode(reference(prompt, n))
    a = Network.addr("a")
    gateway, router, redis_url = f"http://{a}:{GATEWAY_PORT}", f"http://{a}:{ADMIN_PORT}", f"redis://{a}:{REDIS_PORT}/0"
    started = time.monotonic()
    with network() as net:
        procs = Processes(net, tmp_path)
        try:
            start_mesh(procs, tiny_model_dir)
            in_host_a(procs, "health", gateway, "100", timeout_s=110)
            up_s = time.monotonic() - started
            slots = in_host_a(procs, "slots", redis_url)
            assert {int(i): s["address"].rsplit(":", 1)[0] for i, s in slots.items()} == {
                i: Network.addr(h) for i, h in enumerate(SLOT_HOSTS)}  # each slot registered its host's address
            leaders = {i: slots[i]["kv_backend"] for i in ("0", "1")}  # p1 on slot 0, d1 on slot 1
            assert set(leaders.values()) <= ({"nixl", "local"} if KV_BACKEND == "auto" else {KV_BACKEND}), leaders

            # 1. prefill on B, decode on C: the prompt's KV crosses hosts.
            got = in_host_a(procs, "complete", gateway, json.dumps(prompt), str(n))
            assert got["text"] == want and got["streamed"] == want

            # 2. slot 2 (B) holds nothing and slot 1 (C) the whole model: a TP-2 decode group over
            # both makes slot 2 fetch its half from slot 1, across hosts.
            shown = in_host_a(procs, "admin", router, ADMIN_KEY, "GET", "/admin/plan")["body"]
            assert {s["index"]: s["held"] for s in shown["slots"]} == {0: [1, 0], 1: [1, 0], 2: None}
            applied = in_host_a(procs, "admin", router, ADMIN_KEY, "POST", "/admin/plan",
                                json.dumps({"plan": "p1,d2"}), timeout_s=150)
            report = applied["body"]
            assert applied["status"] == 200 and report["result"] == "committed", report
            assert report["peer_bytes"] > 0 and report["disk_bytes"] == 0, report
            decode = [g for g in report["groups"] if g["role"] == "decode"]
            assert [g["slots"] for g in decode] == [[1, 2]] and decode[0]["peer_bytes"] > 0

            # 3. and serves: prefill on B, decode TP 2 with ranks on C and B.
            groups = {i: s["group"] for i, s in in_host_a(procs, "slots", redis_url).items()}
            assert [(groups[i]["tp"], groups[i]["rank"]) for i in ("1", "2")] == [(2, 0), (2, 1)], groups
            got = in_host_a(procs, "complete", gateway, json.dumps(prompt), str(n))
            assert got["text"] == want and got["streamed"] == want
            print(f"multi-host mesh: up in {up_s:.1f}s, re-cut {report['seconds']:.2f}s "
                  f"({report['peer_bytes']} peer bytes), all in {time.monotonic() - started:.1f}s")
        finally:
            procs.stop()
