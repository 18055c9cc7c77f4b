"""CUDA support of this build: ``pccl.cuda.is_available()`` (PCCL 1.0's name).

This build has no CUDA code: :func:`is_available` is ``False`` and CUDA
tensors are rejected with :class:`pccl.InvalidBufferError` (all-reduce
buffers, ``TensorInfo.from_torch``); a raw ``TensorInfo`` with
``device_type=DeviceType.CUDA`` fails at ``sync_shared_state`` with
``PCCLError`` / ``Result.INVALID_ARGUMENT``.
"""

from ._native import HAS_CUDA_SUPPORT

__all__ = ["is_available", "is_cuda_available"]

is_cuda_available: bool = bool(HAS_CUDA_SUPPORT)
"""Whether this build accepts CUDA device memory (PCCL 1.0's module attribute): ``False``."""


def is_available() -> bool:
    """Whether this build accepts CUDA device memory: ``False`` (no CUDA support yet)."""
    return is_cuda_available
