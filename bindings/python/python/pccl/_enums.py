"""Enumerations of the PCCL API.

Member names follow PCCL 1.0's Python package; values equal the C header's
(``pccl.h``). Every enum is an :class:`enum.IntEnum`, so ``.value`` and
``.name`` work as in PCCL 1.0 and members also compare equal to the raw C
integers (``status == 0``).
"""

from __future__ import annotations

import enum
import sys
from typing import Any

from ._exc import UnsupportedTypeError

__all__ = [
    "Result",
    "ReduceOp",
    "Attribute",
    "DataType",
    "DeviceType",
    "DistributionHint",
    "QuantizationAlgorithm",
    "SharedStateSyncStrategy",
]


class _Enum(enum.IntEnum):
    """IntEnum whose ``str()`` reads ``ReduceOp.SUM`` (as PCCL 1.0's plain enums did)."""

    __str__ = enum.Enum.__str__
    __format__ = enum.Enum.__format__


class Result(_Enum):
    """Result codes (``pcclResult_t``). Carried by :class:`pccl.PCCLError`."""

    SUCCESS = 0
    NOT_INITIALIZED = 1
    INTERNAL_ERROR = 2
    INVALID_ARGUMENT = 3
    INVALID_USAGE = 4
    TOO_FEW_PEERS = 5
    MASTER_CONNECTION_FAILED = 6
    RANK_CONNECTION_FAILED = 7
    RANK_CONNECTION_LOST = 8
    NO_SHARED_STATE_AVAILABLE = 9
    PENDING_ASYNC_OPS = 10
    UPDATE_TOPOLOGY_FAILED = 11
    TOPOLOGY_OPTIMIZATION_FAILED = 12


class ReduceOp(_Enum):
    """Reduction operations (``pcclRedOp_t``). ``AVG`` divides by the number of peers that took part."""

    SUM = 0
    AVG = 1
    PROD = 2
    MAX = 3
    MIN = 4


class Attribute(_Enum):
    """Communicator attributes for :meth:`pccl.Communicator.get_attribute` (``pcclAttribute_t``)."""

    GLOBAL_WORLD_SIZE = 1
    """Accepted peers, all groups."""
    LOCAL_WORLD_SIZE = 2
    """Accepted peers of this peer's group (``PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE``)."""
    NUM_DISTINCT_PEER_GROUPS = 3
    LARGEST_PEER_GROUP_WORLD_SIZE = 4
    PEER_GROUP_WORLD_SIZE = 2  # alias of LOCAL_WORLD_SIZE, the C name


class SharedStateSyncStrategy(_Enum):
    """How a peer takes part in a shared-state sync (``pcclSharedStateSyncStrategy_t``)."""

    ENFORCE_POPULAR = 0
    """Vote, send when asked, receive when out of date (default)."""
    RECEIVE_ONLY = 1
    """Never vote, never send; receive the popular content."""
    SEND_ONLY = 2
    """Vote and send; fail if this peer does not hold the popular content."""


class DeviceType(_Enum):
    """Where a buffer lives (``pcclDeviceType_t``)."""

    CPU = 0
    CUDA = 1

    @classmethod
    def from_torch_device_type(cls, device_type: str) -> "DeviceType | None":
        """Maps a ``torch.device.type`` string (``"cpu"``, ``"cuda"``) to a member, or ``None``."""
        return {"cpu": cls.CPU, "cuda": cls.CUDA}.get(device_type)


class DistributionHint(_Enum):
    """Hint about an operand's value distribution (``pcclDistributionHint_t``)."""

    NONE = 0
    NORMAL = 1
    UNIFORM = 2


class QuantizationAlgorithm(_Enum):
    """Quantization of all-reduce traffic (``pcclQuantizationAlgorithm_t``)."""

    NONE = 0
    MIN_MAX = 1
    ZERO_POINT_SCALE = 2


def _require(module: str) -> Any:
    mod = sys.modules.get(module)
    if mod is not None:
        return mod
    try:
        return __import__(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{module} is not installed; install it (pip install {module}) to use this function"
        ) from e


_TORCH_NAMES = {
    0: "uint8",
    1: "int8",
    2: "int16",
    3: "uint16",
    4: "uint32",
    5: "int32",
    6: "uint64",
    7: "int64",
    8: "float16",
    9: "bfloat16",
    10: "float32",
    11: "float64",
}

