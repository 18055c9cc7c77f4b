"""Compatibility with PCCL 1.0's Python package (pypccl 1.0, module ``pccl``).

``PYPCCL_API`` below is pypccl 1.0's public API, name by name, as defined in
its ``pccl/_pccl.py`` and ``pccl/__init__.py``: every class, function and
method with its parameters (name, kind, default), every enum member, every
attribute. The test checks each entry against this package with
``inspect.signature``. This package may add parameters (with defaults) and
give defaults to parameters pypccl requires; it must not rename, reorder,
change the kind or change the default of any of pypccl's. Known differences
are listed in ``KNOWN_DIFFERENCES`` (and in README.md, with reasons).

Also here: module paths (``pccl._pccl``, ``pccl.cuda``, ``pccl._cuda``),
exception types, and the call-time errors of ``all_reduce_async`` and
``optimize_topology`` (the C API's result codes).
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import pccl
from pccl import (
    Attribute,
    Communicator,
    DataType,
    DistributionHint,
    PCCLError,
    QuantizationAlgorithm,
    ReduceOp,
    Result,
    SharedStateSyncStrategy,
)

from conftest import numpy_or_skip, peer_env, torch_or_skip

REQ = object()  # no default
P = inspect.Parameter.POSITIONAL_OR_KEYWORD
K = inspect.Parameter.KEYWORD_ONLY

# (qualified name, [(parameter, kind, default)]) without self/cls; for
# static and class methods too.
PYPCCL_SIGNATURES = {
    "PCCLError.__init__": [("result", P, REQ), ("func_name", P, REQ)],
    "PCCLError.check": [("result", P, REQ), ("func_name", P, REQ)],
    "DataType.to_torch_dtype": [],
    "DataType.to_numpy_dtype": [],
    "DataType.from_torch_dtype": [("dtype", P, REQ)],
    "DataType.from_numpy_dtype": [("dtype", P, REQ)],
    "DeviceType.from_torch_device_type": [("device_type", P, REQ)],
    "ReduceOperandDescriptor.__init__": [("datatype", P, REQ), ("distribution_hint", P, DistributionHint.NONE)],
    "QuantizationOptions.__init__": [
        ("quantized_datatype", P, DataType.UINT8),
        ("algorithm", P, QuantizationAlgorithm.MIN_MAX),
    ],
    "ReduceDescriptor.__init__": [
        ("count", P, REQ),
        ("op", P, REQ),
        ("tag", P, REQ),
        ("operand_descriptor", P, REQ),
        ("quantization_options", P, REQ),
    ],
    "ReduceOpDescriptor.__init__": [("sendbuf_ptr", P, REQ), ("recvbuf_ptr", P, REQ), ("reduce_descriptor", P, REQ)],
    "ReduceOpDescriptor.from_torch": [("send", P, REQ), ("recv", P, REQ), ("reduce_descriptor", P, REQ)],
    "ReduceOpDescriptor.from_numpy": [("send", P, REQ), ("recv", P, REQ), ("reduce_descriptor", P, REQ)],
    "TensorInfo.__init__": [
        ("name", P, REQ),
        ("data_ptr", P, REQ),
        ("numel", K, REQ),
        ("dtype", K, REQ),
        ("device_type", K, REQ),
        ("allow_content_inequality", K, REQ),
    ],
    "TensorInfo.from_torch": [("tensor", P, REQ), ("name", P, REQ), ("allow_content_inequality", K, False)],
    "TensorInfo.from_numpy": [("tensor", P, REQ), ("name", P, REQ), ("allow_content_inequality", K, False)],
    "SharedState.__init__": [("tensor_infos", P, REQ)],
    "SharedState.push_revision": [],
    "SharedStateSyncInfo.__init__": [("tx_bytes", P, REQ), ("rx_bytes", P, REQ)],
    "ReduceInfo.__init__": [("local_world_size", P, REQ), ("tx_bytes", P, REQ), ("rx_bytes", P, REQ)],
    "AsyncReduceHandle.__init__": [("handle", P, REQ)],
    "AsyncReduceHandle.wait": [],
    "Communicator.__init__": [("address", P, REQ), ("peer_group", P, 0), ("p2p_connection_pool_size", P, 0)],
    "Communicator.get_attribute": [("attribute", P, REQ)],
    "Communicator.connect": [("n_attempts", P, 5)],
    "Communicator.update_topology": [],
    "Communicator.are_peers_pending": [],
    "Communicator.optimize_topology": [],
    "Communicator.sync_shared_state": [
        ("shared_state", P, REQ),
        ("strategy", P, SharedStateSyncStrategy.ENFORCE_POPULAR),
    ],
    "Communicator.all_reduce": [
        ("send", P, REQ),
        ("recv", P, REQ),
        ("op", K, REQ),
        ("tag", K, 0),
        ("operand_descriptor", K, None),
        ("quantization_options", K, None),
    ],
    "Communicator.all_reduce_async": [
        ("send", P, REQ),
        ("recv", P, REQ),
        ("op", K, REQ),
        ("tag", K, 0),
        ("operand_descriptor", K, None),
        ("quantization_options", K, None),
    ],
    "Communicator.all_reduce_multiple_with_retry": [("descriptors", P, REQ), ("max_in_flight", K, 4)],
    "MasterNode.__init__": [("listen_address", P, REQ)],
    "MasterNode.run": [],
    "MasterNode.interrupt": [],
    # Names of the releases before 1.0 (pypccl 0.x) that 1.0 code still uses.
    "Communicator.current_world_size": [],
}

STATIC = {"PCCLError.check", "ReduceOpDescriptor.from_torch", "ReduceOpDescriptor.from_numpy"}
CLASSMETHODS = {
    "DataType.from_torch_dtype",
    "DataType.from_numpy_dtype",
    "DeviceType.from_torch_device_type",
    "TensorInfo.from_torch",
    "TensorInfo.from_numpy",
}

PYPCCL_ENUMS = {
    "Result": [
        "SUCCESS", "NOT_INITIALIZED", "INTERNAL_ERROR", "INVALID_ARGUMENT", "INVALID_USAGE", "TOO_FEW_PEERS",
        "MASTER_CONNECTION_FAILED", "RANK_CONNECTION_FAILED", "RANK_CONNECTION_LOST", "NO_SHARED_STATE_AVAILABLE",
        "PENDING_ASYNC_OPS", "UPDATE_TOPOLOGY_FAILED", "TOPOLOGY_OPTIMIZATION_FAILED",
    ],
    "ReduceOp": ["SUM", "AVG", "PROD", "MAX", "MIN"],
    "Attribute": ["GLOBAL_WORLD_SIZE", "LOCAL_WORLD_SIZE", "NUM_DISTINCT_PEER_GROUPS", "LARGEST_PEER_GROUP_WORLD_SIZE"],
    "SharedStateSyncStrategy": ["ENFORCE_POPULAR", "RECEIVE_ONLY", "SEND_ONLY"],
    "DataType": [
        "UINT4", "UINT8", "INT8", "UINT16", "UINT32", "INT32", "UINT64", "INT64", "FLOAT16", "BFLOAT16", "FLOAT",
        "DOUBLE",
    ],
    "DeviceType": ["CPU", "CUDA"],
    "DistributionHint": ["NONE", "NORMAL", "UNIFORM"],
    "QuantizationAlgorithm": ["NONE", "MIN_MAX", "ZERO_POINT_SCALE"],
}

# Instance attributes set by pypccl's constructors, per class, with the
# constructor arguments used to make an instance here.
PYPCCL_ATTRIBUTES = {
    "ReduceOperandDescriptor": ["datatype", "distribution_hint"],
    "QuantizationOptions": ["quantized_datatype", "algorithm"],
    "ReduceDescriptor": ["count", "op", "tag", "operand_descriptor", "quantization_options"],
    "ReduceOpDescriptor": ["sendbuf_ptr", "recvbuf_ptr", "reduce_descriptor"],
    "TensorInfo": ["name", "data_ptr", "numel", "dtype", "device_type", "allow_content_inequality"],
    "SharedState": ["revision"],
    "SharedStateSyncInfo": ["tx_bytes", "rx_bytes"],
    "ReduceInfo": ["local_world_size", "world_size", "tx_bytes", "rx_bytes"],
    "PCCLError": ["result"],
}

# pypccl 1.0's __all__ (plus "cuda", in its __init__ as `import pccl._cuda as cuda`).
PYPCCL_ALL = [
    "cuda", "Communicator", "MasterNode", "ReduceOp", "Attribute", "SharedStateSyncStrategy", "DataType",
    "DistributionHint", "QuantizationAlgorithm", "ReduceOperandDescriptor", "QuantizationOptions",
    "ReduceDescriptor", "TensorInfo", "SharedState", "SharedStateSyncInfo", "ReduceInfo", "ReduceOpDescriptor",
    "AsyncReduceHandle", "PCCLError",
]
# Defined in pypccl's pccl._pccl without being in __all__.
PYPCCL_MODULE_NAMES = PYPCCL_ALL[1:] + ["Result", "DeviceType"]

KNOWN_DIFFERENCES = {
    "DataType.UINT4": "PCCL-rs's pccl.h has no 4-bit type (pcclUint4); it has INT16 instead",
}


def _resolve(qualname: str):
    cls_name, _, attr = qualname.partition(".")
    cls = getattr(pccl, cls_name)
    return cls, attr


@pytest.mark.parametrize("qualname", sorted(PYPCCL_SIGNATURES))
def test_signature_matches_pypccl(qualname):
    cls, attr = _resolve(qualname)
    raw = inspect.getattr_static(cls, attr)
    if qualname in STATIC:
        assert isinstance(raw, staticmethod), f"{qualname} must be a staticmethod"
    if qualname in CLASSMETHODS:
        assert isinstance(raw, classmethod), f"{qualname} must be a classmethod"
    sig = inspect.signature(getattr(cls, attr))
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    expected = PYPCCL_SIGNATURES[qualname]
    assert len(params) >= len(expected), f"{qualname}{sig}: fewer parameters than pypccl's"
    for p, (name, kind, default) in zip(params, expected):
        assert p.name == name, f"{qualname}{sig}: parameter {p.name!r} where pypccl has {name!r}"
        assert p.kind == kind, f"{qualname}{sig}: {name} is {p.kind.description}, pypccl's is {kind.description}"
        if default is not REQ:
            assert p.default is not inspect.Parameter.empty and p.default == default, (
                f"{qualname}{sig}: {name} defaults to {p.default!r}, pypccl's to {default!r}"
            )
    for extra in params[len(expected):]:
        assert extra.default is not inspect.Parameter.empty or extra.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ), f"{qualname}{sig}: extra parameter {extra.name!r} must have a default"


@pytest.mark.parametrize("enum_name", sorted(PYPCCL_ENUMS))
def test_enum_members_match_pypccl(enum_name):
    enum_cls = getattr(pccl, enum_name)
    for member in PYPCCL_ENUMS[enum_name]:
        key = f"{enum_name}.{member}"
        if key in KNOWN_DIFFERENCES:
            assert not hasattr(enum_cls, member), f"{key} exists now: drop it from KNOWN_DIFFERENCES and README.md"
            continue
        m = getattr(enum_cls, member)
        assert isinstance(m, enum_cls) and m.name in (member, m.name), key
        assert isinstance(m.value, int) and m == m.value, key  # .value and int comparison as pypccl's C ints


def test_attributes_match_pypccl():
    np = numpy_or_skip()
    a = np.zeros(4, dtype=np.float32)
    rd = pccl.ReduceDescriptor(
        4, ReduceOp.SUM, 0, pccl.ReduceOperandDescriptor(DataType.FLOAT), pccl.QuantizationOptions()
    )
    objects = {
        "ReduceOperandDescriptor": pccl.ReduceOperandDescriptor(DataType.FLOAT),
        "QuantizationOptions": pccl.QuantizationOptions(),
        "ReduceDescriptor": rd,
        "ReduceOpDescriptor": pccl.ReduceOpDescriptor.from_numpy(a, a, rd),
        "TensorInfo": pccl.TensorInfo.from_numpy(a, "a"),
        "SharedState": pccl.SharedState([pccl.TensorInfo.from_numpy(a, "a")]),
        "SharedStateSyncInfo": pccl.SharedStateSyncInfo(1, 2),
        "ReduceInfo": pccl.ReduceInfo(3, 1, 2),
        "PCCLError": PCCLError(Result.INVALID_USAGE, "pcclFoo"),
    }
    for cls_name, attrs in PYPCCL_ATTRIBUTES.items():
        for attr in attrs:
            assert hasattr(objects[cls_name], attr), f"{cls_name}.{attr}"
    info = objects["ReduceInfo"]
    assert info.world_size == info.local_world_size == 3
    info.world_size = 4
    assert info.local_world_size == 4
    # pypccl: the revision is settable and push_revision adds one.
    s = objects["SharedState"]
    s.revision = 7
    s.push_revision()
    assert s.revision == 8
    t = objects["TensorInfo"]
    assert t.dtype is DataType.FLOAT and t.device_type is pccl.DeviceType.CPU and t.numel == 4
    assert t.data_ptr == a.__array_interface__["data"][0]
    # pypccl's ReduceDescriptor requires all five arguments; positional calls work.
    assert (rd.count, rd.op, rd.tag) == (4, ReduceOp.SUM, 0)
    assert objects["PCCLError"].result is Result.INVALID_USAGE and "pcclFoo" in str(objects["PCCLError"])


def test_public_names_and_module_paths():
    for name in PYPCCL_ALL:
        assert hasattr(pccl, name), name
        assert name in pccl.__all__, name
    # PCCL 1.0 defined its API in pccl._pccl; users import from there too.
    from pccl import _pccl

    for name in PYPCCL_MODULE_NAMES:
        assert getattr(_pccl, name) is getattr(pccl, name), name
    namespace: dict = {}
    exec("from pccl._pccl import *", namespace)
    assert all(n in namespace for n in PYPCCL_MODULE_NAMES)
    from pccl._pccl import ReduceDescriptor  # noqa: F401  (the import seen in users' code)

    # pypccl's cffi internals fail with a message naming the public import.
    for stmt in ("from pccl._pccl import ffi", "from pccl._pccl import C", "import pccl._loader", "import pccl._cdecls"):
        with pytest.raises(ImportError, match="import pccl"):
            exec(stmt, {})
    with pytest.raises(AttributeError, match="from pccl import"):
        _pccl.NoSuchName  # noqa: B018
    # pccl.cuda, pccl._cuda (pypccl set pccl._cuda.is_cuda_available).
    cuda = importlib.import_module("pccl.cuda")
    _cuda = importlib.import_module("pccl._cuda")
    assert cuda is pccl.cuda and _cuda is pccl._cuda
    assert pccl.cuda.is_available() is False and pccl._cuda.is_cuda_available is False
    assert pccl._cuda.is_available() is False and pccl.is_cuda_available() is False
    assert pccl.get_build_info()["has_cuda_support"] is False
    assert importlib.import_module("pccl.master").main
    assert pccl.__version__ == "0.1.0"


def test_pccl_cuda_in_a_fresh_interpreter():
    # `import pccl` alone must make pccl.cuda available (pypccl's tests do
    # `pccl.cuda.is_available()` after a bare `import pccl`).
    code = "import pccl; print(pccl.cuda.is_available(), pccl._cuda.is_cuda_available)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=peer_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------
# exception types
# ---------------------------------------------------------------------------


def test_exception_types_are_pypccls_and_ours(solo_comm):
    np = numpy_or_skip()
    torch = torch_or_skip()
    c = solo_comm
    # Unsupported dtype: pypccl raised ValueError; this package used to raise TypeError.
    for call in (
        lambda: DataType.from_torch_dtype(torch.complex64),
        lambda: DataType.from_numpy_dtype(np.dtype(np.complex64)),
        lambda: pccl.TensorInfo.from_torch(torch.zeros(2, dtype=torch.bool), "b"),
        lambda: c.all_reduce(np.zeros(4, dtype=np.complex64), np.zeros(4, dtype=np.complex64), op=ReduceOp.SUM),
        # Unsupported input types (neither both torch nor both numpy): pypccl's ValueError.
        lambda: c.all_reduce([1.0], [1.0], op=ReduceOp.SUM),
        lambda: c.all_reduce_async("x", "y", op=ReduceOp.SUM),
    ):
        with pytest.raises(ValueError) as ei:
            call()
        assert isinstance(ei.value, TypeError) and isinstance(ei.value, pccl.UnsupportedTypeError)
    # Buffer checks that pypccl made with assert: AssertionError and ValueError.
    t = torch.zeros(4, 4)
    for call in (
        lambda: c.all_reduce(t.T, t.T, op=ReduceOp.SUM),
        lambda: c.all_reduce(t, torch.zeros(3), op=ReduceOp.SUM),
        lambda: pccl.TensorInfo.from_torch(t.T, "t"),
    ):
        with pytest.raises(AssertionError) as ei:
            call()
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, pccl.InvalidBufferError)
    with pytest.raises(AssertionError) as ei:
        c.all_reduce(t, t.double(), op=ReduceOp.SUM)
    assert isinstance(ei.value, TypeError) and isinstance(ei.value, pccl.MismatchedBuffersError)


# ---------------------------------------------------------------------------
# errors at the call, as the C API
# ---------------------------------------------------------------------------


@pytest.fixture
def solo_comm(master):
    c = Communicator(master.listen_address, shared_state_port=0, p2p_port=0, benchmark_port=0)
    c.connect(n_attempts=1)
    yield c
    c.close()


def _code(call) -> Result:
    with pytest.raises(PCCLError) as ei:
        call()
    return ei.value.result


def test_all_reduce_async_errors_at_the_call(master, solo_comm):
    np = numpy_or_skip()
    a = np.arange(16, dtype=np.float32)
    # Alone in the group: pcclAllReduceAsync returns pcclTooFewPeers; so does the call here.
    assert _code(lambda: solo_comm.all_reduce_async(a, a, op=ReduceOp.SUM)) is Result.TOO_FEW_PEERS
    assert _code(lambda: solo_comm.all_reduce_async(a, a, op=ReduceOp.AVG, tag=9)) is Result.TOO_FEW_PEERS
    assert np.array_equal(a, np.arange(16, dtype=np.float32))
    # Argument errors come before state errors, as in the C API.
    assert _code(lambda: solo_comm.all_reduce_async(a[:8], a[4:12], op=ReduceOp.SUM)) is Result.INVALID_ARGUMENT
    bad_quant = pccl.QuantizationOptions(DataType.DOUBLE, QuantizationAlgorithm.MIN_MAX)
    assert (
        _code(lambda: solo_comm.all_reduce_async(a, a, op=ReduceOp.SUM, quantization_options=bad_quant))
        is Result.INVALID_ARGUMENT
    )
    with pytest.raises(ValueError):
        solo_comm.all_reduce_async(a, a, op=ReduceOp.SUM, tag=-1)
    with pytest.raises(ValueError):
        solo_comm.all_reduce_async(a, a, op=ReduceOp.SUM, numel=3)
    # Not connected, and closed: INVALID_USAGE at the call.
    fresh = Communicator(master.listen_address, shared_state_port=0, p2p_port=0, benchmark_port=0)
    assert _code(lambda: fresh.all_reduce_async(a, a, op=ReduceOp.SUM)) is Result.INVALID_USAGE
    fresh.close()
    assert _code(lambda: fresh.all_reduce_async(a, a, op=ReduceOp.SUM)) is Result.INVALID_USAGE
    # The blocking forms agree.
    assert _code(lambda: solo_comm.all_reduce(a, a, op=ReduceOp.SUM)) is Result.TOO_FEW_PEERS


def test_optimize_topology_misuse_matches_the_c_api(master, solo_comm):
    # pcclOptimizeTopology: INVALID_USAGE when not connected and when fewer
    # than two peers are in the run (pccl-ffi/src/comm.rs; checked in C by
    # pccl-ffi/tests/c/args.c, "optimize alone").
    assert _code(solo_comm.optimize_topology) is Result.INVALID_USAGE
    fresh = Communicator(master.listen_address, shared_state_port=0, p2p_port=0, benchmark_port=0)
    assert _code(fresh.optimize_topology) is Result.INVALID_USAGE
    fresh.close()
    assert _code(fresh.optimize_topology) is Result.INVALID_USAGE
    # The communicator is still usable afterwards.
    assert solo_comm.get_attribute(Attribute.GLOBAL_WORLD_SIZE) == 1
    assert solo_comm.are_peers_pending() is False


def test_async_rules_with_two_peers(launcher):
    numpy_or_skip()
    peers = [launcher.spawn("async_rules", r) for r in range(2)]
    results = [p.result(timeout=90) for p in peers]
    codes = results[0]["codes"]
    assert codes == {
        "same_tag_async": "INVALID_ARGUMENT",
        "same_tag_blocking": "INVALID_ARGUMENT",
        "update_topology": "PENDING_ASYNC_OPS",
        "optimize_topology": "PENDING_ASYNC_OPS",
        "sync_shared_state": "PENDING_ASYNC_OPS",
        "wait": "SUCCESS",
    }, codes
    assert all(r["first"] == 3 and r["second"] == 3 for r in results), results
