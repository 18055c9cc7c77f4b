"""The training example runs end to end: master + peers, one killed, one added."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import peer_env, torch_or_skip

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_swarm.py"


def test_train_swarm_example_with_churn(tmp_path):
    torch_or_skip()
    argv = [sys.executable, str(EXAMPLE), "--peers", "2", "--steps", "16", "--kill-at", "4", "--join-at", "8"]
    argv += ["--step-time", "0.05", "--timeout", "150"]
    log = open(tmp_path / "train_swarm.log", "w+")
    # Own session: the whole tree is killed should the test fail or time out.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=peer_env(), start_new_session=True)
    try:
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stray children, if any
            except ProcessLookupError:
                pass
        log.seek(0)
        out = log.read()
        log.close()
    assert rc == 0, out[-4000:]
    assert "killing peer 1" in out and "adding peer 2" in out, out[-4000:]
    assert "[peer 2] received" in out, out[-4000:]  # the newcomer got the state by sync
    assert "surviving peers finished 16 steps" in out
    steps = [line for line in out.splitlines() if " step " in line and " loss " in line]
    assert any(line.endswith("world 2") for line in steps)
