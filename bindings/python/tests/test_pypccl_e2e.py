"""End to end in PCCL 1.0's (pypccl's) style: the two-line master script
(``tests/pypccl_style/master.py``) and a DDP training loop written against
pypccl's API only (``tests/pypccl_style/ddp_peer.py``), with a peer that
joins late and receives the model and optimizer state by sync. All are real
processes on free ports, reaped pass or fail."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from conftest import HERE, Launcher, Peer, torch_or_skip
from test_master_lifetime import SERVING_LINE, free_port, wait_for_text

STYLE = HERE / "pypccl_style"


def test_pypccl_ddp_with_late_joiner(tmp_path):
    torch_or_skip()
    addr = f"127.0.0.1:{free_port()}"
    env = {"PCCL_TEST_MASTER_ADDRESS": addr, "EXPECTED_WORLD_SIZE": "3", "MAX_STEPS": "20", "EXTRA_STEPS": "8"}
    launcher = Launcher(addr, tmp_path)
    try:
        master = Peer("master", [sys.executable, str(STYLE / "master.py")], tmp_path / "master.log", env=env)
        launcher.peers.append(master)
        wait_for_text(master.log_path, SERVING_LINE, master.proc, timeout=60)

        def peer(rank: int) -> Peer:
            p = Peer(f"ddp[{rank}]", [sys.executable, str(STYLE / "ddp_peer.py")], tmp_path / f"ddp-{rank}.log",
                     env={**env, "RANK": str(rank)})
            launcher.peers.append(p)
            return p

        early = [peer(0), peer(1)]
        # Add the third peer once the first two are training together.
        early[0].wait_event(lambda e: e.get("event") == "step" and e["revision"] >= 5, timeout=180)
        late = peer(2)
        results = [p.wait_event(lambda e: e.get("event") == "result", timeout=240) for p in early + [late]]
        for p in early + [late]:
            assert p.proc.wait(timeout=30) == 0, p.stderr_text()
        # The master keeps serving after its script ended, until SIGTERM.
        assert master.proc.poll() is None
        master.kill(signal.SIGTERM)
        assert master.proc.wait(timeout=30) == 0, master.stderr_text()
    finally:
        launcher.reap_all()

    r0, r1, r2 = results
    # Identical model and optimizer state, at the same revision, on all three.
    assert r0["revision"] == r1["revision"] == r2["revision"] >= 20, results
    assert r0["digest"] == r1["digest"] == r2["digest"], results
    # The newcomer received the state at its first sync, at the revision the
    # others had reached, and then trained with them.
    assert r2["first_sync"]["revision"] >= 5 and r2["first_sync"]["rx_bytes"] > 0, r2
    assert r2["reached_at"] == r0["reached_at"] == r1["reached_at"] == r2["first_sync"]["revision"]
    assert r2["steps"] >= 8 and r0["steps"] >= r2["steps"] + 5
    # Steps ran with three peers, and ReduceInfo has both world-size names.
    steps0 = [e for e in early[0].events if e.get("event") == "step"]
    assert any(e["world"] == 3 and e["world_size"] == 3 for e in steps0)
    # It learns.
    losses = r0["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert r0["cuda"] is False
