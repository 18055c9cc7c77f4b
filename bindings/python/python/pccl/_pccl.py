"""PCCL 1.0's module path ``pccl._pccl``: the same public names as :mod:`pccl`.

PCCL 1.0's package defined its API in ``pccl._pccl`` and re-exported it from
``pccl``; code that imports from ``pccl._pccl`` (``from pccl._pccl import
ReduceDescriptor``) keeps working. Prefer ``from pccl import ...``.

PCCL 1.0's cffi internals (``ffi``, ``C``, ``load_native_module``,
``ModuleDummy``) do not exist here: this package calls the Rust core
directly. Importing one raises ``ImportError`` saying so.
"""

from typing import Any

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
]

_CFFI_INTERNALS = ("ffi", "C", "load_native_module", "ModuleDummy")


def __getattr__(name: str) -> Any:
    if name in _CFFI_INTERNALS:
        # ImportError (not AttributeError) so that `from pccl._pccl import ffi`
        # shows this message rather than a bare "cannot import name".
        raise ImportError(
            f"pccl._pccl.{name} was part of PCCL 1.0's cffi binding; this pccl package (PCCL-rs) has no cffi "
            f"layer. Use the public API instead: `import pccl` / `from pccl import Communicator, ...`"
        )
    raise AttributeError(
        f"module 'pccl._pccl' has no attribute {name!r}; the public names are importable from `pccl` "
        f"(`from pccl import {name}` if it exists there)"
    )
