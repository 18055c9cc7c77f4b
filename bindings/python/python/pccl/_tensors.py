"""Zero-copy views of NumPy arrays and PyTorch tensors.

Nothing here copies data: a buffer is described by its address, element count
and type, and the owning object is kept so the memory stays alive while the
Rust core uses it. NumPy and PyTorch are never imported here; an object is
recognised as a tensor only when its library is already loaded (which it is,
if the caller holds one of its objects).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ._enums import DataType, DeviceType
from ._exc import InvalidBufferError, UnsupportedTypeError

__all__ = ["Buffer", "describe", "is_torch_tensor", "is_numpy_array"]

_CUDA_MSG = (
    "CUDA tensors are not supported yet: this build of pccl works on CPU memory only; "
    "move the tensor to the CPU (t.cpu()) first"
)


@dataclass(frozen=True)
class Buffer:
    """A contiguous buffer as the core sees it."""

    obj: Any
    ptr: int
    count: int
    dtype: DataType
    device: DeviceType
    writable: bool

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def is_numpy_array(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def _from_torch(t: Any, what: str) -> Buffer:
    torch = sys.modules["torch"]
    if type(t).__name__ == "DTensor":
        raise UnsupportedTypeError(f"{what}: distributed tensors (DTensor) are not supported; pass the local shard")
    if t.layout != torch.strided:
        raise InvalidBufferError(f"{what}: only dense (strided) tensors are supported, not {t.layout}")
    device_type = t.device.type
    if device_type == "cuda":
        raise InvalidBufferError(f"{what}: {_CUDA_MSG}")
    if device_type != "cpu":
        raise InvalidBufferError(f"{what}: tensors on device {t.device} are not supported; use CPU tensors")
    dtype = DataType.from_torch_dtype(t.dtype)
    if not t.is_contiguous():
        raise InvalidBufferError(f"{what}: tensor must be contiguous (call .contiguous() and use the result)")
    count = t.numel()
    if count == 0:
        raise InvalidBufferError(f"{what}: tensor is empty")
    return Buffer(t, int(t.data_ptr()), count, dtype, DeviceType.CPU, True)


def _from_numpy(a: Any, what: str) -> Buffer:
    dtype = DataType.from_numpy_dtype(a.dtype)
    if not a.flags["C_CONTIGUOUS"]:
        raise InvalidBufferError(f"{what}: array must be C-contiguous (use numpy.ascontiguousarray and keep the result)")
    count = int(a.size)
    if count == 0:
        raise InvalidBufferError(f"{what}: array is empty")
    ptr = int(a.__array_interface__["data"][0])
    return Buffer(a, ptr, count, dtype, DeviceType.CPU, bool(a.flags["WRITEABLE"]))


def _from_array_interface(obj: Any, what: str) -> Buffer:
    ai = obj.__array_interface__
    dtype = DataType._from_typestr(ai["typestr"])
    shape = tuple(int(s) for s in ai.get("shape", ()))
    count = 1
    for s in shape:
        count *= s
    strides = ai.get("strides")
    if strides is not None:
        expect = dtype.itemsize
        for dim, stride in zip(reversed(shape), reversed(tuple(strides))):
            if dim > 1 and stride != expect:
                raise InvalidBufferError(f"{what}: array must be C-contiguous")
            expect *= dim
    if count == 0:
        raise InvalidBufferError(f"{what}: array is empty")
    data = ai.get("data")
    if not isinstance(data, tuple) or not data or not data[0]:
        raise UnsupportedTypeError(f"{what}: the object does not expose a data address")
    ptr, readonly = int(data[0]), bool(data[1]) if len(data) > 1 else False
    return Buffer(obj, ptr, count, dtype, DeviceType.CPU, not readonly)


def describe(obj: Any, what: str = "buffer", *, writable: bool = False) -> Buffer:
    """Describes a NumPy array, a PyTorch CPU tensor, or any object with a
    CPU ``__array_interface__``. Raises :class:`UnsupportedTypeError` (a
    ``ValueError`` and a ``TypeError``) for other objects and unsupported
    element types, :class:`InvalidBufferError` (a ``ValueError`` and an
    ``AssertionError``) for non-contiguous, empty, read-only (when
    ``writable``) or device (CUDA) buffers."""
    if is_torch_tensor(obj):
        buf = _from_torch(obj, what)
    elif is_numpy_array(obj):
        buf = _from_numpy(obj, what)
    elif hasattr(obj, "__cuda_array_interface__"):
        raise InvalidBufferError(f"{what}: {_CUDA_MSG}")
    elif hasattr(obj, "__array_interface__"):
        buf = _from_array_interface(obj, what)
    else:
        raise UnsupportedTypeError(
            f"{what}: expected a numpy.ndarray or a torch.Tensor, got {type(obj).__module__}.{type(obj).__qualname__}"
        )
    if writable and not buf.writable:
        raise InvalidBufferError(f"{what}: array is read-only but pccl must write to it")
    return buf
