"""One peer of a multi-process test: ``python peer_worker.py SCENARIO JSON_ARGS``.

Prints one JSON object per line on stdout (``{"event": ...}``); the test
process reads them. Exit status 0 means every check in the scenario passed;
failures print ``{"event": "error", ...}`` and exit with 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import traceback

import pccl
from pccl import (
    Attribute,
    Communicator,
    DataType,
    PCCLError,
    QuantizationAlgorithm,
    QuantizationOptions,
    ReduceDescriptor,
    ReduceOp,
    ReduceOpDescriptor,
    ReduceOperandDescriptor,
    SharedState,
    TensorInfo,
)


def emit(event: str, **kw) -> None:
    kw["event"] = event
    print(json.dumps(kw), flush=True)


def digest(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(bytes(c))
    return h.hexdigest()[:16]


def np_bytes(a) -> bytes:
    return a.tobytes()


def torch_bytes(t) -> bytes:
    import torch

    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def join(args) -> Communicator:
    comm = Communicator(args["master"], args.get("group", 0), args.get("pool", 0))
    comm.connect(n_attempts=3)
    emit("connected", rank=args["rank"], peer=comm.peer_id)
    return comm


def grow(comm: Communicator, world: int, timeout: float = 60.0) -> None:
    """Admits peers until the group has ``world`` members (every accepted peer runs this)."""
    deadline = time.monotonic() + timeout
    while comm.get_attribute(Attribute.LOCAL_WORLD_SIZE) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"world did not reach {world}")
        if comm.are_peers_pending():
            comm.update_topology()
        else:
            time.sleep(0.02)


# ---------------------------------------------------------------------------
# all-reduce exactness, NumPy
# ---------------------------------------------------------------------------

NP_DTYPES = ["uint8", "int8", "int16", "uint16", "uint32", "int32", "uint64", "int64", "float16", "float32", "float64"]
OPS = [ReduceOp.SUM, ReduceOp.AVG, ReduceOp.PROD, ReduceOp.MAX, ReduceOp.MIN]


def np_input(np, dtype: str, op: ReduceOp, rank: int, n: int):
    rng = np.random.default_rng(1000 * rank + 17 * NP_DTYPES.index(dtype) + int(op))
    dt = np.dtype(dtype)
    signed = dt.kind in "if"
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        lo, hi = (-4, 5) if signed else (0, 9)
    elif op == ReduceOp.PROD:
        lo, hi = (-2, 3) if signed else (0, 3)
    else:
        lo, hi = (-100, 101) if signed else (0, 201)
    a = rng.integers(lo, hi, size=n).astype(dt)
    if dt.kind == "f" and op in (ReduceOp.MAX, ReduceOp.MIN):
        a = (rng.standard_normal(n) * 100).astype(dt)
    return a


def np_expected(np, dtype: str, op: ReduceOp, inputs):
    dt = np.dtype(dtype)
    stack = np.stack(inputs)
    w = len(inputs)
    if op == ReduceOp.MAX:
        return stack.max(axis=0)
    if op == ReduceOp.MIN:
        return stack.min(axis=0)
    if op == ReduceOp.PROD:
        return np.prod(stack, axis=0, dtype=dt)
    s = np.sum(stack, axis=0, dtype=dt)
    if op == ReduceOp.SUM:
        return s
    if dt.kind in "iu":
        return np.trunc(s.astype(np.float64) / w).astype(dt)
    if dt == np.float16:
        return (s.astype(np.float32) / np.float32(w)).astype(np.float16)
    return (s / dt.type(w)).astype(dt)


def scenario_numpy_exact(args) -> None:
    import numpy as np

    world, rank, n = args["world"], args["rank"], args.get("count", 1001)
    comm = join(args)
    grow(comm, world)
    results = []
    checked = 0
    for dtype in NP_DTYPES:
        for op in OPS:
            for in_place in (True, False):
                mine = np_input(np, dtype, op, rank, n)
                expect = np_expected(np, dtype, op, [np_input(np, dtype, op, r, n) for r in range(world)])
                if in_place:
                    buf = mine.copy()
                    info = comm.all_reduce(buf, buf, op=op)
                    out = buf
                else:
                    out = np.full_like(mine, 7)
                    before = mine.copy()
                    info = comm.all_reduce(mine, out, op=op)
                    if not np.array_equal(mine, before):
                        raise AssertionError(f"send buffer modified: {dtype} {op.name}")
                if info.local_world_size != world:
                    raise AssertionError(f"world {info.local_world_size} != {world}")
                if info.tx_bytes <= 0 or info.rx_bytes <= 0:
                    raise AssertionError(f"no traffic reported: {info}")
                if out.tobytes() != expect.tobytes():
                    bad = np.flatnonzero(out.view(f"u{out.itemsize}") != expect.view(f"u{out.itemsize}"))
                    raise AssertionError(
                        f"{dtype} {op.name} in_place={in_place}: {len(bad)} elements differ, "
                        f"first at {bad[0]}: got {out[bad[0]]!r} expected {expect[bad[0]]!r}"
                    )
                results.append(out.tobytes())
                checked += 1
    # Operand descriptor + distribution hint, and a quantized reduce: not
    # exact, but bit-identical on every peer.
    x = np.linspace(-1, 1, 4096, dtype=np.float32) * (rank + 1)
    y = np.empty_like(x)
    comm.all_reduce(
        x,
        y,
        op=ReduceOp.SUM,
        tag=5,
        operand_descriptor=ReduceOperandDescriptor(DataType.FLOAT, pccl.DistributionHint.UNIFORM),
        quantization_options=QuantizationOptions(DataType.UINT8, QuantizationAlgorithm.MIN_MAX),
    )
    exact = np.linspace(-1, 1, 4096, dtype=np.float32) * sum(r + 1 for r in range(world))
    err = float(np.abs(y - exact).max())
    if err > 0.1 * world:
        raise AssertionError(f"quantized all-reduce too far off: {err}")
    results.append(y.tobytes())
    # PCCL 1.0's raw-pointer descriptor (the caller keeps the memory alive).
    raw = np.full(64, rank + 1, dtype=np.int32)
    addr = raw.__array_interface__["data"][0]
    d = ReduceOpDescriptor(
        addr, addr, ReduceDescriptor(64, ReduceOp.SUM, tag=11, operand_descriptor=ReduceOperandDescriptor(DataType.INT32))
    )
    comm.all_reduce_multiple_with_retry([d])
    if not bool((raw == sum(r + 1 for r in range(world))).all()):
        raise AssertionError("raw-pointer descriptor: wrong result")
    emit("result", rank=rank, checked=checked, digest=digest(results), quant_err=err)
    comm.close()


# ---------------------------------------------------------------------------
# all-reduce exactness, PyTorch
# ---------------------------------------------------------------------------


def scenario_torch_exact(args) -> None:
    import torch

    world, rank, n = args["world"], args["rank"], args.get("count", 999)
    comm = join(args)
    grow(comm, world)
    results = []
    checked = 0

    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.int64)

    def make(dtype, op, r):
        g = torch.Generator().manual_seed(1000 * r + 10 * int(op) + dtypes.index(dtype))
        if op in (ReduceOp.SUM, ReduceOp.AVG):
            v = torch.randint(-4, 5, (n,), generator=g)
        elif op == ReduceOp.PROD:
            v = torch.randint(-2, 3, (n,), generator=g)
        else:
            v = torch.randint(-100, 101, (n,), generator=g)
        if dtype.is_floating_point and op in (ReduceOp.MAX, ReduceOp.MIN):
            v = torch.randn(n, generator=g, dtype=torch.float64) * 100
        return v.to(dtype)

    def expected(dtype, op, inputs):
        st = torch.stack(inputs)
        if op == ReduceOp.MAX:
            return st.max(dim=0).values
        if op == ReduceOp.MIN:
            return st.min(dim=0).values
        if op == ReduceOp.PROD:
            return st.to(torch.float64).prod(dim=0).to(dtype)
        s = st.to(torch.float64).sum(dim=0).to(dtype)  # exact: small integers
        if op == ReduceOp.SUM:
            return s
        if not dtype.is_floating_point:
            return torch.trunc(s.to(torch.float64) / len(inputs)).to(dtype)
        if dtype in (torch.float16, torch.bfloat16, torch.float32):
            return (s.to(torch.float32) / len(inputs)).to(dtype)
        return s / len(inputs)

    # Shapes other than 1-D and views into a bigger tensor work too.
    for dtype in dtypes:
        for op in OPS:
            for in_place in (True, False):
                mine = make(dtype, op, rank)
                expect = expected(dtype, op, [make(dtype, op, r) for r in range(world)])
                if in_place:
                    big = torch.zeros(n + 10, dtype=dtype)
                    buf = big[5 : n + 5]
                    buf.copy_(mine)
                    as_2d = buf.view(n // 3, 3)  # a contiguous 2-D view works as well
                    info = comm.all_reduce(as_2d, as_2d, op=op)
                    out = buf
                    if big[:5].abs().sum() != 0 or big[n + 5 :].abs().sum() != 0:
                        raise AssertionError("all-reduce wrote outside the view")
                else:
                    out = torch.full_like(mine, 3)
                    before = mine.clone()
                    info = comm.all_reduce(mine, out, op=op)
                    if not torch.equal(mine, before):
                        raise AssertionError("send tensor modified")
                if info.local_world_size != world:
                    raise AssertionError(f"world {info.local_world_size} != {world}")
                if torch_bytes(out) != torch_bytes(expect):
                    diff = (out.to(torch.float64) - expect.to(torch.float64)).abs()
                    i = int(diff.argmax())
                    raise AssertionError(
                        f"{dtype} {op.name} in_place={in_place}: got {out[i].item()} expected {expect[i].item()} at {i}"
                    )
                results.append(torch_bytes(out))
                checked += 1

    # ReduceOpDescriptor.from_torch + multiple-with-retry on tensors of several dtypes.
    ts = [torch.full((100 + i,), float(rank + 1), dtype=dt) for i, dt in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.int64))]
    descs = [
        ReduceOpDescriptor.from_torch(t, t, ReduceDescriptor(t.numel(), ReduceOp.SUM, tag=i))
        for i, t in enumerate(ts)
    ]
    info = comm.all_reduce_multiple_with_retry(descs, max_in_flight=2)
    total = sum(r + 1 for r in range(world))
    for t in ts:
        if not bool((t.to(torch.float64) == total).all()):
            raise AssertionError(f"multiple-with-retry result wrong for {t.dtype}")
        results.append(torch_bytes(t))
    # Quantized sums of float tensors (the gradient case): bit-identical on
    # every peer (the digest) and close to the exact sum.
    quant_cases = 0
    qm = 4099  # several 1024-element blocks and a partial one
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

    def grad(dtype, r, k):
        g = torch.Generator().manual_seed(7000 + 100 * r + k)
        return (torch.randn(qm, generator=g, dtype=torch.float64) * (r + 1)).to(dtype)

    for k, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        for qdt, algo in (
            (DataType.UINT8, QuantizationAlgorithm.MIN_MAX),
            (DataType.INT8, QuantizationAlgorithm.ZERO_POINT_SCALE),
        ):
            mine = grad(dtype, rank, k)
            out = torch.empty_like(mine)
            q = QuantizationOptions(qdt, algo)
            info = comm.all_reduce(mine, out, op=ReduceOp.SUM, tag=300 + quant_cases, quantization_options=q)
            if info.local_world_size != world:
                raise AssertionError(f"quantized {dtype}: world {info.local_world_size}")
            inputs = [grad(dtype, r, k).to(torch.float64) for r in range(world)]
            exact = torch.stack(inputs).sum(dim=0)
            # docs/quantization.md: per hop, half a 255th of the block range of
            # the partial sum, plus a rounding to the source type; the k
            # largest ranges and magnitudes, as ring ranks are not test ranks
            # (loose form: whole-tensor ranges, 1.1x).
            ranges = sorted(
                (float(torch.clamp(x.max(), min=0) - torch.clamp(x.min(), max=0)) for x in inputs), reverse=True
            )
            mags = sorted((float(x.abs().max()) for x in inputs), reverse=True)
            bound = 0.0
            for h in range(1, world + 1):
                bound += sum(ranges[:h]) / 510.0 + sum(mags[:h]) * ulp[dtype]
            err = float((out.to(torch.float64) - exact).abs().max())
            if not err <= 1.1 * bound:
                raise AssertionError(f"quantized {dtype} {qdt.name} {algo.name}: error {err} > bound {bound}")
            if err == 0.0:
                raise AssertionError(f"quantized {dtype}: exact result, was it quantized?")
            full = 2 * (world - 1) * qm * mine.element_size() / world  # unquantized bytes sent
            if info.tx_bytes > 0.6 * full:
                raise AssertionError(f"quantized {dtype}: sent {info.tx_bytes} of {full:.0f} bytes, not compressed")
            results.append(torch_bytes(out))
            quant_cases += 1
    emit(
        "result",
        rank=rank,
        checked=checked,
        digest=digest(results),
        world=info.local_world_size,
        quant_cases=quant_cases,
    )
    comm.close()


# ---------------------------------------------------------------------------
# async all-reduce overlapping compute, GIL release
# ---------------------------------------------------------------------------


class Ticker(threading.Thread):
    """Pure-Python compute loop recording when it runs (it needs the GIL)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stamps = []
        self.stop = False

    def run(self) -> None:
        x = 0
        while not self.stop:
            for i in range(2000):
                x += i * i
            self.stamps.append(time.monotonic())

    def ran_between(self, t0: float, t1: float) -> int:
        return sum(1 for s in list(self.stamps) if t0 < s < t1)


