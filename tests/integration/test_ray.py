"""The images run what the field's launcher runs in them: each node's container starts
``./run-cluster-node.sh`` in the image's working directory, and the nodes form one Ray
cluster over the network. On the bed: real Ray (the bed's index serves it), the head's
image (either store) and the copies ``distribute`` put on the workers (w1-w3 and c1, the
containerd store), a remote task on every node, and nothing left running."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest

from .conftest import HEAD_STORES, NODE_WHEELS, MiniStack, testbed, use_every_worker_kind

pytestmark = pytest.mark.bed

C1_ADDR = testbed.CTRD_ADDR  # the bed's containerd-store worker
HEAD_IP = "127.0.0.20"  # a loopback address of its own: the workers' are .2 to .9
CLIENT_PORT = 10001  # the head's Ray Client server (ray start --head's default)
LABEL = "org.imagebuild.test=ray"

# a Ray Client of the cluster, in a container of the same image beside the head's (not
# a docker exec: the bed's chroot engines do not enter a container's mounts for it):
# wait for every node, then one task pinned to each
PROBE = """
import json, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
want, address = int(sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 180
while True:  # the head's client server answers a little after the head starts
    try:
        ray.init(address, log_to_driver=False)
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(2)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want or time.monotonic() > deadline:
        break
    time.sleep(1)

@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()

pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
    n["NodeID"], soft=False)).remote() for n in alive]
print(json.dumps({"nodes": len(alive), "ips": sorted(ray.get(pinned, timeout=180))}))
"""


def _run_args(name: str, port: int, *role: str) -> list[str]:
    """``docker run`` of a node as the launcher starts it: host network, the image's
    working directory, its node script."""
    return ["run", "-d", "--name", name, "--label", LABEL, "--network", "host",
            "--shm-size", "512m", "-e", "RAY_USAGE_STATS_ENABLED=0", "vllm-node:latest",
            "./run-cluster-node.sh", *role, "--port", str(port)]


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_the_distributed_images_form_a_ray_cluster(mini: MiniStack) -> None:
    # the real spec's runtime contract: ray[default] in the locked closure
    mini.edit_spec(NODE_WHEELS, NODE_WHEELS.replace(
        "    torch: torch\n", '    torch: torch\n    requires: ["ray[default]"]\n'))
    r = mini.cli("lock")
    assert r.returncode == 0, r.stderr
    assert "ray" in (mini.root / "locks" / "pylock.vllm-node.toml").read_text()
    r = mini.cli("build", "node", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    # over ssh (the registry's blobs are test_registry's to count), to the classic
    # workers and c1 (the containerd store), holding nothing: the other head's run of
    # this test left the same derivation there under other IDs, and on Docker 26.1's
    # containerd store an image replaced under its tag while a container holds it
    # leaves a record that hides the image list
    testbed.cmd_reset_workers()
    use_every_worker_kind(mini)
    workers = [*mini.bed.workers[:3], "c1"]
    r = mini.cli("distribute", "--via", "ssh", "--workers", ",".join(workers), "node",
                 timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    addrs = {w: testbed.worker_addr(i) for i, w in enumerate(mini.bed.workers, 1)}
    addrs["c1"] = C1_ADDR
    port = 26379
    tag = uuid.uuid4().hex[:8]
    started: list[str] = []  # "" for the head, else the worker
    try:
        r = mini.bed.docker(*_run_args(f"ray-head-{tag}", port, "--role", "head",
                                       "--host-ip", HEAD_IP))
        assert r.returncode == 0, r.stderr
        started.append("")
        _wait_started(mini, "", f"ray-head-{tag}")
        # one node after another: a raylet has 30 s (fixed in Ray) to register, which
        # five starting at once on the bed's two cores do not always make
        for w in workers:
            r = mini.bed.ssh(w, "docker", *_run_args(
                f"ray-{w}-{tag}", port, "--role", "worker", "--head-ip", HEAD_IP,
                "--host-ip", addrs[w]))
            assert r.returncode == 0, (w, r.stderr)
            started.append(w)
            _wait_started(mini, w, f"ray-{w}-{tag}")
        r = mini.bed.docker("run", "--rm", "--label", LABEL, "--network", "host",
                            "-e", "RAY_USAGE_STATS_ENABLED=0", "vllm-node:latest",
                            "python3", "-c", PROBE, str(len(workers) + 1),
                            f"ray://{HEAD_IP}:{CLIENT_PORT}")
        assert r.returncode == 0, r.stderr[-3000:] + _logs(mini, tag, workers)
        seen = json.loads(r.stdout.strip().splitlines()[-1])
        assert seen["nodes"] == len(workers) + 1, (seen, _logs(mini, tag, workers))
        assert set(seen["ips"]) == {HEAD_IP, *(addrs[w] for w in workers)}, seen
    finally:
        for w in started:
            name = f"ray-{w}-{tag}" if w else f"ray-head-{tag}"
            if w:
                mini.bed.ssh(w, "docker", "rm", "-f", name)
            else:
                mini.bed.docker("rm", "-f", name)
    # nothing left running anywhere
    assert mini.bed.docker("ps", "-aq", "--filter", f"label={LABEL}").stdout.strip() == ""
    for w in workers:
        assert mini.bed.ssh(w, "docker", "ps", "-aq", "--filter",
                            f"label={LABEL}").stdout.strip() == "", w
    # and every engine still lists its images (a Ray node on the bed's containerd-store
    # engines once left their image list empty while the images were there)
    assert mini.bed.docker("images", "-q", "vllm-node:latest").stdout.strip()
    for w in workers:
        assert mini.bed.ssh(w, "docker", "images", "-q", "vllm-node:latest").stdout.strip(), w


def _wait_started(mini: MiniStack, worker: str, name: str) -> None:
    """Until the node's ``ray start`` says its runtime started (its container still
    running); a node that stopped, or never says so, fails the test with its log."""
    def docker(*args: str) -> subprocess.CompletedProcess[str]:
        return mini.bed.ssh(worker, "docker", *args) if worker else mini.bed.docker(*args)

    deadline = time.monotonic() + 300
    while True:
        logs = docker("logs", name)
        if "Ray runtime started" in logs.stdout + logs.stderr:
            return
        running = docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        assert running == "true" and time.monotonic() < deadline, (
            f"{name} did not start: {(logs.stdout + logs.stderr)[-2000:]}")
        time.sleep(2)


def _logs(mini: MiniStack, tag: str, workers: list[str]) -> str:
    """The nodes' output, for a failure's message."""
    out = [mini.bed.docker("logs", "--tail", "30", f"ray-head-{tag}").stderr]
    for w in workers:
        out.append(mini.bed.ssh(w, "docker", "logs", "--tail", "30", f"ray-{w}-{tag}").stderr)
    return "\n---\n".join(out)
