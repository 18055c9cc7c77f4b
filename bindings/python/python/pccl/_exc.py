"""Exception types of the Python layer (no imports, so every module can use them;
re-exported by :mod:`pccl._errors` and :mod:`pccl`)."""

__all__ = ["UnsupportedTypeError", "InvalidBufferError", "MismatchedBuffersError"]


class UnsupportedTypeError(ValueError, TypeError):
    """An unsupported element type (dtype) or input type (neither a NumPy array
    nor a PyTorch tensor). PCCL 1.0 raised ``ValueError``; this package used
    to raise ``TypeError``: it is both."""


class InvalidBufferError(ValueError, AssertionError):
    """A buffer pccl cannot use: not contiguous, empty, read-only, on a CUDA or
    other non-CPU device, or not matching its partner in size. PCCL 1.0
    checked these with ``assert`` (``AssertionError``); this package raises
    ``ValueError``: it is both."""


class MismatchedBuffersError(InvalidBufferError, TypeError):
    """``send`` and ``recv`` (or a buffer and its descriptor) differ in dtype.
    PCCL 1.0: ``AssertionError``; earlier versions of this package: ``TypeError``."""
