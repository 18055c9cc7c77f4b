"""The PCCL Python API: communicator, master, descriptors, shared state.

Names and signatures follow PCCL 1.0's ``pccl`` package so existing code runs
unchanged; extensions are keyword-only and documented as such.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from . import _native
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
from ._tensors import Buffer, describe, is_numpy_array, is_torch_tensor

__all__ = [
    "Communicator",
    "MasterNode",
    "ReduceInfo",
    "SharedStateSyncInfo",
    "AsyncReduceHandle",
    "CollectiveInfo",
    "AsyncCollectiveHandle",
    "ReduceOperandDescriptor",
    "QuantizationOptions",
    "ReduceDescriptor",
    "ReduceOpDescriptor",
    "TensorInfo",
    "SharedState",
    "SyncProgress",
]

_log = logging.getLogger("pccl")

_U64_MAX = (1 << 64) - 1


def _int_arg(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = value.__index__()
        except AttributeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def _enum_arg(enum_cls: Any, name: str, value: Any) -> Any:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a pccl.{enum_cls.__name__}, got {value!r}")
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{name}: {value} is not a valid pccl.{enum_cls.__name__}") from None


# ---------------------------------------------------------------------------
# Result records
# ---------------------------------------------------------------------------


class ReduceInfo:
    """Outcome of an all-reduce: peers that took part and bytes moved by this peer."""

    __slots__ = ("local_world_size", "tx_bytes", "rx_bytes")

    def __init__(self, local_world_size: int, tx_bytes: int, rx_bytes: int) -> None:
        self.local_world_size = local_world_size
        self.tx_bytes = tx_bytes
        self.rx_bytes = rx_bytes

    @property
    def world_size(self) -> int:
        """Alias of ``local_world_size`` (the name before PCCL 1.0 had peer groups)."""
        return self.local_world_size

    @world_size.setter
    def world_size(self, value: int) -> None:
        self.local_world_size = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReduceInfo):
            return NotImplemented
        return (self.local_world_size, self.tx_bytes, self.rx_bytes) == (
            other.local_world_size,
            other.tx_bytes,
            other.rx_bytes,
        )

    def __repr__(self) -> str:
        return f"ReduceInfo(local_world_size={self.local_world_size}, tx_bytes={self.tx_bytes}, rx_bytes={self.rx_bytes})"


class CollectiveInfo:
    """Outcome of a broadcast, all-gather or reduce-scatter (extension).

    ``rank`` is this peer's position in the master's ring for the operation
    (``0 .. world_size-1``, the same on every peer): it orders all-gather
    output and reduce-scatter segments and names broadcast roots, and stays
    fixed until the next ``update_topology`` / ``optimize_topology`` or a
    peer loss. ``algorithm`` is the master's choice (``"ring"``)."""

    __slots__ = ("world_size", "rank", "tx_bytes", "rx_bytes", "algorithm")

    def __init__(self, world_size: int, rank: int, tx_bytes: int, rx_bytes: int, algorithm: str = "ring") -> None:
        self.world_size = world_size
        self.rank = rank
        self.tx_bytes = tx_bytes
        self.rx_bytes = rx_bytes
        self.algorithm = algorithm

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CollectiveInfo):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return (
            f"CollectiveInfo(world_size={self.world_size}, rank={self.rank}, tx_bytes={self.tx_bytes}, "
            f"rx_bytes={self.rx_bytes}, algorithm={self.algorithm!r})"
        )


class SharedStateSyncInfo:
    """Outcome of a shared-state sync: bytes this peer sent and received."""

    __slots__ = ("tx_bytes", "rx_bytes")

    def __init__(self, tx_bytes: int, rx_bytes: int) -> None:
        self.tx_bytes = tx_bytes
        self.rx_bytes = rx_bytes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SharedStateSyncInfo):
            return NotImplemented
        return (self.tx_bytes, self.rx_bytes) == (other.tx_bytes, other.rx_bytes)

    def __repr__(self) -> str:
        return f"SharedStateSyncInfo(tx_bytes={self.tx_bytes}, rx_bytes={self.rx_bytes})"


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------


class ReduceOperandDescriptor:
    """Element type of the operands and a hint about their distribution."""

    def __init__(self, datatype: DataType, distribution_hint: DistributionHint = DistributionHint.NONE) -> None:
        self.datatype = _enum_arg(DataType, "datatype", datatype)
        self.distribution_hint = _enum_arg(DistributionHint, "distribution_hint", distribution_hint)

    def __repr__(self) -> str:
        return f"ReduceOperandDescriptor(datatype={self.datatype!r}, distribution_hint={self.distribution_hint!r})"


class QuantizationOptions:
    """Quantization of all-reduce traffic. ``algorithm=NONE`` turns it off."""

    def __init__(
        self,
        quantized_datatype: DataType = DataType.UINT8,
        algorithm: QuantizationAlgorithm = QuantizationAlgorithm.MIN_MAX,
    ) -> None:
        self.quantized_datatype = _enum_arg(DataType, "quantized_datatype", quantized_datatype)
        self.algorithm = _enum_arg(QuantizationAlgorithm, "algorithm", algorithm)

    def __repr__(self) -> str:
        return f"QuantizationOptions(quantized_datatype={self.quantized_datatype!r}, algorithm={self.algorithm!r})"


