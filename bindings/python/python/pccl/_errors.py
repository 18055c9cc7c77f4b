"""The exception types of the PCCL API.

:class:`PCCLError` carries a result code from the library. The other three
are raised by the Python layer before anything reaches the library; each
derives from the type PCCL 1.0's package raised for the same mistake *and*
from the type earlier versions of this package raised, so ``except`` clauses
written for either keep working.
"""

from __future__ import annotations

from ._enums import Result
from ._exc import InvalidBufferError, MismatchedBuffersError, UnsupportedTypeError

__all__ = ["PCCLError", "UnsupportedTypeError", "InvalidBufferError", "MismatchedBuffersError"]


class PCCLError(Exception):
    """A PCCL call failed. ``result`` is the :class:`pccl.Result` code; ``message`` the cause.

    Compatible with PCCL 1.0: ``PCCLError(result, func_name)``.
    """

    result: Result
    func_name: str
    message: str

    def __init__(self, result: Result | int, func_name: str = "", message: str = "") -> None:
        try:
            result = Result(result)
        except ValueError:
            result = Result.INTERNAL_ERROR
        self.result = result
        self.func_name = func_name
        self.message = message
        head = f"{func_name} failed with error: {result.name}" if func_name else f"PCCL error: {result.name}"
        super().__init__(f"{head}: {message}" if message else head)

    @staticmethod
    def check(result: int, func_name: str) -> None:
        """Raises :class:`PCCLError` unless ``result`` is ``Result.SUCCESS`` (PCCL 1.0 helper)."""
        if result != Result.SUCCESS:
            raise PCCLError(result, func_name)

    @classmethod
    def _from_native(cls, code: int, func_name: str, message: str) -> "PCCLError":
        return cls(code, func_name, message)

