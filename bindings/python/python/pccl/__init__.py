"""PCCL: fault-tolerant collective communication for training across the internet.

A swarm of peers, coordinated by one lightweight master, all-reduces tensors
over a ring and keeps a shared state (model weights, optimizer buffers)
bit-identical across peers, while peers join at step boundaries and leave or
die at any moment. This is the Python package of PCCL-rs; its names match
PCCL 1.0's ``pccl`` package, so existing code runs unchanged.

NumPy and PyTorch are optional: NumPy arrays and PyTorch CPU tensors are
used in place, without copies, by whichever library is installed.

PCCL 1.0's module paths work too: ``pccl.cuda`` (also ``pccl._cuda``) and
``pccl._pccl`` hold the same names as in PCCL 1.0.

Minimal use::

    import pccl, torch
    comm = pccl.Communicator("127.0.0.1:48148", peer_group=0)
    comm.connect()
    x = torch.ones(1024)
    info = comm.all_reduce(x, x, op=pccl.ReduceOp.SUM)

Logging goes to stderr; ``PCCL_LOG`` (or ``RUST_LOG``) sets the level
(``warn`` by default, plus progress lines while ``connect()`` waits for
admission and during long shared-state fetches: ``warn,pccl::progress=info``),
and :func:`set_log_level` changes it at run time.
"""

from . import _cuda, _native, cuda
from ._api import (
    AsyncCollectiveHandle,
    AsyncReduceHandle,
    CollectiveInfo,
    Communicator,
    MasterNode,
    QuantizationOptions,
    ReduceDescriptor,
    ReduceInfo,
    ReduceOpDescriptor,
    ReduceOperandDescriptor,
    SharedState,
    SharedStateSyncInfo,
    SyncProgress,
    TensorInfo,
)
from ._enums import (
    Attribute,
    DataType,
    DeviceType,
    DistributionHint,
    QuantizationAlgorithm,
    ReduceOp,
    Result,
    SharedStateSyncStrategy,
)
from ._errors import InvalidBufferError, MismatchedBuffersError, PCCLError, UnsupportedTypeError
from . import _pccl  # noqa: E402  (PCCL 1.0's module path, see pccl/_pccl.py)
from . import diloco  # noqa: E402  (DiLoCo outer steps; imports PyTorch only when used)

if not hasattr(_pccl, "Communicator"):  # pragma: no cover - a stale build in a source tree
    raise ImportError(
        f"{_pccl.__file__} is a native module left over from an older build of pccl (it is now "
        "pccl._native); delete that file, or reinstall the package"
    )

__version__: str = _native.__version__

DEFAULT_MASTER_PORT: int = _native.DEFAULT_MASTER_PORT

_native.init_logging(None)


def set_log_level(level: str) -> None:
    """Sets the native log filter: ``"error"``, ``"warn"``, ``"info"``, ``"debug"``,
    ``"trace"`` or a ``tracing`` filter such as ``"pccl_core=debug"``."""
    _native.init_logging(str(level))


def is_cuda_available() -> bool:
    """Whether this build accepts CUDA tensors (not yet: always ``False``);
    the same as :func:`pccl.cuda.is_available`."""
    return cuda.is_available()


def get_build_info() -> dict:
    """Build information, as PCCL 1.0's ``pcclGetBuildInfo``."""
    return {"has_cuda_support": is_cuda_available(), "version": __version__}


__all__ = [
    "cuda",
    "diloco",
    "AsyncCollectiveHandle",
    "AsyncReduceHandle",
    "Attribute",
    "CollectiveInfo",
    "Communicator",
    "DataType",
    "DeviceType",
    "DistributionHint",
    "InvalidBufferError",
    "MasterNode",
    "MismatchedBuffersError",
    "PCCLError",
    "QuantizationAlgorithm",
    "QuantizationOptions",
    "ReduceDescriptor",
    "ReduceInfo",
    "ReduceOp",
    "ReduceOpDescriptor",
    "ReduceOperandDescriptor",
    "Result",
    "SharedState",
    "SyncProgress",
    "SharedStateSyncInfo",
    "SharedStateSyncStrategy",
    "TensorInfo",
    "UnsupportedTypeError",
    "DEFAULT_MASTER_PORT",
    "get_build_info",
    "is_cuda_available",
    "set_log_level",
    "__version__",
]