class ReduceDescriptor:
    """What to reduce: element count, operation, tag, operand type, quantization.

    ``operand_descriptor=None`` takes the element type from the buffers;
    ``quantization_options=None`` means no quantization.
    """

    def __init__(
        self,
        count: int,
        op: ReduceOp,
        tag: int = 0,
        operand_descriptor: Optional[ReduceOperandDescriptor] = None,
        quantization_options: Optional[QuantizationOptions] = None,
    ) -> None:
        self.count = _int_arg("count", count, 1, _U64_MAX)
        self.op = _enum_arg(ReduceOp, "op", op)
        self.tag = _int_arg("tag", tag, 0, _U64_MAX)
        if operand_descriptor is not None and not isinstance(operand_descriptor, ReduceOperandDescriptor):
            raise TypeError("operand_descriptor must be a pccl.ReduceOperandDescriptor or None")
        if quantization_options is not None and not isinstance(quantization_options, QuantizationOptions):
            raise TypeError("quantization_options must be a pccl.QuantizationOptions or None")
        self.operand_descriptor = operand_descriptor
        self.quantization_options = quantization_options

    def __repr__(self) -> str:
        return (
            f"ReduceDescriptor(count={self.count}, op={self.op!r}, tag={self.tag}, "
            f"operand_descriptor={self.operand_descriptor!r}, quantization_options={self.quantization_options!r})"
        )


def _native_desc(
    count: int,
    dtype: DataType,
    op: ReduceOp,
    tag: int,
    operand: Optional[ReduceOperandDescriptor],
    quant: Optional[QuantizationOptions],
) -> Tuple[int, int, int, int, int, int, int]:
    hint = DistributionHint.NONE
    if operand is not None:
        if not isinstance(operand, ReduceOperandDescriptor):
            raise TypeError("operand_descriptor must be a pccl.ReduceOperandDescriptor or None")
        if operand.datatype != dtype:
            raise MismatchedBuffersError(
                f"operand_descriptor.datatype is {operand.datatype.name} but the buffers hold {dtype.name}"
            )
        hint = operand.distribution_hint
    if quant is None:
        qdtype, qalgo = dtype, QuantizationAlgorithm.NONE
    elif isinstance(quant, QuantizationOptions):
        qdtype, qalgo = quant.quantized_datatype, quant.algorithm
    else:
        raise TypeError("quantization_options must be a pccl.QuantizationOptions or None")
    return (count, int(dtype), int(op), tag, int(hint), int(qdtype), int(qalgo))


def _pair(send: Any, recv: Any) -> Tuple[Buffer, Buffer]:
    s = describe(send, "send")
    r = describe(recv, "recv", writable=True)
    if s.dtype != r.dtype:
        raise MismatchedBuffersError(f"send and recv must have the same dtype, got {s.dtype.name} and {r.dtype.name}")
    if s.count != r.count:
        raise InvalidBufferError(f"send and recv must have the same number of elements, got {s.count} and {r.count}")
    return s, r


class ReduceOpDescriptor:
    """One all-reduce of :meth:`Communicator.all_reduce_multiple_with_retry`.

    Build it with :meth:`from_torch` / :meth:`from_numpy`, which keep the
    tensors alive. The raw constructor takes addresses (PCCL 1.0): the
    caller must keep that memory alive and unmoved until the call returns.
    """

    def __init__(self, sendbuf_ptr: int, recvbuf_ptr: int, reduce_descriptor: ReduceDescriptor) -> None:
        if not isinstance(reduce_descriptor, ReduceDescriptor):
            raise TypeError("reduce_descriptor must be a pccl.ReduceDescriptor")
        self.sendbuf_ptr = _int_arg("sendbuf_ptr", sendbuf_ptr, 1, _U64_MAX)
        self.recvbuf_ptr = _int_arg("recvbuf_ptr", recvbuf_ptr, 1, _U64_MAX)
        self.reduce_descriptor = reduce_descriptor
        self._keep: Tuple[Any, ...] = ()
        self._dtype: Optional[DataType] = None

    @classmethod
    def _from_buffers(cls, send: Any, recv: Any, reduce_descriptor: ReduceDescriptor) -> "ReduceOpDescriptor":
        if not isinstance(reduce_descriptor, ReduceDescriptor):
            raise TypeError("reduce_descriptor must be a pccl.ReduceDescriptor")
        s, r = _pair(send, recv)
        if reduce_descriptor.count > s.count:
            raise InvalidBufferError(
                f"reduce_descriptor.count is {reduce_descriptor.count} but the buffers hold {s.count} elements"
            )
        od = reduce_descriptor.operand_descriptor
        if od is not None and od.datatype != s.dtype:
            raise MismatchedBuffersError(
                f"reduce_descriptor's operand datatype is {od.datatype.name} but the buffers hold {s.dtype.name}"
            )
        d = cls(s.ptr, r.ptr, reduce_descriptor)
        d._keep = (s.obj, r.obj)
        d._dtype = s.dtype
        return d

    @staticmethod
    def from_torch(send: Any, recv: Any, reduce_descriptor: ReduceDescriptor) -> "ReduceOpDescriptor":
        """Describes an all-reduce of two contiguous CPU tensors (``send is recv`` for in place)."""
        if not (is_torch_tensor(send) and is_torch_tensor(recv)):
            raise UnsupportedTypeError("from_torch expects two torch.Tensor objects")
        return ReduceOpDescriptor._from_buffers(send, recv, reduce_descriptor)

    @staticmethod
    def from_numpy(send: Any, recv: Any, reduce_descriptor: ReduceDescriptor) -> "ReduceOpDescriptor":
        """Describes an all-reduce of two C-contiguous arrays (``send is recv`` for in place)."""
        if not (is_numpy_array(send) and is_numpy_array(recv)):
            raise UnsupportedTypeError("from_numpy expects two numpy.ndarray objects")
        return ReduceOpDescriptor._from_buffers(send, recv, reduce_descriptor)

    def _native(self) -> Tuple[int, int, Tuple[int, int, int, int, int, int, int]]:
        d = self.reduce_descriptor
        dtype = self._dtype
        if dtype is None:
            if d.operand_descriptor is None:
                raise ValueError("a ReduceOpDescriptor built from raw pointers needs an operand_descriptor")
            dtype = d.operand_descriptor.datatype
        return (
            self.sendbuf_ptr,
            self.recvbuf_ptr,
            _native_desc(d.count, dtype, d.op, d.tag, d.operand_descriptor, d.quantization_options),
        )