def scenario_async_overlap(args) -> None:
    import numpy as np

    world, rank = args["world"], args["rank"]
    n = args.get("count", 1 << 21)
    comm = join(args)
    grow(comm, world)
    ticker = Ticker()
    ticker.start()
    try:
        # Several async ops with distinct tags in flight at once, awaited while
        # a compute loop runs in another thread.
        bufs = [np.full(n, float(rank + 1 + k), dtype=np.float32) for k in range(4)]
        t0 = time.monotonic()
        handles = [comm.all_reduce_async(b, b, op=ReduceOp.SUM, tag=100 + k) for k, b in enumerate(bufs)]
        t_started = time.monotonic() - t0
        outcomes = [h.wait() for h in handles]
        t1 = time.monotonic()
        for k, (ok, status, info) in enumerate(outcomes):
            if not ok or status != pccl.Result.SUCCESS:
                raise AssertionError(f"async op {k} failed: {status} {handles[k].error}")
            want = sum(r + 1 + k for r in range(world))
            if not bool((bufs[k] == want).all()):
                raise AssertionError(f"async op {k}: wrong result")
            if info.local_world_size != world:
                raise AssertionError("wrong world size")
        if handles[0].wait() is not outcomes[0]:
            raise AssertionError("second wait() must return the same tuple")
        if not all(h.is_finished() for h in handles):
            raise AssertionError("is_finished() false after wait()")
        # Compute on the main thread while an op is in flight.
        buf = np.full(n, 1.0, dtype=np.float32)
        h = comm.all_reduce_async(buf, buf, op=ReduceOp.AVG, tag=7)
        m = np.ones((64, 64))
        steps = 0
        while not h.is_finished():
            m = m @ np.ones((64, 64)) / 64.0
            steps += 1
        ok, status, info = h.wait()
        if not ok or not bool((buf == 1.0).all()):
            raise AssertionError("AVG async failed")
        # GIL released during a blocking all-reduce: the ticker runs inside the call.
        big = np.ones(1 << 22, dtype=np.float32)
        ran = []
        for _ in range(3):
            s0 = time.monotonic()
            comm.all_reduce(big, big, op=ReduceOp.MAX, tag=9)
            s1 = time.monotonic()
            ran.append((s1 - s0, ticker.ran_between(s0 + 0.006, s1 - 0.006)))
        # A handle dropped without wait(), together with the last reference to
        # its buffer: the buffer stays alive until the op is over.
        import gc

        from pccl import _native

        if rank == 0:
            tmp = np.full(1 << 20, 2.0, dtype=np.float32)
            h = comm.all_reduce_async(tmp, tmp, op=ReduceOp.SUM, tag=300)
            del h, tmp
            gc.collect()
            orphans_in_flight = _native._orphan_count()
            deadline = time.monotonic() + 30
            while _native._orphan_count() and time.monotonic() < deadline:
                time.sleep(0.02)
            orphans_after = _native._orphan_count()
        else:
            time.sleep(0.5)  # rank 0 has dropped its handle by now
            tmp = np.full(1 << 20, 3.0, dtype=np.float32)
            comm.all_reduce(tmp, tmp, op=ReduceOp.SUM, tag=300)
            if not bool((tmp == 5.0).all()):
                raise AssertionError("wrong result next to a dropped handle")
            orphans_in_flight = orphans_after = None
        emit(
            "result",
            rank=rank,
            orphans_in_flight=orphans_in_flight,
            orphans_after=orphans_after,
            async_s=t1 - t0,
            start_s=t_started,
            async_ticks=ticker.ran_between(t0 + t_started + 0.006, t1 - 0.006),
            main_steps=steps,
            blocking=ran,
        )
    finally:
        ticker.stop = True
    comm.close()


