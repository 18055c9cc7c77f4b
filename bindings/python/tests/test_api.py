"""In-process API checks: enums and records, argument validation with clear
errors, error codes from the core, master lifecycle, the ``pccl.master``
entry point, importing without NumPy/PyTorch, and Ctrl-C during blocking calls."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pccl
from pccl import (
    Attribute,
    Communicator,
    DataType,
    MasterNode,
    PCCLError,
    QuantizationAlgorithm,
    QuantizationOptions,
    ReduceDescriptor,
    ReduceInfo,
    ReduceOp,
    ReduceOpDescriptor,
    ReduceOperandDescriptor,
    Result,
    SharedState,
    SharedStateSyncInfo,
    SharedStateSyncStrategy,
    TensorInfo,
)

from conftest import numpy_or_skip, peer_env, torch_or_skip


# ---------------------------------------------------------------------------
# enums, records
# ---------------------------------------------------------------------------


def test_enum_values_match_the_c_header():
    assert [int(x) for x in (Result.SUCCESS, Result.RANK_CONNECTION_LOST, Result.TOPOLOGY_OPTIMIZATION_FAILED)] == [0, 8, 12]
    assert [m.name for m in ReduceOp] == ["SUM", "AVG", "PROD", "MAX", "MIN"]
    assert Attribute.GLOBAL_WORLD_SIZE.value == 1 and Attribute.LOCAL_WORLD_SIZE.value == 2
    assert Attribute.NUM_DISTINCT_PEER_GROUPS.value == 3 and Attribute.LARGEST_PEER_GROUP_WORLD_SIZE.value == 4
    assert DataType.FLOAT.value == 10 and DataType.BFLOAT16.value == 9 and DataType.INT16.value == 2
    assert DataType.FLOAT32 is DataType.FLOAT and DataType.DOUBLE.itemsize == 8
    assert SharedStateSyncStrategy.SEND_ONLY.value == 2
    assert QuantizationAlgorithm.ZERO_POINT_SCALE.value == 2
    assert pccl.DeviceType.from_torch_device_type("cuda") is pccl.DeviceType.CUDA
    assert str(ReduceOp.SUM) == "ReduceOp.SUM"


def test_records_and_defaults():
    assert ReduceInfo(2, 10, 20) == ReduceInfo(2, 10, 20)
    assert ReduceInfo(3, 1, 2).world_size == 3
    assert SharedStateSyncInfo(1, 2).rx_bytes == 2
    q = QuantizationOptions()
    assert q.quantized_datatype is DataType.UINT8 and q.algorithm is QuantizationAlgorithm.MIN_MAX
    d = ReduceDescriptor(10, ReduceOp.SUM, 3, ReduceOperandDescriptor(DataType.FLOAT), QuantizationOptions())
    assert d.count == 10 and d.tag == 3
    assert ReduceOperandDescriptor(DataType.FLOAT).distribution_hint is pccl.DistributionHint.NONE
    e = PCCLError(Result.INVALID_ARGUMENT, "pcclFoo")
    assert e.result is Result.INVALID_ARGUMENT and "pcclFoo" in str(e)
    with pytest.raises(PCCLError):
        PCCLError.check(3, "x")
    assert pccl.get_build_info()["has_cuda_support"] is False


def test_descriptor_validation():
    with pytest.raises(ValueError):
        ReduceDescriptor(0, ReduceOp.SUM)
    with pytest.raises(ValueError):
        ReduceDescriptor(1, ReduceOp.SUM, tag=-1)
    with pytest.raises(ValueError):
        ReduceDescriptor(1, 42)
    with pytest.raises(TypeError):
        ReduceDescriptor(1, "sum")
    with pytest.raises(TypeError):
        ReduceDescriptor(1, ReduceOp.SUM, operand_descriptor=DataType.FLOAT)


def test_shared_state_construction():
    np = numpy_or_skip()
    a = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError):
        SharedState([])
    with pytest.raises(ValueError):
        SharedState([TensorInfo.from_numpy(a, "x"), TensorInfo.from_numpy(a, "x")])
    s = SharedState([TensorInfo.from_numpy(a, "x")])
    s.revision = 5
    s.push_revision()
    assert s.revision == 6
    with pytest.raises(ValueError):
        s.revision = -1
    with pytest.raises(ValueError):
        TensorInfo("x", 0, numel=1, dtype=DataType.FLOAT)


# ---------------------------------------------------------------------------
# buffer validation
# ---------------------------------------------------------------------------


@pytest.fixture
def solo(master):
    """A connected communicator alone in its swarm (collectives need two peers,
    but every argument check happens before that)."""
    c = Communicator(master.listen_address, shared_state_port=0, p2p_port=0, benchmark_port=0)
    c.connect(n_attempts=1)
    yield c
    c.close()


def test_numpy_buffer_errors(solo):
    np = numpy_or_skip()
    a = np.zeros(16, dtype=np.float32)
    with pytest.raises(ValueError, match="contiguous"):
        solo.all_reduce(a[::2], np.zeros(8, dtype=np.float32), op=ReduceOp.SUM)
    with pytest.raises(TypeError, match="same dtype"):
        solo.all_reduce(a, np.zeros(16, dtype=np.float64), op=ReduceOp.SUM)
    with pytest.raises(ValueError, match="number of elements"):
        solo.all_reduce(a, np.zeros(15, dtype=np.float32), op=ReduceOp.SUM)
    with pytest.raises(TypeError, match="unsupported dtype"):
        solo.all_reduce(np.zeros(4, dtype=np.complex64), np.zeros(4, dtype=np.complex64), op=ReduceOp.SUM)
    with pytest.raises(TypeError, match="unsupported dtype"):
        solo.all_reduce(np.zeros(4, dtype=bool), np.zeros(4, dtype=bool), op=ReduceOp.SUM)
    with pytest.raises(TypeError, match="native byte order"):
        b = np.zeros(4, dtype=">f4")
        solo.all_reduce(b, b, op=ReduceOp.SUM)
    ro = np.zeros(16, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        solo.all_reduce(a, ro, op=ReduceOp.SUM)
    with pytest.raises(ValueError, match="empty"):
        solo.all_reduce(a[:0], a[:0], op=ReduceOp.SUM)
    with pytest.raises(TypeError, match="expected a numpy.ndarray or a torch.Tensor"):
        solo.all_reduce([1.0, 2.0], [1.0, 2.0], op=ReduceOp.SUM)
    with pytest.raises(TypeError, match="operand_descriptor"):
        solo.all_reduce(a, a, op=ReduceOp.SUM, operand_descriptor=ReduceOperandDescriptor(DataType.DOUBLE))
    with pytest.raises(ValueError, match="contiguous"):
        TensorInfo.from_numpy(np.zeros((4, 4), dtype=np.float32).T, "t")
    with pytest.raises(ValueError, match="read-only"):
        TensorInfo.from_numpy(ro, "t")
    with pytest.raises(TypeError):
        TensorInfo.from_numpy([1, 2], "t")
    with pytest.raises(ValueError, match="count"):
        ReduceOpDescriptor.from_numpy(a, a, ReduceDescriptor(17, ReduceOp.SUM))
    with pytest.raises(TypeError):
        ReduceOpDescriptor.from_torch(a, a, ReduceDescriptor(16, ReduceOp.SUM))


def test_core_errors_carry_result_codes(solo):
    np = numpy_or_skip()
    a = np.arange(16, dtype=np.float32)
    # alone in the group: a collective needs two peers
    with pytest.raises(PCCLError) as ei:
        solo.all_reduce(a, a, op=ReduceOp.SUM)
    assert ei.value.result is Result.TOO_FEW_PEERS
    assert np.array_equal(a, np.arange(16, dtype=np.float32))  # untouched
    # overlapping (but not identical) buffers
    with pytest.raises(PCCLError) as ei:
        solo.all_reduce(a[:8], a[4:12], op=ReduceOp.SUM)
    assert ei.value.result is Result.INVALID_ARGUMENT
    # quantizing to a type the algorithm does not support
    with pytest.raises(PCCLError) as ei:
        solo.all_reduce(
            a, a, op=ReduceOp.SUM, quantization_options=QuantizationOptions(DataType.DOUBLE, QuantizationAlgorithm.MIN_MAX)
        )
    assert ei.value.result is Result.INVALID_ARGUMENT
    # an async all-reduce fails at the call, as pcclAllReduceAsync does
    with pytest.raises(PCCLError) as ei:
        solo.all_reduce_async(a, a, op=ReduceOp.SUM, tag=4)
    assert ei.value.result is Result.TOO_FEW_PEERS
    # broadcast, all-gather and reduce-scatter too, blocking and async
    out = np.zeros(16, dtype=np.float32)
    for call in (
        lambda: solo.broadcast(a, root=0),
        lambda: solo.broadcast_async(a, root=0),
        lambda: solo.all_gather(a, out),
        lambda: solo.all_gather_async(a, out),
        lambda: solo.reduce_scatter(a, out, op=ReduceOp.SUM),
        lambda: solo.reduce_scatter_async(a, out, op=ReduceOp.SUM),
    ):
        with pytest.raises(PCCLError) as ei:
            call()
        assert ei.value.result is Result.TOO_FEW_PEERS
    assert np.array_equal(a, np.arange(16, dtype=np.float32)) and not out.any()  # untouched
    assert solo.get_attribute(Attribute.GLOBAL_WORLD_SIZE) == 1
    assert solo.get_attribute(Attribute.NUM_DISTINCT_PEER_GROUPS) == 1
    assert solo.are_peers_pending() is False
    with pytest.raises(PCCLError) as ei:
        solo.optimize_topology()  # alone in the run, as pcclOptimizeTopology
    assert ei.value.result is Result.INVALID_USAGE
    with pytest.raises(PCCLError) as ei:
        solo.connect(n_attempts=3)
    assert ei.value.result is Result.INVALID_USAGE


def test_torch_buffer_errors(solo):
    torch = torch_or_skip()
    t = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        solo.all_reduce(t.T, t.T, op=ReduceOp.SUM)
    with pytest.raises(ValueError, match="contiguous"):
        TensorInfo.from_torch(t.T, "t")
    with pytest.raises(TypeError, match="same dtype"):
        solo.all_reduce(t, t.double(), op=ReduceOp.SUM)
    with pytest.raises(TypeError, match="unsupported dtype"):
        TensorInfo.from_torch(torch.zeros(2, dtype=torch.complex64), "c")
    with pytest.raises(TypeError, match="unsupported dtype"):
        TensorInfo.from_torch(torch.zeros(2, dtype=torch.bool), "b")
    with pytest.raises(ValueError, match="device"):
        TensorInfo.from_torch(torch.zeros(2, device="meta"), "m")
    with pytest.raises(ValueError, match="sparse|dense"):
        solo.all_reduce(t.to_sparse(), t.to_sparse(), op=ReduceOp.SUM)
    # A CUDA tensor, faked so the check runs without a GPU.
    from pccl import _tensors

    class FakeDevice:
        type = "cuda"

        def __str__(self):
            return "cuda:0"

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return FakeDevice()

    fake = t.as_subclass(FakeCuda)
    with pytest.raises(ValueError, match="CUDA tensors are not supported"):
        _tensors.describe(fake, "send")
    raw = TensorInfo("raw", t.data_ptr(), numel=16, dtype=DataType.FLOAT, device_type=pccl.DeviceType.CUDA)
    with pytest.raises(PCCLError) as ei:
        solo.sync_shared_state(SharedState([raw]))
    assert ei.value.result is Result.INVALID_ARGUMENT
    # zero-dim tensors (Adam's step) are fine
    assert TensorInfo.from_torch(torch.tensor(3.0), "step").numel == 1
    assert DataType.from_torch_dtype(torch.bfloat16) is DataType.BFLOAT16
    assert DataType.BFLOAT16.to_torch_dtype() is torch.bfloat16


def test_communicator_and_master_errors(master):
    with pytest.raises(ValueError):
        Communicator("no-port-here")
    with pytest.raises(ValueError):
        Communicator("256.1.1.1:80")
    c = Communicator(master.listen_address)
    with pytest.raises(PCCLError) as ei:
        c.update_topology()
    assert ei.value.result is Result.INVALID_USAGE  # not connected
    with pytest.raises(PCCLError) as ei:
        c.get_attribute(Attribute.GLOBAL_WORLD_SIZE)
    assert ei.value.result is Result.INVALID_USAGE
    c.close()
    assert c.closed
    # No master listening there.
    with MasterNode("127.0.0.1:0") as tmp:
        dead = tmp.listen_address
    c = Communicator(dead)
    t0 = time.monotonic()
    with pytest.raises(PCCLError) as ei:
        c.connect(n_attempts=1)
    assert ei.value.result is Result.MASTER_CONNECTION_FAILED
    assert time.monotonic() - t0 < 15
    # Port already taken by the fixture's master.
    with pytest.raises(PCCLError) as ei:
        MasterNode(master.listen_address)
    assert ei.value.result is Result.INVALID_ARGUMENT
    m = MasterNode("127.0.0.1:0")
    try:
        assert m.port > 0 and m.listen_address.endswith(f":{m.port}")
        with pytest.raises(PCCLError) as ei:
            m.await_termination()  # not running
        assert ei.value.result is Result.INVALID_USAGE
        m.run()
        with pytest.raises(PCCLError):
            m.run()
        m.interrupt()
        m.await_termination()
    finally:
        m.close()  # a master left running would keep this process serving at exit


# ---------------------------------------------------------------------------
# processes: entry point, import without numpy/torch, Ctrl-C
# ---------------------------------------------------------------------------


def test_master_entry_point_and_sigint(launcher):
    p = launcher.spawn_cmd("master-cli", [sys.executable, "-m", "pccl.master", "--listen", "127.0.0.1:0"])
    ev = p.wait_event(lambda e: e.get("line", "").startswith("pccl-master listening on"), timeout=30)
    addr = ev["line"].rsplit(" ", 1)[1]
    c = Communicator(addr, shared_state_port=0, p2p_port=0, benchmark_port=0)
    c.connect(n_attempts=2)
    assert c.get_attribute(Attribute.GLOBAL_WORLD_SIZE) == 1
    c.close()
    p.kill(signal.SIGINT)
    assert p.proc.wait(timeout=15) == 0


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "pccl-master")
    if not os.path.exists(exe):
        pytest.skip("pccl-master console script not installed in this environment")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--listen" in out.stdout


def test_imports_without_numpy_or_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('numpy', 'torch'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pccl\n"
        "assert 'numpy' not in sys.modules and 'torch' not in sys.modules\n"
        "m = pccl.MasterNode('127.0.0.1:0'); m.run(); m.interrupt(); m.await_termination()\n"
        "try:\n"
        "    pccl.DataType.FLOAT.to_torch_dtype()\n"
        "except ImportError as e:\n"
        "    print('ok', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=peer_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("where", ["connect", "all_reduce", "wait", "broadcast", "broadcast_wait"])
def test_ctrl_c_interrupts_blocking_calls(launcher, where):
    numpy_or_skip()
    if where == "connect":
        # An accepted peer that never runs update_topology: the newcomer's connect blocks.
        idle = launcher.spawn("idle", 0, stdin=True)
        idle.wait_event(lambda e: e.get("event") == "ready", timeout=30)
        p = launcher.spawn("interrupt", 1, where=where)
    else:
        # Two peers; only one enters the all-reduce, so it blocks.
        idle = launcher.spawn("idle", 0, stdin=True, world=2)
        p = launcher.spawn("interrupt", 1, where=where, world=2)
    p.wait_event(lambda e: e.get("event") == "blocking", timeout=60)
    time.sleep(0.5)
    sent_at = time.time()
    p.kill(signal.SIGINT)
    res = p.result(timeout=10)
    # KeyboardInterrupt within a second of the signal (generous for a loaded CI box).
    assert res["interrupted_at"] - sent_at < 1.0, res
    if where in ("wait", "broadcast_wait"):
        # An interrupted wait() leaves the handle and the communicator usable.
        assert res["closed"] is False and res["after"] == "still in flight", res
    else:
        # An interrupted blocking call closes the communicator cleanly.
        assert res["closed"] is True and res["after"] == "INVALID_USAGE", res
    if idle.proc.stdin is not None:
        idle.proc.stdin.close()
