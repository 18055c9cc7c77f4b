"""pccl.diloco across real peer processes (``diloco_worker.py``): each mode
under churn (a founding group of 3, one SIGKILLed mid-all-reduce, a late
joiner, a graceful leave), bad input (arguments; a peer whose model or
configuration differs from the group's), one peer alone with the optimizer
hook, and the char-LM example.

The peers are forked by one "zygote" process that imported PyTorch once
(``diloco_worker.py --zygote``): an import costs seconds of CPU per process
on a busy 2-core machine. Their stdout/stdin are FIFOs in the zygote's tmp
dir; every peer is killed and reaped when its test ends, and the zygote
kills whatever is left when the module's tests are done. Each test writes
all peers' events in time order to ``events.jsonl`` in its tmp dir."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

import pccl
from conftest import HERE, Peer, peer_env, torch_or_skip

WORKER = HERE / "diloco_worker.py"
EXAMPLE = HERE.parent / "examples" / "diloco_charlm.py"


class ZProc:
    """The part of ``subprocess.Popen`` that ``conftest.Peer`` uses, for a
    peer forked by the zygote (which reports its pid and exit status)."""

    def __init__(self, in_path):
        self.pid = None
        self.returncode = None
        self.spawned = threading.Event()
        self.exited = threading.Event()
        self._in_path = in_path
        self._stdin = None
        self.stdout = None

    @property
    def stdin(self):
        if self._stdin is None and self._in_path is not None:
            # Non-blocking open: fails (ENXIO) instead of hanging if the peer is gone.
            fd = os.open(self._in_path, os.O_WRONLY | os.O_NONBLOCK)
            os.set_blocking(fd, True)
            self._stdin = os.fdopen(fd, "w")
        return self._stdin

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if not self.exited.wait(timeout):
            raise subprocess.TimeoutExpired("zygote peer", timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None and self.pid is not None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


class ZPeer(Peer):
    """A ``conftest.Peer`` forked by the zygote; stdout/stdin are FIFOs."""

    def __init__(self, name, out_path, in_path, log_path):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "a")
        self.proc = ZProc(in_path)
        self._out_path = out_path
        self.events = []
        self._queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        self.proc.stdout = open(self._out_path)  # returns once the peer opened its end
        super()._read()

    def reap(self):
        self.proc._in_path = None  # never open the peer's stdin now (it may be gone)
        if self.proc.stdout is None:  # the peer never opened its stdout: unblock our reader
            try:
                os.close(os.open(self._out_path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        super().reap()


class Zygote:
    """One process that imported PyTorch and pccl, forking every peer of a test."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.log = open(tmp / "zygote.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, env=peer_env(), cwd=str(HERE),
        )
        self.peers = {}
        self.ready = threading.Event()
        self.n = 0
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            raise AssertionError("the zygote did not start")

    def _read(self):
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                self.ready.set()
            elif "spawned" in msg:
                p = self.peers[msg["spawned"]].proc
                p.pid = msg["pid"]
                p.spawned.set()
            elif "exit" in msg:
                p = self.peers[msg["exit"]].proc
                p.returncode = msg["status"]
                p.exited.set()

    def spawn(self, name, args, stdin=False):
        self.n += 1
        key = f"{name}-{self.n}"
        out, inp = self.tmp / f"{key}.out", (self.tmp / f"{key}.in" if stdin else None)
        os.mkfifo(out)
        if inp is not None:
            os.mkfifo(inp)
        peer = ZPeer(name, out, inp, self.tmp / f"{key}.log")
        self.peers[key] = peer
        req = {"id": key, "args": args, "out": str(out), "in": str(inp) if inp else None, "err": str(peer.log_path)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        if not peer.proc.spawned.wait(30):
            raise AssertionError(f"the zygote did not fork {name}")
        return peer

    def close(self):
        try:
            self.proc.stdin.close()  # the zygote kills and reaps what is left, then exits
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    torch_or_skip()
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    try:
        yield z
    finally:
        z.close()


class Peers:
    def __init__(self, zygote, master_addr, tmp):
        self.zygote, self.master_addr, self.tmp = zygote, master_addr, tmp
        self.peers = []

    def spawn(self, name, wait_go=False, **args):
        args.setdefault("master", self.master_addr)
        args["wait_go"] = wait_go
        p = self.zygote.spawn(name, args, stdin=wait_go)
        self.peers.append(p)
        return p

    def dump(self):
        """All peers' events, in time order, to ``events.jsonl`` (for post-mortems)."""
        evs = sorted((e.get("t", 0), p.name, i, e) for p in self.peers for i, e in enumerate(p.events))
        with open(self.tmp / "events.jsonl", "w") as f:
            for _t, name, _i, e in evs:
                f.write(json.dumps({"peer": name, **e}) + "\n")

    def reap_all(self):
        for p in self.peers:
            p.reap()


@pytest.fixture
def peers(zygote, master, tmp_path):
    ps = Peers(zygote, master.listen_address, tmp_path)
    try:
        yield ps
    finally:
        ps.reap_all()
        ps.dump()


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
    "sync": dict(mode="sync", H=4, steps=96, quant="minmax", error_feedback=True),
    "async": dict(mode="async", H=4, steps=96),
    # offsets 0, 3, 6 and tau = 3: fragments 0 and 1 are applied at the step
    # the next one launches (a peer admitted then launches it at once)
    "streaming": dict(mode="streaming", H=10, fragments=3, tau=3, steps=130),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_under_churn(peers, mode):
    cfg = dict(MODES[mode], min_world=3, sleep=0.02, hidden=256)
    stay = peers.spawn(f"{mode}-stay", rank=0, **cfg)
    victim = peers.spawn(f"{mode}-victim", rank=1, die_at_outer=3, **cfg)
    leaver = peers.spawn(f"{mode}-leaver", rank=2, **cfg)
    joiner = peers.spawn(f"{mode}-joiner", wait_go=True, rank=3, **cfg)
    # The founding phase holds everyone until the group has 3 peers.
    first = [p.wait_event(lambda e: e.get("event") == "outer", timeout=60) for p in (stay, victim, leaver)]
    assert all(e["world"] == 3 for e in first), first
    victim.wait_event(lambda e: e.get("event") == "dying", timeout=60)
    victim.proc.wait(timeout=30)
    assert victim.proc.returncode == -signal.SIGKILL
    if mode == "streaming":
        # Right after fragment 0 was applied (inner step 3 mod 10): the joiner is
        # most likely admitted when fragment 1 is applied and fragment 2 launches.
        stay.wait_event(lambda e: e.get("event") == "outer" and e["world"] == 2 and e["inner_step"] % 10 == 3, 60)
    else:
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


def test_mismatched_peers_get_errors_and_the_group_is_unchanged(peers):
    cfg = dict(mode="sync", H=4, steps=48, min_world=2, sleep=0.02, hidden=64)
    good = [peers.spawn(f"good{r}", rank=r, **cfg) for r in range(2)]
    shape = peers.spawn("bad-shape", wait_go=True, rank=2, **dict(cfg, hidden=48, expect_error=True))
    lr = peers.spawn("bad-lr", wait_go=True, rank=3, **dict(cfg, lr=0.5, expect_error=True))
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
    # 2 founding peers (the example's default is 3): one is killed, so the
    # other trains alone for a while, then the joiner comes; one process
    # less to start keeps the test file within its time budget.
    argv = [sys.executable, str(EXAMPLE), "--mode", "async", "--quant", "minmax", "--steps", "100", "--peers", "2"]
    argv += ["--sync-every", "5", "--step-time", "0.005", "--timeout", "100"]
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
    assert "final state hashes agree across 2 surviving peers" in out, out[-4000:]
    assert "[peer 2] joined at outer step" in out, out[-4000:]


def test_ctrl_c_while_waiting_for_a_background_all_reduce(peers):
    """Async mode: peer 1 never takes part in its first all-reduce, so peer 0
    blocks at its next event waiting for the background one; SIGINT raises
    KeyboardInterrupt there at once and leaves the communicator closed."""
    cfg = dict(mode="async", H=2, steps=1000, min_world=2, sleep=0.02, hidden=32)
    p0 = peers.spawn("ctrlc-0", rank=0, catch_interrupt=True, **cfg)
    p1 = peers.spawn("ctrlc-1", rank=1, stall_reduce_call=1, **cfg)
    p1.wait_event(lambda e: e.get("event") == "stalling", timeout=60)
    time.sleep(1.0)  # peer 0 reaches inner step 4 and waits
    assert p0.proc.poll() is None
    t0 = time.monotonic()
    p0.kill(signal.SIGINT)
    ev = p0.wait_event(lambda e: e.get("event") == "interrupted", timeout=30)
    took = time.monotonic() - t0
    assert took < 5, took
    assert ev["inner_step"] == 4 and ev["closed"], ev
    p0.wait_event(lambda e: e.get("event") == "closed", timeout=30)


def test_alone_context_manager_and_async_delay(master):
    """One peer alone, in this process: the optimizer hook drives step();
    alone, an outer step applies the peer's own pseudo-gradient (async: one
    event late); close() applies the one still pending and removes the hook."""
    torch = torch_or_skip()
    import pccl.diloco as diloco

    def run(mode):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        comm = pccl.Communicator(master.listen_address)
        comm.connect()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        x = torch.ones(4, 3)
        reports = []
        with diloco.DiLoCo(comm, model, opt, sync_every=2, mode=mode, outer_lr=1.0, outer_momentum=0.0) as d:
            assert d.world == 1 and d.outer_step == 0
            for _ in range(4):
                model(x).sum().backward()
                opt.step()
                opt.zero_grad()
                reports.append(d.last_report)
            h = d.state_hash()
        assert not opt._optimizer_step_post_hooks  # removed on exit
        assert d.inner_step == 4
        model(x).sum().backward()
        opt.step()  # no longer hooked
        assert d.inner_step == 4
        comm.close()
        return d, reports, h, start

    d, reports, h, _ = run("sync")
    assert [r.outer_step if r else None for r in reports] == [None, 1, 1, 2]
    assert reports[1].world == 1 and reports[1].hidden_seconds == 0.0
    # lr 1, no momentum: the outer parameters follow the local ones (up to rounding).
    d_async, areports, ah, _ = run("async")
    assert [r.outer_step if r else None for r in areports] == [None, None, None, 1]  # one event late
    assert d_async.outer_step == 2  # close() applied the pending one
    assert d_async.state_hash() != ah
    for (n, o_sync), o_async in zip(d.outer_parameters().items(), d_async.outer_parameters().values()):
        # Same data and the same updates, the second one late: the same result.
        assert torch.allclose(o_sync, o_async, atol=1e-6), n