# NumPy dtype (kind, itemsize) -> DataType value. bfloat16 (from ml_dtypes) is
# recognised by name.
_NUMPY_CODES = {
    ("u", 1): 0,
    ("i", 1): 1,
    ("i", 2): 2,
    ("u", 2): 3,
    ("u", 4): 4,
    ("i", 4): 5,
    ("u", 8): 6,
    ("i", 8): 7,
    ("f", 2): 8,
    ("f", 4): 10,
    ("f", 8): 11,
}
_NUMPY_NAMES = {v: f"{'float' if k == 'f' else ('uint' if k == 'u' else 'int')}{8 * n}" for (k, n), v in _NUMPY_CODES.items()}


class DataType(_Enum):
    """Element types (``pcclDataType_t``)."""

    UINT8 = 0
    INT8 = 1
    INT16 = 2
    UINT16 = 3
    UINT32 = 4
    INT32 = 5
    UINT64 = 6
    INT64 = 7
    FLOAT16 = 8
    BFLOAT16 = 9
    FLOAT = 10
    DOUBLE = 11
    FLOAT32 = 10  # alias of FLOAT
    FLOAT64 = 11  # alias of DOUBLE

    @property
    def itemsize(self) -> int:
        """Size of one element in bytes."""
        return {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 8, 7: 8, 8: 2, 9: 2, 10: 4, 11: 8}[int(self)]

    @property
    def is_floating_point(self) -> bool:
        return int(self) in (8, 9, 10, 11)

    def to_torch_dtype(self) -> Any:
        """The matching ``torch.dtype`` (imports PyTorch)."""
        torch = _require("torch")
        dt = getattr(torch, _TORCH_NAMES[int(self)], None)
        if dt is None:
            raise UnsupportedTypeError(f"this PyTorch version has no dtype for {self.name}")
        return dt

    def to_numpy_dtype(self) -> Any:
        """The matching ``numpy.dtype`` (imports NumPy; ``BFLOAT16`` needs ``ml_dtypes``)."""
        np = _require("numpy")
        if self == DataType.BFLOAT16:
            try:
                import ml_dtypes  # type: ignore[import-not-found]
            except ImportError as e:
                raise UnsupportedTypeError("NumPy has no bfloat16 dtype; install ml_dtypes for one") from e
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(_NUMPY_NAMES[int(self)])

    @classmethod
    def from_torch_dtype(cls, dtype: Any) -> "DataType":
        """Maps a ``torch.dtype``; raises :class:`pccl.UnsupportedTypeError` (a ``ValueError``, as PCCL 1.0, and a ``TypeError``) for unsupported ones."""
        torch = _require("torch")
        for value, name in _TORCH_NAMES.items():
            if getattr(torch, name, None) == dtype:
                return cls(value)
        raise UnsupportedTypeError(
            f"unsupported dtype {dtype}; pccl supports "
            + ", ".join(f"torch.{n}" for n in _TORCH_NAMES.values())
        )

    @classmethod
    def from_numpy_dtype(cls, dtype: Any) -> "DataType":
        """Maps a ``numpy.dtype`` (native byte order); raises :class:`pccl.UnsupportedTypeError` (a ``ValueError``, as PCCL 1.0, and a ``TypeError``) for unsupported ones."""
        np = _require("numpy")
        dt = np.dtype(dtype)
        if dt.name == "bfloat16":
            return cls.BFLOAT16
        code = _NUMPY_CODES.get((dt.kind, dt.itemsize))
        if code is None:
            raise UnsupportedTypeError(
                f"unsupported dtype {dt}; pccl supports "
                + ", ".join(_NUMPY_NAMES.values())
                + " and ml_dtypes.bfloat16"
            )
        if not dt.isnative:
            raise UnsupportedTypeError(f"dtype {dt} is not in native byte order; use arr.astype(arr.dtype.newbyteorder('='))")
        return cls(code)

    @classmethod
    def _from_typestr(cls, typestr: str) -> "DataType":
        """Maps an ``__array_interface__`` type string such as ``'<f4'``."""
        if len(typestr) < 3 or typestr[0] not in "<>|=":
            raise UnsupportedTypeError(f"unsupported array type string {typestr!r}")
        order, kind, size = typestr[0], typestr[1], typestr[2:]
        if not size.isdigit():
            raise UnsupportedTypeError(f"unsupported array type string {typestr!r}")
        n = int(size)
        native = "<" if sys.byteorder == "little" else ">"
        if n > 1 and order not in ("=", native):
            raise UnsupportedTypeError(f"array type {typestr!r} is not in native byte order")
        code = _NUMPY_CODES.get((kind, n))
        if code is None:
            raise UnsupportedTypeError(f"unsupported array element type {typestr!r}")
        return cls(code)