# ---------------------------------------------------------------------------
# many all-reduces with retry while a peer is killed
# ---------------------------------------------------------------------------


def scenario_retry(args) -> None:
    import numpy as np

    world, rank = args["world"], args["rank"]
    steps, k, n = args.get("steps", 30), args.get("tensors", 6), args.get("count", 1 << 16)
    comm = join(args)
    grow(comm, world)
    bufs = [np.empty(n, dtype=np.float32) for _ in range(k)]
    for step in range(steps):
        if comm.are_peers_pending():
            comm.update_topology()
        for b in bufs:
            b.fill(1.0)
        descs = [ReduceOpDescriptor.from_numpy(b, b, ReduceDescriptor(n, ReduceOp.SUM, tag=i)) for i, b in enumerate(bufs)]
        if step == args.get("die_at_step"):
            # SIGKILL this process a moment after the reduces started: mid-operation.
            import signal

            threading.Timer(args.get("die_after_s", 0.02), os.kill, (os.getpid(), signal.SIGKILL)).start()
        info = comm.all_reduce_multiple_with_retry(descs, max_in_flight=3)
        values = []
        for b in bufs:
            v = float(b[0])
            if not bool((b == v).all()) or v not in (2.0, 3.0) or v > world:
                raise AssertionError(f"step {step}: non-uniform or wrong result {v}")
            values.append(v)
        emit(
            "step",
            rank=rank,
            step=step,
            world=info.local_world_size,
            values=values,
            tx=info.tx_bytes,
            t=time.monotonic(),
            digest=digest(np_bytes(b) for b in bufs),
        )
        time.sleep(args.get("sleep", 0.05))
    emit("result", rank=rank)
    comm.close()


