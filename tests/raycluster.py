"""A real multi-node Ray on this machine: a head and worker nodes joined with `ray start --address`.

Each node gets its own loopback address (127.0.0.2 for the head, 127.0.0.3, ... for workers: the whole
127.0.0.0/8 range is this machine, and Ray swaps a literal 127.0.0.1 for the machine's own network
address), so the cluster looks like several hosts and all traffic stays on loopback; its own --temp-dir and every port given explicitly, so that nodes
and other Rays on the machine never share a socket or a port. Every process runs with its own HOME:
a `ray.init()` elsewhere leaves ~/.ray/auth_token behind, which `ray start` would silently pick up.
Token authentication is on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), as on a KubeRay cluster.

Stopping kills only what this module started: each `ray start --block` leads its own process group,
and any straggler whose command line names one of our temp dirs. Never `ray stop`: it ends every Ray
on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
HEAD_IP = "127.0.0.2"
WORKER_PORTS = 40  # per node: enough for the workers, actors and Ray Data stages of one job


_taken: set[int] = set()  # every port handed out here: the kernel may offer a just-closed one again


def free_port() -> int:
    """A port free now and never handed out before by this module (Ray refuses one port for two components)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _taken:
            _taken.add(port)
            return port


def free_range(n: int) -> int:
    """The first of n consecutive free ports, none handed out before."""
    while True:
        start = free_port()
        ports = range(start, start + n)
        if start + n >= 65000 or _taken & set(ports[1:]):
            continue
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _taken.update(ports)
        return start


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    token: str
    gcs_port: int
    dashboard_port: int
    nodes: list[subprocess.Popen] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)
    gpus: int = 0  # logical GPUs per worker node
    restarts: dict[int, int] = field(default_factory=dict)  # node index: starts again after exiting at start

    @property
    def address(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    def ray(self, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        """A `ray ...` CLI call (job submit, job status, ...) with the cluster's environment and token."""
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def api(self, path: str) -> dict:
        """GET one of the dashboard's REST endpoints (what `ray job status/logs` read), with the token."""
        import json

        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    def wait_idle(self, timeout: float = 300) -> None:
        """Until every worker CPU is free again: the previous job's actors release theirs asynchronously."""
        code = "result = [ray.available_resources().get('CPU', 0), ray.cluster_resources().get('CPU', 0)]"
        deadline = time.time() + timeout
        free, total = None, None
        while time.time() < deadline:
            try:
                free, total = probe(self, code)
            except RuntimeError:  # busy cores: a driver may time out joining; ask again
                pass
            if free is not None and free == total:
                return
            time.sleep(1)
        # what holds them, from the State API: the actors still alive and the placement groups not removed
        holders = probe(self, (
            "from ray.util.state import list_actors, list_placement_groups\n"
            "result = [f\"{a.class_name} ({a.state}, job {a.job_id})\" for a in list_actors(filters=[('state', '!=', 'DEAD')])]"
            " + [f\"placement group {p.name or p.placement_group_id} ({p.state})\" for p in list_placement_groups(filters=[('state', '!=', 'REMOVED')])]"
        ))
        raise RuntimeError(f"the cluster's CPUs were not all free after {timeout:.0f}s ({free} of {total} free); "
                           f"holding them: {'; '.join(holders) or 'nothing the State API lists'}")

    def replace_node(self, ip: str) -> None:
        """Lose the worker node at `ip` as a cloud loses a VM (SIGKILL to its raylet, its Ray processes
        and its workers at once), then start a fresh node with the same address and CPUs, as an
        autoscaler or KubeRay would, and wait until it has joined."""
        i = self.ips.index(ip)
        _signal_group(self.nodes[i], signal.SIGKILL)
        self.nodes[i].wait(timeout=30)
        self._fresh_node(i)
        self.restarts[i] = 0
        # joined, and the lost one known dead (the GCS's health check): the cluster's CPUs add up again
        code = f"result = [n['Alive'] for n in ray.nodes() if n['NodeManagerAddress'] == '{ip}']"
        deadline = time.time() + 120
        while not _answer(self, lambda alive: alive.count(True) == 1 and False in alive, code):
            if time.time() > deadline:
                raise RuntimeError(f"the node replacing {ip} did not join")
            self.restart_exited(i)
            time.sleep(1)

    def restart_exited(self, i: int, most: int = 2) -> None:
        """Start worker node i again if its `ray start` exited while starting, as an autoscaler would
        start another: on busy cores its raylet can give up waiting for the dashboard agent's port file
        (a fixed 15 s, ray-project/ray#65983) and exit, and the node never joins."""
        if i == 0 or self.nodes[i].poll() is None:
            return
        self.restarts[i] = self.restarts.get(i, 0) + 1
        if self.restarts[i] > most:
            raise RuntimeError(f"node {self.ips[i]} exited at start {most + 1} times; see {self.root}/ray-start-{self.ips[i]}.log")
        self._fresh_node(i)

    def _fresh_node(self, i: int) -> None:
        """A fresh worker node in node i's place (same address and CPUs), once i's processes are gone."""
        _kill_stragglers([self.temp_dirs[i]])
        shutil.rmtree(self.temp_dirs[i], ignore_errors=True)
        _start_node(self, self.ips[i], head=False, cpus=self.cpus[i])
        for field_ in (self.nodes, self.temp_dirs, self.ips, self.cpus):  # the new node takes the old one's place
            field_[i] = field_.pop()

    def stop(self) -> None:
        # SIGKILL to every group at once, workers and head alike: a test cluster needs no graceful drain,
        # and a SIGTERMed node takes seconds to wind down.
        for proc in self.nodes:
            _signal_group(proc, signal.SIGKILL)
        for proc in self.nodes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _kill_stragglers(self.temp_dirs)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def start(root: Path, workers: int, cpus_per_worker: int, extra_env: dict[str, str], gpus_per_worker: int = 0) -> Cluster:
    """A head with no CPUs (it runs drivers, not work) and `workers` nodes of `cpus_per_worker` CPUs,
    each also advertising `gpus_per_worker` GPUs to Ray's scheduler (logical: this machine has none)."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    env = {
        **os.environ, **extra_env,
        "HOME": str(home),
        # DeepSpeed JIT-builds its shared-memory op once per extensions folder: share the session's
        # build (a minute of CPU on 2 cores) instead of making another in this cluster's HOME.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # A lost node is known dead after 3 missed health checks 1 s apart, not Ray's 5 at 3 s: a
        # test-speed setting only (the node-loss test waits on it twice: Ray Train's restart, replace_node).
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster(root, env, token, gcs_port=free_port(), dashboard_port=free_port(), gpus=gpus_per_worker)
    # Every process of this cluster finds its own State API: the tests' session Ray runs on this
    # machine too, and Ray Train's placement-group cleaner, scanning for "the" Ray, would find both
    # and die, leaving a finished trial's CPUs held (raykit.cluster.own_state_api, for a local Ray).
    env["RAY_API_SERVER_ADDRESS"] = cluster.address
    try:
        # One node at a time, each started again if it exits while starting: on 2 busy cores a node's
        # raylet may give up after a fixed 15 s waiting for its dashboard agent (ray-project/ray#65983),
        # and nodes starting together make their agents slower.
        for attempt in range(3):
            _start_node(cluster, HEAD_IP, head=True, cpus=0)
            if _head_joined(cluster):
                break
            _kill_stragglers(cluster.temp_dirs)
            shutil.rmtree(cluster.temp_dirs[0], ignore_errors=True)
            for field_ in (cluster.nodes, cluster.temp_dirs, cluster.ips, cluster.cpus):
                field_.pop()
        else:
            raise RuntimeError(f"the head node exited at start 3 times; see {cluster.root}/ray-start-{HEAD_IP}.log")
        for i in range(workers):
            _start_node(cluster, f"127.0.0.{3 + i}", head=False, cpus=cpus_per_worker)
            _wait_for_nodes(cluster, 2 + i)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_node(cluster: Cluster, ip: str, head: bool, cpus: int) -> None:
    # Short: Ray's Unix socket paths live under the temp dir and must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    cluster.temp_dirs.append(temp_dir)
    low = free_range(WORKER_PORTS)
    args = [
        str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}", f"--num-gpus={0 if head else cluster.gpus}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}",
        "--object-store-memory=200000000",
    ]
    if head:
        args += [
            "--head", f"--port={cluster.gcs_port}", "--include-dashboard=true", f"--dashboard-host={HEAD_IP}",
            f"--dashboard-port={cluster.dashboard_port}", f"--ray-client-server-port={free_port()}",
        ]
    else:
        args += [f"--address={HEAD_IP}:{cluster.gcs_port}"]
    log = open(cluster.root / f"ray-start-{ip}.log", "a")
    cluster.nodes.append(subprocess.Popen(args, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    cluster.ips.append(ip)
    cluster.cpus.append(cpus)


def _head_joined(cluster: Cluster, timeout: float = 180) -> bool:
    """True once the head's dashboard answers and its raylet has joined (a raylet registers only after
    its wait for the agents); False if the head exited first."""
    deadline = time.time() + timeout
    up = False
    while time.time() < deadline:
        if cluster.nodes[0].poll() is not None:
            return False
        if not up:
            try:
                with urllib.request.urlopen(f"{cluster.address}/api/version", timeout=2):
                    pass
                up = True
            except OSError as e:
                up = getattr(e, "code", None) in (401, 403)  # up, and asking for the token
        if up and _answer(cluster, lambda alive: alive == 1, "result = sum(n['Alive'] for n in ray.nodes())"):
            return True
        time.sleep(1)
    raise RuntimeError("the head node did not come up")


def _answer(cluster: Cluster, ok, code: str) -> bool:
    try:
        return ok(probe(cluster, code))
    except RuntimeError:  # a GCS just started, on busy cores, may not answer a driver in time yet
        return False


def _wait_for_nodes(cluster: Cluster, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    alive: object = None
    while time.time() < deadline:
        try:
            alive = probe(cluster, "result = sum(n['Alive'] for n in ray.nodes())")
        except RuntimeError as e:  # a GCS just started, on busy cores, may not answer a driver in time yet
            alive = e
        if alive == count:
            return
        for i in range(1, len(cluster.nodes)):
            cluster.restart_exited(i)
        time.sleep(1)
    raise RuntimeError(f"{count} nodes did not join in {timeout:.0f}s (last: {alive})")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _kill_stragglers(temp_dirs: list[str]) -> None:
    """Processes of ours that left the group (Ray's workers may): found by our temp dirs in their command line."""
    me = os.getpid()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == me:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(d in cmdline for d in temp_dirs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def probe(cluster: Cluster, code: str) -> object:
    """Run `code` in a driver joined to the cluster; it sets `result`, which comes back (as JSON)."""
    import json

    script = f"import json, ray\nray.init()\n{code}\nprint('RESULT ' + json.dumps(result))\n"
    env = {**cluster.env, "RAY_ADDRESS": f"{HEAD_IP}:{cluster.gcs_port}"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"probe failed: {done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
