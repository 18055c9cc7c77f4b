"""PCCL: fault-tolerant collective communication for training across the internet.

A swarm of peers, coordinated by one lightweight master, all-reduces tensors
over a ring and keeps a shared state (model weights, optimizer buffers)
bit-identical across peers, while peers join at step boundaries and leave or
die at any moment. This is the Python package of PCCL-rs; its names match
PCCL 1.0's ``pccl`` package, so existing code runs unchanged.

NumPy and PyTorch are optional: NumPy arrays and PyTorch CPU tensors are
used in place, without copies, by whichever library is installed.

Minimal use::

    import pccl, torch
    comm = pccl.Communicator("127.0.0.1:48148", peer_group=0)
    comm.connect()
    x = torch.ones(1024)
    info = comm.all_reduce(x, x, op=pccl.ReduceOp.SUM)

Logging goes to stderr; ``PCCL_LOG`` (or ``RUST_LOG``) sets the level
(``warn`` by default), and :func:`set_log_level` changes it at run time.
"""

from . import _pccl
from ._api import (
    AsyncReduceHandle,
    Communicator,
    MasterNode,
    QuantizationOptions,
    ReduceDescriptor,
    ReduceInfo,
    ReduceOpDescriptor,
    ReduceOperandDescriptor,
    SharedState,
    SharedStateSyncInfo,
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
from ._errors import PCCLError

__version__: str = _pccl.__version__

DEFAULT_MASTER_PORT: int = _pccl.DEFAULT_MASTER_PORT

_pccl.init_logging(None)


def set_log_level(level: str) -> None:
    """Sets the native log filter: ``"error"``, ``"warn"``, ``"info"``, ``"debug"``,
    ``"trace"`` or a ``tracing`` filter such as ``"pccl_core=debug"``."""
    _pccl.init_logging(str(level))


def is_cuda_available() -> bool:
    """Whether this build accepts CUDA tensors (not yet: always ``False``)."""
    return bool(_pccl.HAS_CUDA_SUPPORT)


def get_build_info() -> dict:
    """Build information, as PCCL 1.0's ``pcclGetBuildInfo``."""
    return {"has_cuda_support": is_cuda_available(), "version": __version__}


__all__ = [
    "AsyncReduceHandle",
    "Attribute",
    "Communicator",
    "DataType",
    "DeviceType",
    "DistributionHint",
    "MasterNode",
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
    "SharedStateSyncInfo",
    "SharedStateSyncStrategy",
    "TensorInfo",
    "DEFAULT_MASTER_PORT",
    "get_build_info",
    "is_cuda_available",
    "set_log_level",
    "__version__",
]