# ---------------------------------------------------------------------------
# shared state with a late joiner
# ---------------------------------------------------------------------------


def _state_loop(args, comm, shared, step_fn, state_digest) -> None:
    """Canonical loop: admit pending peers, sync, step, revision += 1. Stops
    ``extra`` revisions after the group reached ``world``."""
    world, rank = args["world"], args["rank"]
    extra = args.get("extra", 5)
    joined_rev = None
    deadline = time.monotonic() + args.get("timeout", 90)
    first = True
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the group never reached its size")
        # A newcomer's connect() returned together with the others'
        # update_topology(), so it enters the loop at the sync.
        if not first and comm.are_peers_pending():
            comm.update_topology()
        # A newcomer may take its first state without voting (RECEIVE_ONLY).
        strategy = pccl.SharedStateSyncStrategy.ENFORCE_POPULAR
        if first and args.get("late") and args.get("receive_only_first"):
            strategy = pccl.SharedStateSyncStrategy.RECEIVE_ONLY
        info = comm.sync_shared_state(shared, strategy)
        size = comm.get_attribute(Attribute.LOCAL_WORLD_SIZE)
        emit(
            "sync",
            rank=rank,
            revision=shared.revision,
            world=size,
            digest=state_digest(),
            tx=info.tx_bytes,
            t=time.monotonic(),
            rx=info.rx_bytes,
            first=first,
        )
        first = False
        if size >= world and joined_rev is None:
            joined_rev = shared.revision
        if joined_rev is not None and shared.revision >= joined_rev + extra:
            break
        step_fn(size)
        shared.revision += 1
        time.sleep(args.get("sleep", 0.03))


def scenario_shared_numpy(args) -> None:
    import numpy as np

    rank = args["rank"]
    comm = join(args)
    late = args.get("late", False)
    w = np.zeros(1000, dtype=np.float32) if late else np.arange(1000, dtype=np.float32)
    counter = np.zeros(3, dtype=np.int64)
    scratch = np.full(10, rank, dtype=np.int32)  # allowed to differ
    shared = SharedState(
        [
            TensorInfo.from_numpy(w, "w"),
            TensorInfo.from_numpy(counter, "counter"),
            TensorInfo.from_numpy(scratch, "scratch", allow_content_inequality=True),
        ]
    )

    def step(size):
        w[:] = w * np.float32(0.5) + np.float32(1.0)
        counter[:] += 1

    _state_loop(args, comm, shared, step, lambda: digest([w.tobytes(), counter.tobytes()]))
    emit("result", rank=rank, revision=shared.revision, counter=int(counter[0]))
    comm.close()


