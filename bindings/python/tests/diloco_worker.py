"""One DiLoCo peer of a multi-process test: ``python diloco_worker.py JSON_ARGS``.

Prints one JSON object per line on stdout (``{"event": ...}``), like
``peer_worker.py``: ``ready`` (imports done; with ``wait_go`` the peer then
waits for a line on stdin before connecting), ``joined`` (the DiLoCo helper
is built: outer step, inner step and state hash it received), ``outer`` (one
per outer event: outer step, world, state hash, traffic, hidden seconds),
``rejoin`` (it had to rejoin), ``left`` (graceful leave after SIGTERM),
``expected_error`` (construction failed as the test wanted) and ``result``
(final state hash and model hash). Failures print ``{"event": "error"}`` and
exit 1.

Arguments (JSON): master, rank, mode, H, steps (inner steps of the run),
min_world, fragments, tau, alpha, quant ("none", "minmax", "zps"),
error_feedback, lr (outer), hidden (model width), seed, sleep (seconds per
inner step), die_at_outer (SIGKILL this process right after its all-reduce
of that outer event started), stall_reduce_call (never take part in this
peer's N-th all-reduce), catch_interrupt (report a KeyboardInterrupt as
``interrupted``), wait_go, expect_error.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback


_EMIT = threading.Lock()


def emit(event: str, **kw) -> None:
    kw["event"] = event
    kw["t"] = round(time.time(), 3)
    line = json.dumps(kw) + "\n"
    with _EMIT:  # one whole line at a time: the all-reduce thread emits too
        sys.stdout.write(line)
        sys.stdout.flush()


def main(args) -> int:
    try:
        run(args)
        return 0
    except BaseException as e:  # noqa: BLE001 - report everything to the test
        emit("error", rank=args.get("rank"), error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
        return 1


def zygote() -> None:
    """Imports PyTorch and pccl once, then forks one peer per request line on
    stdin (``{"id", "args", "out", "in", "err"}``: FIFOs for the peer's
    stdout and stdin, a log file for its stderr). Reports ``{"spawned": id,
    "pid": pid}`` and ``{"exit": id, "status": code}`` (negative: killed by
    that signal) on stdout. When stdin closes, remaining peers are killed and
    reaped. Single-threaded, so forking is safe; saves every peer the
    seconds a PyTorch import costs on a busy machine."""
    import select

    import torch  # noqa: F401 - the expensive import, done once

    import pccl  # noqa: F401
    import pccl.diloco  # noqa: F401

    # Constructing an optimizer imports torch._dynamo (seconds): do it here,
    # once, with one thread (no thread pool is started before the forks).
    torch.set_num_threads(1)
    warm = torch.nn.Linear(2, 2)
    torch.optim.AdamW(warm.parameters(), lr=1e-3)

    out = os.fdopen(os.dup(1), "w")

    def report(**kw) -> None:
        out.write(json.dumps(kw) + "\n")
        out.flush()

    children = {}
    buf = b""
    report(ready=True)
    while True:
        r, _, _ = select.select([0], [], [], 0.05)
        if r:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req)  # never returns
                children[pid] = req["id"]
                report(spawned=req["id"], pid=pid)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            report(exit=children.pop(pid), status=os.waitstatus_to_exitcode(status))
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid, name in list(children.items()):
        _, status = os.waitpid(pid, 0)
        report(exit=name, status=os.waitstatus_to_exitcode(status))


def _child(req) -> None:
    code = 1
    try:
        # O_RDWR: opening never blocks and reads never see EOF before the test writes.
        fd_in = os.open(req["in"], os.O_RDWR) if req.get("in") else os.open(os.devnull, os.O_RDONLY)
        fd_err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fd_out = os.open(req["out"], os.O_WRONLY)  # the test's reader opens the other end
        for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, "r", closefd=False)
        code = main(req["args"])
        sys.stdout.flush()
    finally:
        os._exit(code)


def run(args) -> None:
    import torch

    import pccl
    import pccl.diloco as diloco

    torch.set_num_threads(1)
    rank = args["rank"]
    leave = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: leave.set())

    torch.manual_seed(args.get("seed", 100 + rank))  # every peer starts from different weights
    width = args.get("hidden", 256)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, 8),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1000 + rank)
    target = torch.linspace(-1.0, 1.0, 32 * 8).reshape(32, 8)

    quant = {
        "none": None,
        "minmax": pccl.QuantizationOptions(pccl.DataType.UINT8, pccl.QuantizationAlgorithm.MIN_MAX),
        "zps": pccl.QuantizationOptions(pccl.DataType.UINT8, pccl.QuantizationAlgorithm.ZERO_POINT_SCALE),
    }[args.get("quant", "none")]
    config = dict(
        outer_lr=args.get("lr", 0.7),
        outer_momentum=0.9,
        nesterov=True,
        sync_every=args.get("H", 4),
        mode=args.get("mode", "sync"),
        fragments=args.get("fragments", 1),
        fragment_sync_delay=args.get("tau", 0),
        fragment_update_alpha=args.get("alpha", 1.0),
        quantization=quant,
        error_feedback=args.get("error_feedback", False),
        min_world=args.get("min_world", 1),
    )
    die_at = args.get("die_at_outer")
    state = {"armed": False}

    class Comm(pccl.Communicator):
        def all_reduce_multiple_with_retry(self, descriptors, *, max_in_flight=4):
            state["calls"] = state.get("calls", 0) + 1
            if state["calls"] == args.get("stall_reduce_call"):
                # Never take part in this all-reduce: the others wait for it.
                emit("stalling", rank=rank, call=state["calls"])
                time.sleep(600)
            if state["armed"]:
                # SIGKILL a moment after this peer's all-reduce started: mid-operation.
                emit("dying", rank=rank)
                threading.Timer(0.002, os.kill, (os.getpid(), signal.SIGKILL)).start()
            return super().all_reduce_multiple_with_retry(descriptors, max_in_flight=max_in_flight)

    emit("ready", rank=rank)
    if args.get("wait_go"):
        sys.stdin.readline()

    def connect():
        comm = Comm(args["master"])
        comm.connect(n_attempts=5)
        return comm

    def build(comm, previous=None):
        d = diloco.DiLoCo(comm, model, opt, **config, resume_from=previous)
        emit("joined", rank=rank, outer_step=d.outer_step, inner_step=d.inner_step, hash=d.state_hash(), world=d.world)
        return d

    comm = connect()
    if args.get("expect_error"):
        try:
            build(comm)
        except (diloco.LayoutMismatchError, diloco.ConfigMismatchError) as e:
            emit(
                "expected_error",
                rank=rank,
                type=type(e).__name__,
                field=getattr(e, "field", None),
                message=str(e),
                closed=comm.closed,
            )
            return
        raise AssertionError("construction succeeded but an error was expected")

    d = build(comm)
    if args.get("catch_interrupt"):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
        try:
            train(args, d, comm, model, opt, gen, target, config, leave, state, die_at, torch, diloco, connect, build)
        except KeyboardInterrupt:
            emit("interrupted", rank=rank, inner_step=d.inner_step, closed=comm.closed)
            d.close()
            emit("closed", rank=rank)
        return
    train(args, d, comm, model, opt, gen, target, config, leave, state, die_at, torch, diloco, connect, build)


def train(args, d, comm, model, opt, gen, target, config, leave, state, die_at, torch, diloco, connect, build):
    rank = args["rank"]
    steps, sleep, H = args["steps"], args.get("sleep", 0.0), config["sync_every"]
    losses = []
    while d.inner_step < steps:
        if leave.is_set() and d.inner_step % H == 0:
            rep = d.close()
            comm.close()
            emit("left", rank=rank, inner_step=d.inner_step, outer_step=d.outer_step)
            return
        x = torch.randn(16, 32, generator=gen)
        y = torch.tanh(x @ target)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if die_at is not None and d.outer_step + 1 >= die_at and (d.inner_step + 1) % H == 0:
            state["armed"] = True
        try:
            rep = d.step()
        except diloco.RejoinRequired as e:
            emit("rejoin", rank=rank, cause=str(e))
            comm = connect()
            d = build(comm, d)
            continue
        if rep is not None:
            emit(
                "outer",
                rank=rank,
                outer_step=rep.outer_step,
                inner_step=d.inner_step,
                world=rep.world,
                hash=d.state_hash(),
                tx=rep.tx_bytes,
                rx=rep.rx_bytes,
                comm=rep.comm_seconds,
                exposed=rep.exposed_seconds,
                hidden=rep.hidden_seconds,
                loss=sum(losses[-H:]) / max(1, len(losses[-H:])),
            )
        if sleep:
            time.sleep(sleep)
    rep = d.close()
    if rep is not None:
        emit("outer", rank=rank, outer_step=rep.outer_step, inner_step=d.inner_step, world=rep.world,
             hash=d.state_hash(), tx=rep.tx_bytes, rx=rep.rx_bytes, comm=rep.comm_seconds,
             exposed=rep.exposed_seconds, hidden=rep.hidden_seconds, final=True)
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(diloco._tensor_bytes(p.detach().contiguous()))
    emit("result", rank=rank, hash=d.state_hash(), model_hash=h.hexdigest(), outer_step=d.outer_step,
         inner_step=d.inner_step, world=d.world)
    comm.close()


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        zygote()
    else:
        sys.exit(main(json.loads(sys.argv[1])))
