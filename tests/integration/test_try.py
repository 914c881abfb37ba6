"""The newcomer's command, run as CI runs it: non-interactive, from each head store.

Its second run (the no-op paths: nothing rebuilt, nothing sent) is not repeated here:
test_build's second build and test_distribute's second fan-out assert those paths."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from .conftest import HEAD_STORES, REPO, Bed, testbed

pytestmark = pytest.mark.bed


def _try(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "try"), *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=1200,
                          env=dict(os.environ, CI="true"))


@pytest.mark.parametrize("head_store", HEAD_STORES)
def test_try_runs_the_whole_job(bed: Bed, head_store: str) -> None:
    # the stack's state and backups live in the bed: start this head's run from none
    # (and from empty workers), as a newcomer's first run would
    for sub in ("state", "backups"):
        shutil.rmtree(bed.root / sub, ignore_errors=True)
    testbed.cmd_reset_workers()
    first = _try("--head-store", head_store)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    version = testbed.CTRD_DOCKER if head_store == "containerd" else "20.10"
    assert f"== the head is on the {head_store} image store: {version}" in out
    for cmd in ("$ imagebuild plan mimo", "$ imagebuild build mimo", "$ imagebuild verify",
                "$ imagebuild distribute --workers 3", "$ docker image prune -a -f",
                "w1 docker image prune -a -f", "$ imagebuild status",
                "$ imagebuild prune --workers 3", "docker rmi -f",
                "$ imagebuild restore-from-tar mimo"):
        assert cmd in out, cmd
    # after the blind prunes, status shows every image rooted and up to date everywhere
    status = out[out.index("$ imagebuild status"):out.index("== imagebuild prune")]
    for name in ("vllm-node ", "vllm-node-tf5", "vllm-node-mimo"):
        row = next(ln for ln in status.splitlines() if ln.startswith(name))
        assert "yes" in row and row.count("up to date") == 3, row
    assert out.index("$ imagebuild build mimo") < out.index("$ imagebuild distribute")
    assert "all checks passed: vllm-node, vllm-node-tf5, vllm-node-mimo" in out
    assert re.search(r"built [03], restored 0, reused [03]", out)  # no backups to restore
    assert "vllm-node-mimo: loaded" in out and "vllm-node-mimo: verified" in out
    summary = out[out.index("== summary"):]
    for w in bed.workers:
        assert f"{w}: up to date" in summary
    assert re.search(r"vllm-node-mimo\s+current [0-9a-f]{12}, [12] generation", summary)
    assert re.search(r"blobs\s+\d.* in \d+ blobs", summary)
    assert str(bed.root / "backups") in summary
    assert "scripts/testbed down" in summary


def test_try_refuses_an_unknown_head_store() -> None:
    r = _try("--head-store", "zfs")
    assert r.returncode == 2 and "classic or containerd, not 'zfs'" in r.stderr
    r = _try("--bogus")
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