def scenario_shared_torch(args) -> None:
    import torch

    world, rank = args["world"], args["rank"]
    torch.manual_seed(1234 + rank)  # every peer starts from different weights
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates exp_avg, exp_avg_sq, step
    comm = join(args)

    entries = []
    for name, t in model.state_dict().items():
        entries.append(TensorInfo.from_torch(t, name))
    for i, p in enumerate(model.parameters()):
        st = opt.state[p]
        entries.append(TensorInfo.from_torch(st["exp_avg"], f"{i}.exp_avg"))
        entries.append(TensorInfo.from_torch(st["exp_avg_sq"], f"{i}.exp_avg_sq"))
        entries.append(TensorInfo.from_torch(st["step"], f"{i}.step"))
    shared = SharedState(entries)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(rank)

    def state_digest():
        return digest(torch_bytes(info._owner) for info in entries)

    def step(size):
        x = torch.randn(32, 8, generator=g)
        y = x.sum(dim=1, keepdim=True)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        descs = [
            ReduceOpDescriptor.from_torch(p.grad, p.grad, ReduceDescriptor(p.grad.numel(), ReduceOp.AVG, tag=i))
            for i, p in enumerate(params)
        ]
        if size > 1:
            comm.all_reduce_multiple_with_retry(descs)
        opt.step()

    _state_loop(args, comm, shared, step, state_digest)
    emit("result", rank=rank, revision=shared.revision)
    comm.close()


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------


def scenario_interrupt(args) -> None:
    """Blocks in a call nobody completes; the test sends SIGINT."""
    import signal

    import numpy as np

    # A shell that starts the test suite in the background (`cmd &`) hands
    # its children SIGINT ignored, and Python then installs no handler: put
    # the default KeyboardInterrupt handler back, as an interactive run has.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    rank = args["rank"]
    comm = Communicator(args["master"])
    where = args["where"]
    if where in ("all_reduce", "wait", "broadcast", "broadcast_wait"):
        comm.connect()
        grow(comm, args["world"])
    buf = np.ones(16, dtype=np.float32)
    h = None
    emit("blocking", rank=rank, where=where)
    t0 = time.monotonic()
    try:
        if where == "connect":
            comm.connect()
        elif where == "all_reduce":
            comm.all_reduce(buf, buf, op=ReduceOp.SUM, tag=77)
        elif where == "wait":
            h = comm.all_reduce_async(buf, buf, op=ReduceOp.SUM, tag=78)
            h.wait()
        elif where == "broadcast":
            comm.broadcast(buf, root=0, tag=79)
        elif where == "broadcast_wait":
            h = comm.broadcast_async(buf, root=0, tag=80)
            h.wait()
        raise AssertionError("the blocking call returned")
    except KeyboardInterrupt:
        pass
    interrupted_at = time.time()
    latency = time.monotonic() - t0
    if h is not None:
        after = "finished" if h.is_finished() else "still in flight"
    else:
        try:
            comm.update_topology()
            after = "usable"
        except PCCLError as e:
            after = e.result.name
    emit("result", rank=rank, seconds=latency, interrupted_at=interrupted_at, after=after, closed=comm.closed)
    # Exit at once: the core finishes the interrupted call in the background.
    os._exit(0)