# ---------------------------------------------------------------------------
# Shared state
# ---------------------------------------------------------------------------


class TensorInfo:
    """One named tensor of a :class:`SharedState`.

    Build it with :meth:`from_torch` / :meth:`from_numpy` (which keep the
    tensor alive). The raw constructor (PCCL 1.0) takes an address: the
    caller keeps that memory alive and unmoved.
    """

    def __init__(
        self,
        name: str,
        data_ptr: int,
        *,
        numel: int,
        dtype: DataType,
        device_type: DeviceType = DeviceType.CPU,
        allow_content_inequality: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty str")
        if not data_ptr:
            raise ValueError("Invalid data pointer: nullptr")
        self.name = name
        self.data_ptr = _int_arg("data_ptr", data_ptr, 1, _U64_MAX)
        self.numel = _int_arg("numel", numel, 1, _U64_MAX)
        self.dtype = _enum_arg(DataType, "dtype", dtype)
        self.device_type = _enum_arg(DeviceType, "device_type", device_type)
        self.allow_content_inequality = bool(allow_content_inequality)
        self._owner: Any = None

    @classmethod
    def _from_buffer(cls, obj: Any, name: str, allow_content_inequality: bool) -> "TensorInfo":
        b = describe(obj, f"tensor {name!r}", writable=True)
        info = cls(
            name,
            b.ptr,
            numel=b.count,
            dtype=b.dtype,
            device_type=b.device,
            allow_content_inequality=allow_content_inequality,
        )
        info._owner = obj
        return info

    @classmethod
    def from_torch(cls, tensor: Any, name: str, *, allow_content_inequality: bool = False) -> "TensorInfo":
        """A contiguous CPU tensor, used in place (a sync may overwrite it)."""
        if not is_torch_tensor(tensor):
            raise UnsupportedTypeError(f"from_torch expects a torch.Tensor, got {type(tensor).__name__}")
        return cls._from_buffer(tensor, name, allow_content_inequality)

    @classmethod
    def from_numpy(cls, tensor: Any, name: str, *, allow_content_inequality: bool = False) -> "TensorInfo":
        """A C-contiguous, writable array, used in place (a sync may overwrite it)."""
        if not is_numpy_array(tensor):
            raise UnsupportedTypeError(f"from_numpy expects a numpy.ndarray, got {type(tensor).__name__}")
        return cls._from_buffer(tensor, name, allow_content_inequality)

    def __repr__(self) -> str:
        return (
            f"TensorInfo(name={self.name!r}, numel={self.numel}, dtype={self.dtype.name}, "
            f"device_type={self.device_type.name}, allow_content_inequality={self.allow_content_inequality})"
        )


class SharedState:
    """Named tensors plus a revision counter, kept bit-identical across a peer group.

    The revision must advance by exactly one between syncs
    (``shared_state.revision += 1`` after each optimizer step); a newcomer's
    first sync adopts the group's revision.
    """

    def __init__(self, tensor_infos: Iterable[TensorInfo]) -> None:
        infos = list(tensor_infos)
        if not infos:
            raise ValueError("At least one tensor info must be provided")
        names = set()
        for info in infos:
            if not isinstance(info, TensorInfo):
                raise TypeError(f"expected pccl.TensorInfo entries, got {type(info).__name__}")
            if info.name in names:
                raise ValueError(f"duplicate tensor name {info.name!r}")
            names.add(info.name)
        self._infos = infos
        self._revision = 0

    @property
    def revision(self) -> int:
        return self._revision

    @revision.setter
    def revision(self, value: int) -> None:
        self._revision = _int_arg("revision", value, 0, _U64_MAX)

    def push_revision(self) -> None:
        """``revision += 1``."""
        self.revision = self._revision + 1

    @property
    def tensor_infos(self) -> Sequence[TensorInfo]:
        return tuple(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"SharedState(revision={self._revision}, tensors={[i.name for i in self._infos]})"


# ---------------------------------------------------------------------------
# Async handle
# ---------------------------------------------------------------------------


class AsyncReduceHandle:
    """An all-reduce in flight, from :meth:`Communicator.all_reduce_async`.

    The tensors stay referenced until the operation is over, even if the
    handle is dropped without :meth:`wait`.
    """

    def __init__(self, handle: Any) -> None:
        self._native = handle
        self._info: Optional[Tuple[bool, Result, ReduceInfo]] = None
        self._error: Optional[PCCLError] = None

    @property
    def tag(self) -> int:
        return int(self._native.tag)

    def is_finished(self) -> bool:
        """Whether :meth:`wait` would return at once."""
        return bool(self._native.is_finished())

    def wait(self) -> Tuple[bool, Result, ReduceInfo]:
        """Blocks (without the GIL) until the operation is over and returns
        ``(is_success, status, ReduceInfo)``; ``status`` is a :class:`Result`.
        Later calls return the same tuple. Ctrl-C raises ``KeyboardInterrupt``
        and leaves the handle waitable."""
        if self._info is None:
            ok, code, world, tx, rx, message, _rank, _algorithm = self._native.wait()
            status = Result(code) if code in Result._value2member_map_ else Result.INTERNAL_ERROR
            if not ok:
                self._error = PCCLError(status, "pcclAwaitAsyncReduce", message)
            self._info = (bool(ok), status, ReduceInfo(world, tx, rx))
        return self._info

    @property
    def error(self) -> Optional[PCCLError]:
        """The failure as a :class:`PCCLError` once :meth:`wait` returned unsuccessfully."""
        return self._error

    def __repr__(self) -> str:
        state = "done" if self._info is not None else ("finished" if self.is_finished() else "in flight")
        return f"<AsyncReduceHandle tag={self.tag} {state}>"


class AsyncCollectiveHandle:
    """A broadcast, all-gather or reduce-scatter in flight, from
    :meth:`Communicator.broadcast_async`, :meth:`~Communicator.all_gather_async`
    or :meth:`~Communicator.reduce_scatter_async` (extension). Same
    conventions as :class:`AsyncReduceHandle`; :meth:`wait` reports a
    :class:`CollectiveInfo`.

    The buffers stay referenced until the operation is over, even if the
    handle is dropped without :meth:`wait`; the tag stays taken until then.
    """

    def __init__(self, handle: Any, func: str) -> None:
        self._native = handle
        self._func = func
        self._info: Optional[Tuple[bool, Result, CollectiveInfo]] = None
        self._error: Optional[PCCLError] = None

    @property
    def tag(self) -> int:
        return int(self._native.tag)

    def is_finished(self) -> bool:
        """Whether :meth:`wait` would return at once."""
        return bool(self._native.is_finished())

    def wait(self) -> Tuple[bool, Result, CollectiveInfo]:
        """Blocks (without the GIL) until the operation is over and returns
        ``(is_success, status, CollectiveInfo)``; ``status`` is a
        :class:`Result` (the info is all zeros on failure). Later calls
        return the same tuple. Ctrl-C raises ``KeyboardInterrupt`` and leaves
        the handle waitable."""
        if self._info is None:
            ok, code, world, tx, rx, message, rank, algorithm = self._native.wait()
            status = Result(code) if code in Result._value2member_map_ else Result.INTERNAL_ERROR
            if not ok:
                self._error = PCCLError(status, self._func, message)
            self._info = (bool(ok), status, CollectiveInfo(world, rank, tx, rx, algorithm or "ring"))
        return self._info

    @property
    def error(self) -> Optional[PCCLError]:
        """The failure as a :class:`PCCLError` once :meth:`wait` returned unsuccessfully."""
        return self._error

    def __repr__(self) -> str:
        state = "done" if self._info is not None else ("finished" if self.is_finished() else "in flight")
        return f"<AsyncCollectiveHandle {self._func} tag={self.tag} {state}>"


# ---------------------------------------------------------------------------
# Communicator
# ---------------------------------------------------------------------------

_BROADCAST, _ALL_GATHER, _REDUCE_SCATTER = 1, 2, 3


def _port_defaults() -> Tuple[int, int, int]:
    base = os.environ.get("PCCL_PEER_PORT_BASE")
    if base is None or base.strip() == "":
        return (_native.DEFAULT_SHARED_STATE_PORT, _native.DEFAULT_P2P_PORT, _native.DEFAULT_BENCHMARK_PORT)
    try:
        b = int(base)
    except ValueError:
        raise ValueError(f"PCCL_PEER_PORT_BASE must be an integer, got {base!r}") from None
    if b == 0:
        return (0, 0, 0)
    if not 1 <= b <= 65533:
        raise ValueError(f"PCCL_PEER_PORT_BASE must be 0 or in [1, 65533], got {b}")
    return (b, b + 1, b + 2)


class SyncProgress:
    """Progress of a shared-state fetch, passed to ``on_sync_progress``
    (extension). ``received_bytes`` of ``total_bytes`` arrived after
    ``elapsed_s`` seconds; ``done`` is true in the last report, once every
    byte has arrived (the tensors are then verified by hash)."""

    __slots__ = ("received_bytes", "total_bytes", "elapsed_s", "done")

    def __init__(self, received_bytes: int, total_bytes: int, elapsed_s: float, done: bool) -> None:
        self.received_bytes = received_bytes
        self.total_bytes = total_bytes
        self.elapsed_s = elapsed_s
        self.done = done

    @property
    def bytes_per_sec(self) -> float:
        """Average rate since the fetch started."""
        return self.received_bytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> Optional[float]:
        """Seconds left at the average rate so far (``None`` before any byte came)."""
        rate = self.bytes_per_sec
        if rate <= 0:
            return None
        return max(self.total_bytes - self.received_bytes, 0) / rate

    def __repr__(self) -> str:
        return (
            f"SyncProgress(received_bytes={self.received_bytes}, total_bytes={self.total_bytes}, "
            f"elapsed_s={self.elapsed_s:.3f}, done={self.done})"
        )


def _progress_adapter(callback: Any) -> Any:
    if callback is None:
        return None
    if not callable(callback):
        raise TypeError(f"on_sync_progress must be callable, got {type(callback).__name__}")

    def call(received: int, total: int, elapsed_s: float, done: bool) -> None:
        callback(SyncProgress(received, total, elapsed_s, done))

    return call


class Communicator:
    """A peer of the swarm.

    ``address`` is the master's ``"ip:port"`` (``"host:port"`` and
    ``"[v6]:port"`` work too). Peers of the same ``peer_group`` reduce and
    sync together. ``p2p_connection_pool_size`` is the number of TCP
    connections per ring neighbour (0 means 1).

    Extensions (keyword-only): ``shared_state_port``, ``p2p_port``,
    ``benchmark_port`` are the first ports tried for this peer's listeners
    (0 = any free port; by default 48149/48150/48151, or taken from the
    ``PCCL_PEER_PORT_BASE`` environment variable: 0 for any free port, N for
    N, N+1, N+2); ``advertised_ip`` is the address other peers should dial
    (behind NAT); ``on_sync_progress`` is called with a :class:`SyncProgress`
    every ``progress_interval_s`` seconds (default 3) during a shared-state
    fetch and once when its bytes have all arrived, from a library thread
    (an exception it raises is printed and ignored). The same interval paces
    the progress lines logged at the default level while ``connect()`` waits
    for admission and while a long fetch runs.

    Every blocking method releases the GIL; Ctrl-C raises
    ``KeyboardInterrupt`` within a fraction of a second and closes the
    communicator (it leaves the swarm once the interrupted call is over).
    """

    def __init__(
        self,
        address: str,
        peer_group: int = 0,
        p2p_connection_pool_size: int = 0,
        *,
        shared_state_port: Optional[int] = None,
        p2p_port: Optional[int] = None,
        benchmark_port: Optional[int] = None,
        advertised_ip: Optional[str] = None,
        on_sync_progress: Optional[Any] = None,
        progress_interval_s: Optional[float] = None,
    ) -> None:
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"Invalid address: {address!r}, expected format: ip:port")
        ss, p2p, bench = _port_defaults()
        self._native = _native.NativeCommunicator(
            address,
            _int_arg("peer_group", peer_group, 0, 0xFFFFFFFF),
            _int_arg("p2p_connection_pool_size", p2p_connection_pool_size, 0, 0xFFFFFFFF),
            _int_arg("shared_state_port", ss if shared_state_port is None else shared_state_port, 0, 65535),
            _int_arg("p2p_port", p2p if p2p_port is None else p2p_port, 0, 65535),
            _int_arg("benchmark_port", bench if benchmark_port is None else benchmark_port, 0, 65535),
            advertised_ip,
            _progress_adapter(on_sync_progress),
            None if progress_interval_s is None else float(progress_interval_s),
        )
        self.address = address
        self.peer_group = peer_group

    # -- membership -----------------------------------------------------------

    def connect(self, n_attempts: int = 5) -> None:
        """Registers with the master and blocks until the accepted peers admit
        this one (at once for the first peer; otherwise when all of them call
        :meth:`update_topology`). Retries up to ``n_attempts`` times, one
        second apart, and raises the last :class:`PCCLError` if all fail."""
        n_attempts = _int_arg("n_attempts", n_attempts, 1, 1 << 31)
        last: Optional[PCCLError] = None
        for attempt in range(1, n_attempts + 1):
            try:
                self._native.connect()
                _log.info("connected to the master at %s", self.address)
                return
            except PCCLError as e:
                if e.result == Result.INVALID_USAGE:
                    raise
                last = e
                _log.warning("failed to connect to the master (attempt %d/%d): %s", attempt, n_attempts, e)
                if attempt < n_attempts:
                    time.sleep(1)
        assert last is not None
        raise last

    def update_topology(self) -> None:
        """Admits pending peers (collective: every accepted peer calls it) and
        returns when the ring connections are up. ``PENDING_ASYNC_OPS`` while
        async all-reduces are not awaited."""
        self._native.update_topology()

    def are_peers_pending(self) -> bool:
        """Whether peers wait to be admitted (collective; all get the same answer).
        The usual loop: ``if comm.are_peers_pending(): comm.update_topology()``."""
        return bool(self._native.are_peers_pending())

    def optimize_topology(self) -> None:
        """Collective call that may reorder the ring for bandwidth. Raises
        :class:`PCCLError` with ``INVALID_USAGE`` when not connected or when
        fewer than two peers are in the run, and ``PENDING_ASYNC_OPS`` while
        async all-reduces are not awaited (as ``pcclOptimizeTopology``)."""
        self._native.optimize_topology()

    def get_attribute(self, attribute: Attribute) -> int:
        """One of the :class:`Attribute` values, as of the latest master update."""
        return int(self._native.get_attribute(int(_enum_arg(Attribute, "attribute", attribute))))

    def current_world_size(self) -> int:
        """The accepted peers of this peer's group (``Attribute.LOCAL_WORLD_SIZE``;
        the name before PCCL 1.0 had peer groups)."""
        return self.get_attribute(Attribute.LOCAL_WORLD_SIZE)

    @property
    def peer_id(self) -> Optional[str]:
        """This peer's id as assigned by the master (hex), ``None`` before :meth:`connect`."""
        return self._native.peer_id

    # -- shared state ---------------------------------------------------------

    def sync_shared_state(
        self,
        shared_state: SharedState,
        strategy: SharedStateSyncStrategy = SharedStateSyncStrategy.ENFORCE_POPULAR,
    ) -> SharedStateSyncInfo:
        """Synchronizes ``shared_state`` with the group (collective). Tensors
        that differ from the popular content are overwritten in place, and
        ``shared_state.revision`` becomes the group's."""
        if not isinstance(shared_state, SharedState):
            raise TypeError("shared_state must be a pccl.SharedState")
        strategy = _enum_arg(SharedStateSyncStrategy, "strategy", strategy)
        infos = shared_state._infos
        tensors = [
            (i.name, i.data_ptr, i.numel, int(i.dtype), int(i.device_type), i.allow_content_inequality)
            for i in infos
        ]
        keep = tuple(i._owner for i in infos)
        revision, tx, rx = self._native.sync_shared_state(tensors, shared_state.revision, int(strategy), keep)
        shared_state._revision = int(revision)
        return SharedStateSyncInfo(tx, rx)

    # -- all-reduce -----------------------------------------------------------

    def _prepare(
        self,
        send: Any,
        recv: Any,
        op: ReduceOp,
        tag: int,
        operand_descriptor: Optional[ReduceOperandDescriptor],
        quantization_options: Optional[QuantizationOptions],
    ) -> Tuple[int, int, Tuple[int, int, int, int, int, int, int], Tuple[Any, Any]]:
        op = _enum_arg(ReduceOp, "op", op)
        tag = _int_arg("tag", tag, 0, _U64_MAX)
        s, r = _pair(send, recv)
        desc = _native_desc(s.count, s.dtype, op, tag, operand_descriptor, quantization_options)
        return s.ptr, r.ptr, desc, (s.obj, r.obj)

    def all_reduce(
        self,
        send: Any,
        recv: Any,
        *,
        op: ReduceOp,
        tag: int = 0,
        operand_descriptor: Optional[ReduceOperandDescriptor] = None,
        quantization_options: Optional[QuantizationOptions] = None,
    ) -> ReduceInfo:
        """All-reduces ``send`` into ``recv`` (pass the same object for in
        place) across the group; NumPy arrays and PyTorch CPU tensors, used
        without copies. Raises :class:`PCCLError` on failure (an in-place
        buffer is then restored)."""
        sp, rp, desc, keep = self._prepare(send, recv, op, tag, operand_descriptor, quantization_options)
        world, tx, rx = self._native.all_reduce(sp, rp, desc, keep)
        return ReduceInfo(world, tx, rx)

    def all_reduce_async(
        self,
        send: Any,
        recv: Any,
        *,
        op: ReduceOp,
        tag: int = 0,
        operand_descriptor: Optional[ReduceOperandDescriptor] = None,
        quantization_options: Optional[QuantizationOptions] = None,
        numel: Optional[int] = None,
    ) -> AsyncReduceHandle:
        """Starts an all-reduce and returns at once. Several may be in flight
        with distinct tags; do not touch the buffers until the handle's
        :meth:`~AsyncReduceHandle.wait` returned. (``numel`` is accepted for
        early PCCL 1.0 code and must equal the element count.)

        Every error the start can detect is raised here, as by
        ``pcclAllReduceAsync``: bad buffers or descriptors, ``PCCLError``
        with ``INVALID_USAGE`` (not connected or closed), ``INVALID_ARGUMENT``
        (overlapping buffers, or ``tag`` still used by an async operation not
        awaited) and ``TOO_FEW_PEERS`` (alone in the peer group). Failures
        during the operation are reported by ``wait()``."""
        sp, rp, desc, keep = self._prepare(send, recv, op, tag, operand_descriptor, quantization_options)
        if numel is not None and numel != desc[0]:
            raise ValueError(f"numel={numel} does not match the buffers' {desc[0]} elements")
        return AsyncReduceHandle(self._native.all_reduce_async(sp, rp, desc, keep))

    def all_reduce_multiple_with_retry(
        self, descriptors: Sequence[ReduceOpDescriptor], *, max_in_flight: int = 4
    ) -> ReduceInfo:
        """Runs many all-reduces, at most ``max_in_flight`` at once, retrying
        those that fail because a peer left, until all succeed or fewer than
        two peers remain (``Result.TOO_FEW_PEERS``). Tags must be distinct.
        Returns the summed traffic and the world size of the last attempt."""
        max_in_flight = _int_arg("max_in_flight", max_in_flight, 1, 1 << 31)
        ops = []
        keep = []
        for d in descriptors:
            if not isinstance(d, ReduceOpDescriptor):
                raise TypeError(f"expected pccl.ReduceOpDescriptor entries, got {type(d).__name__}")
            ops.append(d._native())
            keep.extend(d._keep)
        world, tx, rx = self._native.all_reduce_multiple_with_retry(ops, max_in_flight, tuple(keep))
        return ReduceInfo(world, tx, rx)

    # -- broadcast, all-gather, reduce-scatter (extensions) ----------------------

    def _group_world(self) -> int:
        return int(self._native.get_attribute(int(Attribute.LOCAL_WORLD_SIZE)))

    def _prepare_collective(
        self,
        kind: int,
        send: Any,
        recv: Any,
        op: ReduceOp,
        tag: int,
        quantization_options: Optional[QuantizationOptions],
    ) -> Tuple[int, int, int, int, Tuple[int, int, int, int, int, int, int], Tuple[Any, ...]]:
        """Checks the buffers; returns ``(send ptr, send count, recv ptr,
        recv count, descriptor, keep)``. Counts that do not fit the peer
        group's current size raise :class:`InvalidBufferError` (the native
        layer checks them again when the operation starts)."""
        tag = _int_arg("tag", tag, 0, _U64_MAX)
        if kind == _BROADCAST:
            b = describe(send, "buf", writable=True)
            desc = _native_desc(b.count, b.dtype, ReduceOp.SUM, tag, None, None)
            return b.ptr, b.count, b.ptr, b.count, desc, (b.obj,)
        s = describe(send, "send")
        r = describe(recv, "recv", writable=True)
        if s.dtype != r.dtype:
            raise MismatchedBuffersError(
                f"send and recv must have the same dtype, got {s.dtype.name} and {r.dtype.name}"
            )
        world = self._group_world()
        if kind == _ALL_GATHER:
            count = s.count
            if world >= 2 and r.count != count * world:
                raise InvalidBufferError(
                    f"all_gather of {count} elements per peer over {world} peers needs a recv buffer of "
                    f"{count * world} elements, got {r.count}"
                )
            desc = _native_desc(count, s.dtype, ReduceOp.SUM, tag, None, None)
        else:
            op = _enum_arg(ReduceOp, "op", op)
            count = r.count
            if world >= 2 and s.count != count * world:
                raise InvalidBufferError(
                    f"reduce_scatter to {count} elements per peer over {world} peers needs a send buffer of "
                    f"{count * world} elements, got {s.count}"
                )
            desc = _native_desc(count, s.dtype, op, tag, None, quantization_options)
        return s.ptr, s.count, r.ptr, r.count, desc, (s.obj, r.obj)

    def broadcast(self, buf: Any, *, root: int, tag: int = 0) -> CollectiveInfo:
        """Extension. Collective: every peer's ``buf`` (a writable NumPy
        array or CPU tensor, same dtype and size everywhere) ends with the
        bytes of the ``buf`` of the peer whose rank is ``root`` (ranks:
        :class:`CollectiveInfo`). The root's buffer is only read; after a
        failure the other peers' buffers are partly written. Raises
        :class:`PCCLError` (``INVALID_ARGUMENT`` for ``root`` >= the group's
        size or a tag in use by an async operation, ``TOO_FEW_PEERS`` alone,
        ``RANK_CONNECTION_LOST`` when a peer is lost during the operation)."""
        root = _int_arg("root", root, 0, (1 << 32) - 1)
        sp, sc, rp, rc, desc, keep = self._prepare_collective(_BROADCAST, buf, None, ReduceOp.SUM, tag, None)
        return CollectiveInfo(*self._native.collective(_BROADCAST, sp, sc, rp, rc, desc, root, keep))

    def broadcast_async(self, buf: Any, *, root: int, tag: int = 0) -> AsyncCollectiveHandle:
        """Extension. Starts :meth:`broadcast` and returns at once; errors the
        start can detect are raised here, failures of the operation are
        reported by ``wait()``. Do not touch ``buf`` until then."""
        root = _int_arg("root", root, 0, (1 << 32) - 1)
        sp, sc, rp, rc, desc, keep = self._prepare_collective(_BROADCAST, buf, None, ReduceOp.SUM, tag, None)
        native = self._native.collective_async(_BROADCAST, sp, sc, rp, rc, desc, root, keep)
        return AsyncCollectiveHandle(native, "pcclBroadcastAsync")

    def all_gather(self, send: Any, recv: Any, *, tag: int = 0) -> CollectiveInfo:
        """Extension. Collective: ``recv`` (world × ``send``'s element count,
        same dtype, must not overlap ``send``) ends with every peer's ``send``
        in rank order, the same bytes on every peer. ``send`` is only read.
        ``recv`` is filled as a flat buffer whatever its shape. Raises as
        :meth:`broadcast`; a ``recv`` of the wrong size for the group's
        current size raises :class:`InvalidBufferError`."""
        sp, sc, rp, rc, desc, keep = self._prepare_collective(_ALL_GATHER, send, recv, ReduceOp.SUM, tag, None)
        return CollectiveInfo(*self._native.collective(_ALL_GATHER, sp, sc, rp, rc, desc, 0, keep))

    def all_gather_async(self, send: Any, recv: Any, *, tag: int = 0) -> AsyncCollectiveHandle:
        """Extension. Starts :meth:`all_gather` and returns at once."""
        sp, sc, rp, rc, desc, keep = self._prepare_collective(_ALL_GATHER, send, recv, ReduceOp.SUM, tag, None)
        native = self._native.collective_async(_ALL_GATHER, sp, sc, rp, rc, desc, 0, keep)
        return AsyncCollectiveHandle(native, "pcclAllGatherAsync")

    def reduce_scatter(
        self,
        send: Any,
        recv: Any,
        *,
        op: ReduceOp,
        tag: int = 0,
        quantization_options: Optional[QuantizationOptions] = None,
    ) -> CollectiveInfo:
        """Extension. Collective: the peers' ``send`` buffers (world ×
        ``recv``'s element count each) are reduced element-wise with ``op``,
        and ``recv`` ends with this peer's rank's segment: elements
        ``rank * n ... (rank + 1) * n - 1`` of the reduction, ``n`` being
        ``recv``'s count. ``quantization_options`` work as for
        :meth:`all_reduce`. Raises as :meth:`all_gather`."""
        sp, sc, rp, rc, desc, keep = self._prepare_collective(
            _REDUCE_SCATTER, send, recv, op, tag, quantization_options
        )
        return CollectiveInfo(*self._native.collective(_REDUCE_SCATTER, sp, sc, rp, rc, desc, 0, keep))

    def reduce_scatter_async(
        self,
        send: Any,
        recv: Any,
        *,
        op: ReduceOp,
        tag: int = 0,
        quantization_options: Optional[QuantizationOptions] = None,
    ) -> AsyncCollectiveHandle:
        """Extension. Starts :meth:`reduce_scatter` and returns at once."""
        sp, sc, rp, rc, desc, keep = self._prepare_collective(
            _REDUCE_SCATTER, send, recv, op, tag, quantization_options
        )
        native = self._native.collective_async(_REDUCE_SCATTER, sp, sc, rp, rc, desc, 0, keep)
        return AsyncCollectiveHandle(native, "pcclReduceScatterAsync")

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Leaves the swarm gracefully; the other peers go on without this one.
        Later calls raise :class:`PCCLError` (``INVALID_USAGE``)."""
        self._native.close()

    @property
    def closed(self) -> bool:
        return bool(self._native.closed)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else (f"peer {self.peer_id}" if self.peer_id else "not connected")
        return f"<pccl.Communicator master={self.address} group={self.peer_group} {state}>"


# ---------------------------------------------------------------------------
# Master
# ---------------------------------------------------------------------------

# Native masters that were started with run() and have been neither
# interrupted nor closed, by id. Holding them here keeps a master serving
# after its MasterNode was dropped, as PCCL 1.0's did (its __del__ blocked in
# pcclMasterAwaitTermination); at interpreter exit _serve_until_signalled()
# waits for SIGINT/SIGTERM before stopping them.
_SERVING: Dict[int, Any] = {}
_SERVING_LOCK = threading.Lock()
_AT_EXIT_REGISTERED = False


def _still_serving(native: Any) -> None:
    global _AT_EXIT_REGISTERED
    with _SERVING_LOCK:
        _SERVING[id(native)] = native
        if not _AT_EXIT_REGISTERED:
            atexit.register(_serve_until_signalled)
            _AT_EXIT_REGISTERED = True


def _done_serving(native: Any) -> None:
    with _SERVING_LOCK:
        _SERVING.pop(id(native), None)


def _stop_all(masters: List[Any]) -> None:
    for m in masters:
        _done_serving(m)
        try:
            m.interrupt()
        except PCCLError:
            pass  # already closed
        m.close()


def _serve_until_signalled() -> None:
    """At interpreter exit: masters still serving keep serving until SIGINT
    (Ctrl-C) or SIGTERM, then stop cleanly and the process exits normally."""
    with _SERVING_LOCK:
        masters = list(_SERVING.values())
    if not masters:
        return
    # A script ended by Ctrl-C already got its signal: stop without waiting
    # for a second one.
    if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
        _stop_all(masters)
        return
    addresses = ", ".join(str(m.local_addr) for m in masters)
    print(
        f"pccl: the master on {addresses} keeps serving after the script ended; "
        "send SIGINT (Ctrl-C) or SIGTERM to stop it (call MasterNode.interrupt() to stop without waiting)",
        file=sys.stderr,
        flush=True,
    )

    def _on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # pragma: no cover - not the main thread
            pass
    try:
        for m in masters:
            # Returns only once interrupted; Python signal handlers run meanwhile.
            m.await_termination()
    except KeyboardInterrupt:
        _log.info("signal received; stopping the master")
    except PCCLError as e:  # pragma: no cover - a master that failed on its own
        print(f"pccl: master stopped with {e}", file=sys.stderr, flush=True)
    finally:
        _stop_all(masters)
        for sig, handler in previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):  # pragma: no cover
                pass


class MasterNode:
    """An embedded master (coordinator).

    ``listen_address`` is ``"ip:port"``; port 0 picks a free port (read it
    back from :attr:`port` / :attr:`listen_address`). The socket is bound at
    construction, so a taken port fails here. ``peer_timeout_ms``
    (extension) evicts a peer silent for that long.

    **Lifetime, as PCCL 1.0's:** once :meth:`run` was called, the master
    serves until it is stopped. A master that is still serving when its
    ``MasterNode`` is dropped keeps serving in the background, and when the
    interpreter exits (the script ended) the process waits, serving, until it
    receives SIGINT (Ctrl-C) or SIGTERM; it then stops the master and exits
    normally. So the two-line PCCL 1.0 master script
    ``master = pccl.MasterNode(...); master.run()`` serves until interrupted.
    (A script ended *by* Ctrl-C stops its masters without waiting again.)

    To stop without waiting (the non-blocking path): call :meth:`interrupt`
    (returns at once) or :meth:`close`, or use the master as a context
    manager (``with pccl.MasterNode(...) as m:``, which closes it); a master
    stopped so is not waited for at exit.
    """

    def __init__(self, listen_address: str = "0.0.0.0:48148", *, peer_timeout_ms: Optional[int] = None) -> None:
        if not isinstance(listen_address, str) or ":" not in listen_address:
            raise ValueError(f"Invalid listen address: {listen_address!r}, expected format: ip:port")
        if peer_timeout_ms is not None:
            peer_timeout_ms = _int_arg("peer_timeout_ms", peer_timeout_ms, 1, 1 << 40)
        self._native = _native.NativeMaster(listen_address, peer_timeout_ms)

    def run(self) -> None:
        """Starts serving in the background and returns at once. The master
        then serves until :meth:`interrupt`/:meth:`close`, or, at interpreter
        exit, until SIGINT/SIGTERM (see the class documentation)."""
        self._native.run()
        _still_serving(self._native)

    def interrupt(self) -> None:
        """Asks the master to stop; returns at once. A master interrupted so
        is not waited for at interpreter exit."""
        self._native.interrupt()
        _done_serving(self._native)

    def await_termination(self) -> None:
        """Blocks until :meth:`interrupt` was called and the master stopped
        (the GIL is released; Ctrl-C raises ``KeyboardInterrupt``)."""
        self._native.await_termination()
        _done_serving(self._native)

    def close(self) -> None:
        """Stops the master if running and frees the port; returns once it stopped."""
        _done_serving(self._native)
        self._native.close()

    @property
    def listen_address(self) -> str:
        """The address actually bound, ``"ip:port"``."""
        return str(self._native.local_addr)

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._native.port)

    def __enter__(self) -> "MasterNode":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<pccl.MasterNode {self.listen_address}{' closed' if self._native.closed else ''}>"
