"""Type stubs of the native module ``pccl._native`` (private; use the ``pccl`` package)."""

from typing import Any, Optional, Sequence, Tuple

DEFAULT_MASTER_PORT: int
DEFAULT_SHARED_STATE_PORT: int
DEFAULT_P2P_PORT: int
DEFAULT_BENCHMARK_PORT: int
HAS_CUDA_SUPPORT: bool
__version__: str

# (count, datatype, op, tag, distribution_hint, quantized_datatype, quantization_algorithm)
_Desc = Tuple[int, int, int, int, int, int, int]

def init_logging(level: Optional[str] = None) -> None: ...
def _orphan_count() -> int: ...

class NativeCommunicator:
    def __init__(
        self,
        master_addr: str,
        peer_group: int = 0,
        p2p_connection_pool_size: int = 0,
        shared_state_port: int = ...,
        p2p_port: int = ...,
        benchmark_port: int = ...,
        advertised_ip: Optional[str] = None,
    ) -> None: ...
    def connect(self) -> None: ...
    def update_topology(self) -> None: ...
    def are_peers_pending(self) -> bool: ...
    def optimize_topology(self) -> None: ...
    def get_attribute(self, attribute: int) -> int: ...
    def all_reduce(self, send: int, recv: int, desc: _Desc, keep: Any) -> Tuple[int, int, int]: ...
    def all_reduce_async(self, send: int, recv: int, desc: _Desc, keep: Any) -> NativeHandle: ...
    # kind: 1 broadcast, 2 all-gather, 3 reduce-scatter; returns
    # (world_size, rank, tx_bytes, rx_bytes, algorithm)
    def collective(
        self,
        kind: int,
        send: int,
        send_count: int,
        recv: int,
        recv_count: int,
        desc: _Desc,
        root: int,
        keep: Any,
    ) -> Tuple[int, int, int, int, str]: ...
    def collective_async(
        self,
        kind: int,
        send: int,
        send_count: int,
        recv: int,
        recv_count: int,
        desc: _Desc,
        root: int,
        keep: Any,
    ) -> NativeHandle: ...
    def all_reduce_multiple_with_retry(
        self, ops: Sequence[Tuple[int, int, _Desc]], max_in_flight: int, keep: Any
    ) -> Tuple[int, int, int]: ...
    def sync_shared_state(
        self,
        tensors: Sequence[Tuple[str, int, int, int, int, bool]],
        revision: int,
        strategy: int,
        keep: Any,
    ) -> Tuple[int, int, int]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def peer_id(self) -> Optional[str]: ...

class NativeHandle:
    @property
    def tag(self) -> int: ...
    def is_finished(self) -> bool: ...
    # (is_success, code, world_size, tx_bytes, rx_bytes, message, rank, algorithm)
    def wait(self) -> Tuple[bool, int, int, int, int, str, int, str]: ...

class NativeMaster:
    def __init__(self, listen_address: str, peer_timeout_ms: Optional[int] = None) -> None: ...
    def run(self) -> None: ...
    def interrupt(self) -> None: ...
    def await_termination(self) -> None: ...
    def close(self) -> None: ...
    @property
    def local_addr(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def closed(self) -> bool: ...