def scenario_gil_hog(args) -> None:
    """Between collectives, holds the GIL in a pure-Python loop for longer
    than the master's peer timeout. The peer must not be evicted: heartbeats
    come from a Rust thread that never needs the GIL (docs/reliability.md)."""
    import numpy as np

    world, rank = args["world"], args["rank"]
    comm = join(args)
    grow(comm, world)
    n = 1 << 16
    buf = np.empty(n, dtype=np.float32)
    worlds, hogged = [], []
    for step in range(args.get("steps", 2)):
        t0 = time.monotonic()
        x = 0
        while time.monotonic() - t0 < args["hog_s"]:
            for i in range(10_000):  # pure Python bytecode: the GIL stays held
                x += i * i
        hogged.append(time.monotonic() - t0)
        buf.fill(float(rank + 1))
        info = comm.all_reduce(buf, buf, op=ReduceOp.SUM)
        want = float(world * (world + 1) // 2)
        if not bool((buf == want).all()):
            raise AssertionError(f"step {step}: expected {want} everywhere, got {buf[:4]}")
        worlds.append(info.local_world_size)
    emit("result", rank=rank, worlds=worlds, hogged=hogged)
    comm.close()


def scenario_pair_sum(args) -> None:
    """Joins, grows the group to ``world``, all-reduces ``rank + 1`` and checks the sum."""
    import numpy as np

    world, rank = args["world"], args["rank"]
    comm = join(args)
    grow(comm, world)
    x = np.full(1000, rank + 1, dtype=np.float32)
    info = comm.all_reduce(x, x, op=ReduceOp.SUM)
    expect = sum(r + 1 for r in range(world))
    if not bool((x == expect).all()) or info.local_world_size != world:
        raise AssertionError(f"all-reduce gave {x[:4]} (world {info.local_world_size}), expected {expect}")
    emit("result", rank=rank, value=float(x[0]), world=info.local_world_size)
    comm.close()


def _code(fn) -> str:
    try:
        fn()
    except PCCLError as e:
        return e.result.name
    return "ok"


def scenario_async_rules(args) -> None:
    """The C API's rules for async all-reduces not awaited yet, raised at the
    call: a reused tag is INVALID_ARGUMENT; update/optimize topology and a
    shared-state sync are PENDING_ASYNC_OPS. Rank 0 checks; rank 1 only
    takes part in the all-reduces (tag 7, then tag 7 again after the wait)."""
    import numpy as np

    world, rank = 2, args["rank"]
    comm = join(args)
    grow(comm, world)
    x = np.full(256, rank + 1, dtype=np.int32)
    codes = {}
    if rank == 0:
        h = comm.all_reduce_async(x, x, op=ReduceOp.SUM, tag=7)
        y = np.zeros(256, dtype=np.int32)
        codes["same_tag_async"] = _code(lambda: comm.all_reduce_async(y, y, op=ReduceOp.SUM, tag=7))
        codes["same_tag_blocking"] = _code(lambda: comm.all_reduce(y, y, op=ReduceOp.SUM, tag=7))
        codes["update_topology"] = _code(comm.update_topology)
        codes["optimize_topology"] = _code(comm.optimize_topology)
        state = SharedState([TensorInfo.from_numpy(np.zeros(4, dtype=np.float32), "w")])
        codes["sync_shared_state"] = _code(lambda: comm.sync_shared_state(state))
        ok, status, info = h.wait()
        codes["wait"] = status.name
    else:
        comm.all_reduce(x, x, op=ReduceOp.SUM, tag=7)
    first = int(x[0])
    # Awaited: the tag is free again.
    z = np.full(8, rank + 1, dtype=np.int32)
    comm.all_reduce(z, z, op=ReduceOp.SUM, tag=7)
    emit("result", rank=rank, codes=codes, first=first, second=int(z[0]))
    comm.close()


# ---------------------------------------------------------------------------
# broadcast, all-gather, reduce-scatter
# ---------------------------------------------------------------------------


def _rank_map(comm, world):
    """All-gathers the test's peer ids: returns (ring rank -> peer id, my ring rank)."""
    import numpy as np

    me = np.array([comm._test_id], dtype=np.int64)
    ids = np.zeros(world, dtype=np.int64)
    info = comm.all_gather(me, ids, tag=1)
    if info.world_size != world or not (0 <= info.rank < world) or int(ids[info.rank]) != comm._test_id:
        raise AssertionError(f"bad all-gather of ids: {info} {ids}")
    if sorted(ids.tolist()) != list(range(world)):
        raise AssertionError(f"ids are not a permutation: {ids}")
    return [int(i) for i in ids], info.rank


def _pattern(np, dtype, peer: int, n: int):
    """Peer ``peer``'s arbitrary bytes as ``n`` elements of ``dtype`` (NaNs and
    all), which broadcast and all-gather must copy unchanged."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(7919 * peer + 31 * n + dt.itemsize * 3 + dt.kind.encode()[0])
    return np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt).copy()


def _check_info(info, world, rank, what):
    if (info.world_size, info.rank, info.algorithm) != (world, rank, "ring"):
        raise AssertionError(f"{what}: info {info}, expected world {world} rank {rank} ring")
    if info.tx_bytes <= 0 and info.rx_bytes <= 0:
        raise AssertionError(f"{what}: no traffic reported: {info}")


def _expect_error(fn, want, what):
    try:
        fn()
    except PCCLError as e:
        got = e.result.name
    except (pccl.InvalidBufferError, pccl.MismatchedBuffersError) as e:
        got = type(e).__name__
    else:
        got = "ok"
    if got != want:
        raise AssertionError(f"{what}: got {got}, expected {want}")


def scenario_collectives_numpy(args) -> None:
    """Every NumPy dtype: broadcast from every root, all-gather, and
    reduce-scatter for every op, odd counts and counts below the world,
    exactly against references computed here; the async forms; call-time
    errors."""
    import numpy as np

    world, me = args["world"], args["rank"]
    comm = join(args)
    comm._test_id = me
    grow(comm, world)
    ids, rank = _rank_map(comm, world)
    tag = 100
    digests = []
    checked = {"broadcast": 0, "all_gather": 0, "reduce_scatter": 0, "async": 0, "errors": 0}
    for dtype in NP_DTYPES:
        for n in (1, 2, world, 7, 1001):
            for root in range(world):
                buf = _pattern(np, dtype, me, n) if root == rank else np.zeros(n, dtype=dtype)
                tag += 1
                info = comm.broadcast(buf, root=root, tag=tag)
                _check_info(info, world, rank, f"broadcast {dtype} n={n} root={root}")
                want = _pattern(np, dtype, ids[root], n)
                if buf.tobytes() != want.tobytes():
                    raise AssertionError(f"broadcast {dtype} n={n} root={root}: bytes differ")
                digests.append(buf.tobytes())
                checked["broadcast"] += 1
        for n in (1, 2, 5, 1001):
            send = _pattern(np, dtype, me, n)
            before = send.copy()
            recv = np.zeros(world * n, dtype=dtype)
            tag += 1
            info = comm.all_gather(send, recv, tag=tag)
            _check_info(info, world, rank, f"all_gather {dtype} n={n}")
            want = np.concatenate([_pattern(np, dtype, ids[r], n) for r in range(world)])
            if recv.tobytes() != want.tobytes() or send.tobytes() != before.tobytes():
                raise AssertionError(f"all_gather {dtype} n={n}: bytes differ")
            digests.append(recv.tobytes())
            checked["all_gather"] += 1
        for op in OPS:
            for n in (1, 2, 5, 333):
                send = np_input(np, dtype, op, me, world * n)
                before = send.copy()
                recv = np.full(n, 7, dtype=dtype)
                tag += 1
                info = comm.reduce_scatter(send, recv, op=op, tag=tag)
                _check_info(info, world, rank, f"reduce_scatter {dtype} {op.name} n={n}")
                full = np_expected(np, dtype, op, [np_input(np, dtype, op, p, world * n) for p in ids])
                want = full[rank * n : (rank + 1) * n]
                if recv.tobytes() != want.tobytes() or send.tobytes() != before.tobytes():
                    raise AssertionError(
                        f"reduce_scatter {dtype} {op.name} n={n} rank {rank}: got {recv[:8]!r} expected {want[:8]!r}"
                    )
                checked["reduce_scatter"] += 1

    # Async: one of each in flight at once, distinct tags.
    n = 129
    bbuf = _pattern(np, "int32", me, n) if rank == world - 1 else np.zeros(n, dtype=np.int32)
    gsend, grecv = _pattern(np, "float64", me, n), np.zeros(world * n, dtype=np.float64)
    rsend, rrecv = np_input(np, "int16", ReduceOp.SUM, me, world * n), np.zeros(n, dtype=np.int16)
    hb = comm.broadcast_async(bbuf, root=world - 1, tag=10)
    hg = comm.all_gather_async(gsend, grecv, tag=11)
    hr = comm.reduce_scatter_async(rsend, rrecv, op=ReduceOp.SUM, tag=12)
    # Tags of async operations not awaited are taken, for every kind.
    spare = np.zeros(n, dtype=np.int32)
    _expect_error(lambda: comm.broadcast(spare, root=0, tag=11), "INVALID_ARGUMENT", "tag in flight")
    _expect_error(lambda: comm.all_reduce(spare, spare, op=ReduceOp.SUM, tag=10), "INVALID_ARGUMENT", "tag in flight")
    _expect_error(comm.update_topology, "PENDING_ASYNC_OPS", "update_topology with async ops")
    checked["errors"] += 3
    for h, what in ((hr, "reduce_scatter_async"), (hb, "broadcast_async"), (hg, "all_gather_async")):
        ok, status, info = h.wait()
        if not ok:
            raise AssertionError(f"{what}: {status.name} {h.error}")
        _check_info(info, world, rank, what)
        if h.wait() != (ok, status, info):
            raise AssertionError(f"{what}: a second wait() differs")
        checked["async"] += 1
    if bbuf.tobytes() != _pattern(np, "int32", ids[world - 1], n).tobytes():
        raise AssertionError("broadcast_async: bytes differ")
    if grecv.tobytes() != np.concatenate([_pattern(np, "float64", ids[r], n) for r in range(world)]).tobytes():
        raise AssertionError("all_gather_async: bytes differ")
    full = np_expected(np, "int16", ReduceOp.SUM, [np_input(np, "int16", ReduceOp.SUM, p, world * n) for p in ids])
    if rrecv.tobytes() != full[rank * n : (rank + 1) * n].tobytes():
        raise AssertionError("reduce_scatter_async: values differ")
    digests.append(bbuf.tobytes())
    digests.append(grecv.tobytes())

    # Call-time errors: every one is raised before anything is sent.
    a = np.zeros(4, dtype=np.float32)
    ro = np.zeros(4, dtype=np.float32)
    ro.flags.writeable = False
    cases = [
        (lambda: comm.broadcast(a, root=world), "INVALID_ARGUMENT"),
        (lambda: comm.broadcast_async(a, root=world + 5), "INVALID_ARGUMENT"),
        (lambda: comm.broadcast(ro, root=0), "InvalidBufferError"),
        (lambda: comm.all_gather(a, np.zeros(4 * world + 1, dtype=np.float32)), "InvalidBufferError"),
        (lambda: comm.all_gather(a, np.zeros(4 * world, dtype=np.float64)), "MismatchedBuffersError"),
        (lambda: comm.all_gather(a, ro), "InvalidBufferError"),
        (lambda: comm.reduce_scatter(a, np.zeros(2, dtype=np.float32), op=ReduceOp.SUM), "InvalidBufferError"),
        (
            lambda: comm.reduce_scatter(
                np.zeros(4 * world, dtype=np.int32),
                np.zeros(4, dtype=np.int32),
                op=ReduceOp.SUM,
                quantization_options=QuantizationOptions(DataType.UINT8, QuantizationAlgorithm.MIN_MAX),
            ),
            "INVALID_ARGUMENT",
        ),
    ]
    big = np.zeros(4 * world, dtype=np.float32)
    # Overlapping buffers (views of one array) are refused by the core at the call.
    cases.append((lambda: comm.all_gather(big[:4], big), "INVALID_ARGUMENT"))
    cases.append((lambda: comm.reduce_scatter(big, big[:4], op=ReduceOp.SUM), "INVALID_ARGUMENT"))
    for i, (fn, want) in enumerate(cases):
        _expect_error(fn, want, f"error case {i}")
        checked["errors"] += 1
    for bad in (-1, 1 << 32):
        try:
            comm.broadcast(a, root=bad)
        except ValueError:
            checked["errors"] += 1
        else:
            raise AssertionError(f"root={bad} accepted")
    # Still usable afterwards.
    z = np.full(3, me, dtype=np.int64)
    zz = np.zeros(3 * world, dtype=np.int64)
    comm.all_gather(z, zz, tag=2)
    if zz.reshape(world, 3)[:, 0].tolist() != ids:
        raise AssertionError(f"final all_gather: {zz}")
    emit("result", rank=me, ring_rank=rank, ids=ids, checked=checked, digest=digest(digests))
    comm.close()


def scenario_collectives_torch(args) -> None:
    """CPU tensors of every torch dtype the package supports (f16 and bf16
    included): broadcast from every root, all-gather, reduce-scatter (sum,
    max, min), blocking and async, exactly against references computed here."""
    import torch

    world, me = args["world"], args["rank"]
    comm = join(args)
    comm._test_id = me
    grow(comm, world)
    ids, rank = _rank_map(comm, world)
    dtypes = [
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    ]
    for extra in ("uint16", "uint32", "uint64"):
        if hasattr(torch, extra):
            dtypes.append(getattr(torch, extra))
    tag = 100
    digests = []
    checked = 0

    def pattern(dtype, peer, n):
        g = torch.Generator().manual_seed(7919 * peer + 31 * n + dtypes.index(dtype))
        raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
        return raw.view(dtype).clone()

    def values(dtype, op, peer, n):
        j = torch.arange(n, dtype=torch.float64)
        if op == ReduceOp.SUM:
            v = (peer + 1) * (j % 7 + 1)
        else:
            v = (peer * 5 + j % 11) % 17
        if dtype.is_signed:
            v = torch.where(j % 2 == 1, -v, v)
        return v

    for dtype in dtypes:
        for use_async in (False, True):
            for n in (1, 2, world, 7, 1001):
                for root in range(world):
                    buf = pattern(dtype, me, n) if root == rank else torch.zeros(n, dtype=dtype)
                    tag += 1
                    if use_async:
                        ok, status, info = comm.broadcast_async(buf, root=root, tag=tag).wait()
                        if not ok:
                            raise AssertionError(f"broadcast_async: {status.name}")
                    else:
                        info = comm.broadcast(buf, root=root, tag=tag)
                    _check_info(info, world, rank, f"broadcast {dtype} n={n}")
                    if torch_bytes(buf) != torch_bytes(pattern(dtype, ids[root], n)):
                        raise AssertionError(f"broadcast {dtype} n={n} root={root} async={use_async}: bytes differ")
                    digests.append(torch_bytes(buf))
                    checked += 1
            for n in (1, 2, 5, 1001):
                send = pattern(dtype, me, n)
                recv = torch.zeros(world, n, dtype=dtype)  # a 2-D receive buffer works too
                tag += 1
                if use_async:
                    ok, status, info = comm.all_gather_async(send, recv, tag=tag).wait()
                    if not ok:
                        raise AssertionError(f"all_gather_async: {status.name}")
                else:
                    info = comm.all_gather(send, recv, tag=tag)
                _check_info(info, world, rank, f"all_gather {dtype} n={n}")
                want = torch.cat([pattern(dtype, ids[r], n) for r in range(world)])
                if torch_bytes(recv) != torch_bytes(want):
                    raise AssertionError(f"all_gather {dtype} n={n} async={use_async}: bytes differ")
                digests.append(torch_bytes(recv))
                checked += 1
            for op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN):
                for n in (1, 2, 5, 333):
                    send = values(dtype, op, me, world * n).to(dtype)
                    recv = torch.full((n,), 3, dtype=dtype)
                    tag += 1
                    if use_async:
                        ok, status, info = comm.reduce_scatter_async(send, recv, op=op, tag=tag).wait()
                        if not ok:
                            raise AssertionError(f"reduce_scatter_async: {status.name}")
                    else:
                        info = comm.reduce_scatter(send, recv, op=op, tag=tag)
                    _check_info(info, world, rank, f"reduce_scatter {dtype} n={n}")
                    stack = torch.stack([values(dtype, op, p, world * n) for p in ids])
                    if op == ReduceOp.SUM:
                        full = stack.sum(0)
                    elif op == ReduceOp.MAX:
                        full = stack.max(0).values
                    else:
                        full = stack.min(0).values
                    want = full[rank * n : (rank + 1) * n].to(dtype)
                    if torch_bytes(recv) != torch_bytes(want):
                        raise AssertionError(
                            f"reduce_scatter {dtype} {op.name} n={n} async={use_async}: got {recv[:6]} want {want[:6]}"
                        )
                    checked += 1
    emit("result", rank=me, ring_rank=rank, checked=checked, ndtypes=len(dtypes), digest=digest(digests))
    comm.close()


def scenario_collectives_direct(args) -> None:
    """Run with PCCL_ALGORITHM=direct on every peer: all-reduces run direct,
    while broadcast, all-gather and reduce-scatter still run (on the ring:
    the setting is an all-reduce's)."""
    import numpy as np

    world, me = args["world"], args["rank"]
    comm = join(args)
    grow(comm, world)
    x = np.full(8, me + 1, dtype=np.int32)
    info = comm.broadcast(x, root=0, tag=1)
    out = np.zeros(8 * world, dtype=np.int32)
    mine = np.full(8, me + 1, dtype=np.int32)
    gathered = comm.all_gather(mine, out, tag=2)
    seg = np.zeros(8, dtype=np.int32)
    ok, status, rs = comm.reduce_scatter_async(out, seg, op=ReduceOp.SUM, tag=3).wait()
    y = np.full(8, me + 1, dtype=np.int32)
    comm.all_reduce(y, y, op=ReduceOp.SUM, tag=4)
    emit(
        "result",
        rank=me,
        bcast=x.tolist(),
        bcast_rank=info.rank,
        gathered=out.tolist(),
        gather_rank=gathered.rank,
        rs_status=status.name,
        rs_rank=rs.rank,
        seg=seg.tolist(),
        sum=int(y[0]),
    )
    comm.close()


def scenario_idle(args) -> None:
    """Connects, optionally grows the group, then idles until stdin closes."""
    comm = join(args)
    if args.get("world"):
        grow(comm, args["world"])
    emit("ready", rank=args["rank"], world=comm.get_attribute(Attribute.GLOBAL_WORLD_SIZE))
    sys.stdin.read()
    comm.close()


SCENARIOS = {name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def main() -> None:
    name, raw = sys.argv[1], sys.argv[2]
    args = json.loads(raw)
    try:
        SCENARIOS[name](args)
    except BaseException as e:  # noqa: BLE001 - report everything to the test
        emit("error", rank=args.get("rank"), error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    main()
