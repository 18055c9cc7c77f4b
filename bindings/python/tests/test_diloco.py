"""pccl.diloco across real peer processes (``diloco_worker.py``): each mode
under churn (a founding group of 3, one SIGKILLed mid-all-reduce, a late
joiner, a graceful leave), bad input, and the char-LM example."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pccl
from conftest import HERE, peer_env, torch_or_skip

WORKER = HERE / "diloco_worker.py"
EXAMPLE = HERE.parent / "examples" / "diloco_charlm.py"


def spawn(launcher, name, **args):
    args.setdefault("master", launcher.master_addr)
    p = launcher.spawn_cmd(name, [sys.executable, str(WORKER), json.dumps(args)])
    return p


def spawn_waiting(launcher, name, **args):
    """A peer that imports everything, then waits for ``go()`` to connect."""
    from conftest import Peer

    args.setdefault("master", launcher.master_addr)
    args["wait_go"] = True
    p = Peer(name, [sys.executable, str(WORKER), json.dumps(args)], launcher.tmp / f"{name}.log", stdin=True)
    launcher.peers.append(p)
    return p


def go(p):
    p.proc.stdin.write("go\n")
    p.proc.stdin.flush()


def outer_events(p):
    return [e for e in p.events if e.get("event") == "outer"]


def check_hashes_agree(peers):
    """Every outer step reported by several peers has one state hash."""
    by_step = {}
    for p in peers:
        for e in outer_events(p):
            by_step.setdefault(e["outer_step"], {})[p.name] = e["hash"]
    for step, hashes in sorted(by_step.items()):
        assert len(set(hashes.values())) == 1, f"outer step {step}: hashes differ: {hashes}"
    return by_step


MODES = {
    # mode: worker arguments
    "sync": dict(mode="sync", H=4, steps=72, quant="minmax", error_feedback=True),
    "async": dict(mode="async", H=4, steps=72),
    "streaming": dict(mode="streaming", H=8, fragments=2, tau=2, steps=96),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_under_churn(launcher, mode):
    torch_or_skip()
    cfg = dict(MODES[mode], min_world=3, sleep=0.02, hidden=256)
    stay = spawn(launcher, f"{mode}-stay", rank=0, **cfg)
    victim = spawn(launcher, f"{mode}-victim", rank=1, die_at_outer=3, **cfg)
    leaver = spawn(launcher, f"{mode}-leaver", rank=2, **cfg)
    joiner = spawn_waiting(launcher, f"{mode}-joiner", rank=3, **cfg)
    joiner.wait_event(lambda e: e.get("event") == "ready", timeout=60)
    # The founding phase holds everyone until the group has 3 peers.
    first = [p.wait_event(lambda e: e.get("event") == "outer", timeout=60) for p in (stay, victim, leaver)]
    assert all(e["world"] == 3 for e in first), first
    victim.wait_event(lambda e: e.get("event") == "dying", timeout=60)
    victim.proc.wait(timeout=30)
    assert victim.proc.returncode == -signal.SIGKILL
    stay.wait_event(lambda e: e.get("event") == "outer" and e["world"] == 2, timeout=60)
    go(joiner)
    joined = joiner.wait_event(lambda e: e.get("event") == "joined", timeout=60)
    assert joined["inner_step"] > 0 and joined["outer_step"] > 0, joined
    joiner.wait_event(lambda e: e.get("event") == "outer", timeout=60)
    leaver.kill(signal.SIGTERM)  # graceful leave at its next outer event
    leaver.wait_event(lambda e: e.get("event") == "left", timeout=60)
    res = [p.result(timeout=90) for p in (stay, joiner)]
    for p in (stay, joiner, leaver):
        p.proc.wait(timeout=30)
        assert p.proc.returncode == 0, p.stderr_text()

    by_step = check_hashes_agree([stay, victim, leaver, joiner])
    # The joiner received exactly the group's state when it joined.
    assert by_step, "no outer steps"
    stay_hashes = {e["outer_step"]: e["hash"] for e in outer_events(stay)}
    assert stay_hashes.get(joined["outer_step"]) == joined["hash"], (joined, stay_hashes)
    # Both survivors end with the same outer state, at the same step.
    assert res[0]["hash"] == res[1]["hash"], res
    assert res[0]["outer_step"] == res[1]["outer_step"] and res[0]["inner_step"] == res[1]["inner_step"], res
    if mode in ("sync", "async"):
        # Model := outer at the end: exactly the others' parameters.
        assert res[0]["model_hash"] == res[1]["model_hash"], res
    worlds = [e["world"] for e in outer_events(stay)]
    assert 3 in worlds and 2 in worlds, worlds
    assert not any(e.get("event") == "rejoin" for p in (stay, joiner) for e in p.events), stay.events
    if mode != "sync":
        assert any(e["hidden"] > 0 for e in outer_events(stay)), outer_events(stay)


def test_bad_input_changes_nothing(master):
    torch = torch_or_skip()
    import pccl.diloco as diloco

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comm = pccl.Communicator(master.listen_address)  # never connected: validation comes first
    Q, A, D = pccl.QuantizationOptions, pccl.QuantizationAlgorithm, pccl.DataType
    bad = [
        (ValueError, "sync_every", dict(sync_every=0)),
        (ValueError, "fragments", dict(mode="streaming", sync_every=8, fragments=0)),
        (ValueError, "fragment_sync_delay", dict(mode="streaming", sync_every=8, fragments=2, fragment_sync_delay=4)),
        (ValueError, "fragments", dict(mode="streaming", sync_every=8, fragments=5)),  # the model has 4 parameters
        (ValueError, "mode", dict(mode="bogus")),
        (ValueError, "quantized_datatype", dict(quantization=Q(D.FLOAT, A.MIN_MAX))),
        (ValueError, "quantized_datatype", dict(quantization=Q(D.UINT32, A.ZERO_POINT_SCALE))),
        (ValueError, "error_feedback", dict(error_feedback=True)),
        (ValueError, "outer_momentum", dict(outer_momentum=1.0)),
        (ValueError, "streaming", dict(fragments=2)),
        (TypeError, "QuantizationOptions", dict(quantization="u8")),
    ]
    for exc, word, kw in bad:
        with pytest.raises(exc, match=word):
            diloco.DiLoCo(comm, model, opt, **kw)
    # CUDA parameters: a clear error (no GPU needed to see it).
    class FakeCuda(torch.nn.Module):
        def named_parameters(self, *a, **k):
            p = torch.nn.Parameter(torch.zeros(3))
            return iter([("w", type("P", (), {"device": torch.device("cuda:0"), "dtype": p.dtype,
                                              "numel": p.numel})())])

    with pytest.raises(pccl.InvalidBufferError, match="CUDA device buffers are not supported yet"):
        diloco.DiLoCo(comm, FakeCuda(), opt)
    assert not opt._optimizer_step_post_hooks
    assert comm.peer_id is None and not comm.closed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    comm.close()


def test_mismatched_peers_get_errors_and_the_group_is_unchanged(launcher):
    torch_or_skip()
    cfg = dict(mode="sync", H=4, steps=48, min_world=2, sleep=0.02, hidden=64)
    good = [spawn(launcher, f"good{r}", rank=r, **cfg) for r in range(2)]
    shape = spawn_waiting(launcher, "bad-shape", rank=2, **dict(cfg, hidden=48, expect_error=True))
    lr = spawn_waiting(launcher, "bad-lr", rank=3, **dict(cfg, lr=0.5, expect_error=True))
    for p in (shape, lr):
        p.wait_event(lambda e: e.get("event") == "ready", timeout=60)
    good[0].wait_event(lambda e: e.get("event") == "outer" and e["outer_step"] >= 2, timeout=60)
    go(shape)
    err = shape.wait_event(lambda e: e.get("event") == "expected_error", timeout=60)
    assert err["type"] == "LayoutMismatchError" and err["closed"], err
    go(lr)
    err = lr.wait_event(lambda e: e.get("event") == "expected_error", timeout=60)
    assert err["type"] == "ConfigMismatchError" and err["field"] == "outer_lr" and err["closed"], err
    assert "outer_lr" in err["message"]
    res = [p.result(timeout=90) for p in good]
    for p in good + [shape, lr]:
        p.proc.wait(timeout=30)
        assert p.proc.returncode == 0, p.stderr_text()
    check_hashes_agree(good)
    assert res[0]["hash"] == res[1]["hash"] and res[0]["model_hash"] == res[1]["model_hash"]
    # Only the two good peers ever contributed to an outer step.
    assert all(e["world"] == 2 for p in good for e in outer_events(p)), [outer_events(p) for p in good]
    assert res[0]["outer_step"] == 48 // 4


def test_charlm_example(tmp_path):
    torch_or_skip()
    argv = [sys.executable, str(EXAMPLE), "--mode", "async", "--quant", "minmax", "--steps", "60", "--peers", "3"]
    log = open(tmp_path / "charlm.log", "w+")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=peer_env(), start_new_session=True)
    try:
        rc = proc.wait(timeout=120)
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
    assert "killing peer" in out and "adding peer" in out, out[-4000:]
    assert "final state hashes agree" in out, out[-4000:]
