"""CUDA availability (PCCL 1.0 compatibility: ``pccl._cuda.is_cuda_available``)."""

from ._pccl import HAS_CUDA_SUPPORT

is_cuda_available: bool = bool(HAS_CUDA_SUPPORT)
