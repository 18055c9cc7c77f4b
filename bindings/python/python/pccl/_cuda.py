"""PCCL 1.0's private name of :mod:`pccl.cuda` (``pccl._cuda.is_cuda_available``)."""

from .cuda import is_available, is_cuda_available

__all__ = ["is_available", "is_cuda_available"]
