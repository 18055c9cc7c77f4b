"""DiLoCo, async DiLoCo and streaming DiLoCo outer steps on top of the public ``pccl`` API.

DiLoCo trains with an *inner* optimizer locally for ``H`` steps, then
averages the *pseudo-gradients* (outer parameters minus local parameters)
across the peers with one all-reduce and applies an *outer* optimizer step
(SGD with Nesterov momentum by default) that is bit-identical on every peer.
Communication happens once every ``H`` inner steps instead of every step.

Usage (PyTorch CPU tensors; the :class:`pccl.Communicator` is connected by
the caller)::

    import pccl, pccl.diloco, torch

    comm = pccl.Communicator("10.0.0.1:48148")
    comm.connect()
    model = ...; opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d = pccl.diloco.DiLoCo(comm, model, opt, sync_every=50, mode="async")
    for batch in data:
        loss = model(batch).mean(); opt.zero_grad(); loss.backward(); opt.step()
        report = d.step()                 # None, or an OuterStepReport
    d.close()                             # waits for a reduce still in flight

or, hooking the inner optimizer (``d.step()`` then runs after every
``opt.step()``; the latest report is ``d.last_report``)::

    with pccl.diloco.DiLoCo(comm, model, opt, sync_every=50) as d:
        for batch in data:
            ...; opt.step()

Modes (``mode=``):

``"sync"``
    Every ``H`` inner steps: pseudo-gradient → all-reduce (average) → outer
    step → admit pending peers → shared-state sync → model := outer params.
``"async"``
    One-step-delayed outer updates with eager local steps: the all-reduce of
    the pseudo-gradient of event ``t`` runs in a background thread during the
    next ``H`` inner steps and is applied to the outer parameters at event
    ``t + 1``, so communication is hidden behind compute
    (``OuterStepReport.hidden_seconds``). Meanwhile each peer starts window
    ``t + 1`` from the outer parameters plus an outer step with its *own*
    pseudo-gradient (on a copy of the momentum), a stand-in for the average
    still in flight, and measures its next pseudo-gradient from there
    (Kale et al., "Eager updates for overlapped communication and
    computation in DiLoCo", 2025; as ``pccl_core::diloco``). The outer
    state only ever takes group averages, so it stays bit-identical. The
    background thread runs all of an event's traffic, in the order
    ``pccl_core::diloco`` does: the shared-state sync of the state just
    applied, the all-reduce, then the are-peers-pending vote, so no round
    trip blocks the training thread (the first event, and a peer alone,
    vote on the training thread). When the vote says a peer waits to join,
    the next event drains the pipeline instead (its pseudo-gradient is
    reduced synchronously and applied, the peers are admitted and synced;
    everyone then starts from the outer parameters), so the newcomer
    receives exactly the others' parameters. While a background thread
    runs, the training thread leaves the outer state alone:
    :meth:`~DiLoCo.state_hash` is only meaningful between events.
``"streaming"``
    The parameters are split into ``F`` fragments (contiguous runs of
    ``model.named_parameters()``, balanced by element count). Fragment ``f``
    is launched at inner steps ``s > 0`` with ``(s - f*H//F) % H == 0``; its
    all-reduce runs in the background and is applied ``tau`` inner steps
    later (``tau = 0``: at once), after which the model's fragment becomes
    ``lerp(local, outer, alpha)``. ``tau * F < H`` is required, so at most
    one fragment is in flight.

Protocol (shared with ``pccl_core::diloco``, so peers of both are meant to
form a group; no test runs a mixed group yet):

* **Shared state**, one tensor per model parameter ``name``:
  ``diloco.outer.<name>`` (float32 master copy of the outer parameters,
  also for bf16/f16 models) and ``diloco.momentum.<name>`` (float32), plus
  ``diloco.meta``, uint64[12] = [1 (format), mode (0 sync, 1 async,
  2 streaming), H, F, tau, alpha (f32 bits), outer_lr (f32 bits),
  outer_momentum (f32 bits), nesterov (0/1), quantization (0 none, else
  algorithm * 256 + quantized DataType value), inner_step, outer_step].
  After every sync, entries 0..9 must equal this peer's configuration, or
  :class:`ConfigMismatchError` names the differing field.
* **Revision** +1 per sync. A peer's first sync after connecting is
  ``RECEIVE_ONLY`` (a newcomer adopts the group's state and revision),
  falling back to ``ENFORCE_POPULAR`` on ``NO_SHARED_STATE_AVAILABLE``
  (founding peers); later syncs are ``ENFORCE_POPULAR``.
* **Construction** (also after a rejoin): the first sync, then the founding
  phase: while ``meta.inner_step == 0`` and the group has fewer than
  ``min_world`` peers, admit pending peers and sync (else sleep 50 ms); then
  the model is set to the outer parameters (cast to its dtype). A failed
  ``update_topology`` is logged and the sync that follows it still runs
  (it fails the same way on every peer).
  ``min_world`` must be the same on all founding peers.
* **Pseudo-gradient**: ``delta = f32(cast_model(outer)) - f32(local)``
  (async: ``start`` instead of ``outer``), relative to the value the model
  was last set to, so the rounding of a bf16/f16 model does not leak in. With ``error_feedback`` the residual of
  the previous event is added and the new residual is ``v - dequant(quant(v))``
  of this peer's contribution ``v`` (an emulation, see below).
* **All-reduce**: ``Communicator.all_reduce_multiple_with_retry`` over the
  pseudo-gradient tensors, ``ReduceOp.AVG``, tag = the parameter's index,
  ``max_in_flight=4``, quantized if configured. Lost peers are retried
  inside that call. Alone (``TOO_FEW_PEERS``), the average is this peer's own
  pseudo-gradient.
* **Outer step**, explicit float32 torch ops in a fixed order, no fused
  multiply-add: ``m = mu*m + g``; ``upd = g + mu*m`` (Nesterov) or ``m``;
  ``outer = outer - lr*upd``. ``outer_step`` +1 per applied all-reduce (in
  streaming mode, per applied fragment). An outer step is applied only after
  every tensor of it was reduced: never half-applied.

Guarantees: after every sync the outer parameters, momentum buffers and meta
are bit-identical on every peer of the group (shared-state sync elects and
repairs them), whatever churn happened; :meth:`DiLoCo.state_hash` lets tests
check it. The inner optimizer's state and the model's local parameters are
per peer, as in DiLoCo. So are the error-feedback residuals, by design: they
only change what a peer *contributes*, never the outer parameters.

Error feedback is an approximation: the residual emulates one round trip of
this peer's own contribution through the quantizer on 1024-element blocks
aligned at the tensor's start (``docs/quantization.md``), whereas the ring
quantizes partial sums on its own block boundaries.

Churn and rejoin: a peer killed during an all-reduce is retried around
inside ``all_reduce_multiple_with_retry``. When this peer cannot stay in step
with the group (the master connection is lost, a sync, ``are_peers_pending``
fails, an all-reduce fails for a reason other than
being alone), :class:`RejoinRequired` is raised with the cause; the helper
closes the communicator first (a peer that stayed admitted would stall the
group's next collective). To rejoin, a script creates a new
:class:`pccl.Communicator`, calls ``connect()`` and builds a new
:class:`DiLoCo` over the same model and inner optimizer::

    while d.inner_step < total_steps:
        ...; opt.step()
        try:
            d.step()
        except pccl.diloco.RejoinRequired:
            comm = pccl.Communicator(address); comm.connect()
            d = pccl.diloco.DiLoCo(comm, model, opt, **same_config, resume_from=d)

The new instance receives the group's outer parameters, momentum and step
counters by its first sync and overwrites the model with them.
``resume_from=`` (optional) seeds it with the old instance's outer state and
counters, which only matters when no group is left to receive from (every
peer rejoined, or the master restarted): the run then goes on from there
instead of starting over.

Ctrl-C: every blocking pccl call releases the GIL and is interruptible;
background all-reduce threads are waited for with a timeout loop, so
``KeyboardInterrupt`` arrives promptly. An interrupted outer event leaves
the instance unusable (its next :meth:`~DiLoCo.step` raises
:class:`RejoinRequired`) and closes the communicator, as pccl does for an
interrupted blocking call.

Limits: PyTorch CPU tensors only (CUDA models raise
:class:`pccl.InvalidBufferError`); floating-point parameters only; every peer
of a group must use the same model layout (names, shapes; a peer whose layout
differs gets :class:`LayoutMismatchError` and leaves) and the same
configuration.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import struct
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ._api import (
    Communicator,
    QuantizationOptions,
    ReduceDescriptor,
    ReduceOpDescriptor,
    SharedState,
    TensorInfo,
)
from ._enums import Attribute, DataType, QuantizationAlgorithm, ReduceOp, Result, SharedStateSyncStrategy
from ._errors import InvalidBufferError, PCCLError

__all__ = [
    "DiLoCo",
    "OuterStepReport",
    "RejoinRequired",
    "ConfigMismatchError",
    "LayoutMismatchError",
    "MODES",
    "META_FIELDS",
    "split_fragments",
    "quant_roundtrip",
]

MODES: Dict[str, int] = {"sync": 0, "async": 1, "streaming": 2}
"""Mode names and their code in ``diloco.meta[1]``."""

META_FORMAT = 1
META_LEN = 12
META_FIELDS: Tuple[str, ...] = (
    "format",
    "mode",
    "sync_every",
    "fragments",
    "fragment_sync_delay",
    "fragment_update_alpha",
    "outer_lr",
    "outer_momentum",
    "nesterov",
    "quantization",
    "inner_step",
    "outer_step",
)
"""The entries of ``diloco.meta``, in order. The first 10 are configuration
and must agree across the group; the last two are the step counters."""
_CONFIG_ENTRIES = 10
_INNER, _OUTER = 10, 11

_QUANT_TYPES = (DataType.UINT8, DataType.INT8, DataType.UINT16, DataType.INT16)
_QUANT_ALGOS = (QuantizationAlgorithm.MIN_MAX, QuantizationAlgorithm.ZERO_POINT_SCALE)
_QUANT_BLOCK = 1024  # QUANT_BLOCK_ELEMS of pccl_core::quant
_MAX_IN_FLIGHT = 4
_JOIN_POLL_S = 0.1
_FOUNDING_POLL_S = 0.05
_log = logging.getLogger("pccl")
_PREFIX_OUTER = "diloco.outer."
_PREFIX_MOMENTUM = "diloco.momentum."
_META_NAME = "diloco.meta"


class OuterStepReport(NamedTuple):
    """What one outer event did (returned by :meth:`DiLoCo.step`).

    ``outer_step``: the outer step count after the event. ``world``: peers
    that took part in the last all-reduce applied (1 when alone).
    ``tx_bytes`` / ``rx_bytes``: bytes this peer sent / received for the
    applied all-reduce(s) and the event's sync. ``comm_seconds``: time the
    event's communication took (the all-reduce, wherever it ran, plus the
    membership calls and the sync). ``exposed_seconds``: of that, the time
    the training loop was blocked (waiting for a background all-reduce,
    synchronous reduces, membership calls, the sync). ``hidden_seconds`` =
    ``comm_seconds - exposed_seconds`` (never negative): communication that
    overlapped inner steps (async and streaming modes)."""

    outer_step: int
    world: int
    tx_bytes: int
    rx_bytes: int
    comm_seconds: float
    exposed_seconds: float
    hidden_seconds: float


class RejoinRequired(PCCLError):
    """This peer can no longer stay in step with its group. The communicator
    has been closed (the peer left the group); ``cause`` is the original
    exception (usually a :class:`pccl.PCCLError`). To continue, create a new
    :class:`pccl.Communicator`, ``connect()`` it and build a new
    :class:`DiLoCo` over the same model and optimizer (see the module
    documentation)."""

    cause: Optional[BaseException]

    def __init__(self, cause: Optional[BaseException], what: str = "") -> None:
        result = cause.result if isinstance(cause, PCCLError) else Result.INTERNAL_ERROR
        text = f"{what}: {cause}" if what else str(cause)
        super().__init__(result, "pccl.diloco", f"rejoin required ({text})")
        self.cause = cause


class ConfigMismatchError(ValueError):
    """This peer's DiLoCo configuration differs from the group's (``field``
    names the first differing ``diloco.meta`` entry; ``mine`` and ``group``
    are the raw values). The communicator has been closed."""

    def __init__(self, field: str, mine: int, group: int, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.mine = mine
        self.group = group


class LayoutMismatchError(ValueError):
    """The model's parameters (names, shapes) do not match the group's
    shared state. The group's state is unchanged (this peer's first sync
    only receives); the communicator has been closed. ``cause`` is the
    :class:`pccl.PCCLError` of the sync."""

    def __init__(self, message: str, cause: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.cause = cause


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def _f32(x: float) -> float:
    """``x`` rounded to float32 (the value every peer computes with)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _quant_code(q: Optional[QuantizationOptions]) -> int:
    if q is None or q.algorithm == QuantizationAlgorithm.NONE:
        return 0
    return int(q.algorithm) * 256 + int(q.quantized_datatype)


def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"pccl.diloco: {name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"pccl.diloco: {name} must be >= {lo}, got {v}")
    return int(v)


def _float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"pccl.diloco: {name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"pccl.diloco: {name} must be finite, got {v}")
    return v


def _tensor_bytes(t: Any) -> bytes:
    """The raw bytes of a contiguous CPU tensor (no NumPy needed)."""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def split_fragments(sizes: Sequence[int], fragments: int) -> List[List[int]]:
    """Splits parameter indices ``0..len(sizes)-1`` into ``fragments``
    contiguous, non-empty runs of about equal element counts, exactly as
    ``pccl_core::diloco::outer::split_fragments``: run ``f`` starts with one
    parameter and takes the next ones while its cumulative count is below
    ``total * (f+1) // fragments`` (leaving one parameter for every later
    run); the last run takes the rest. Deterministic: the same on every peer."""
    n = len(sizes)
    if not 1 <= fragments <= n:
        raise ValueError(f"pccl.diloco: fragments must be in [1, {n}] (the number of parameters), got {fragments}")
    total = sum(int(x) for x in sizes)
    out: List[List[int]] = []
    start = 0
    acc = 0
    for f in range(fragments):
        last_allowed = n - (fragments - f - 1)
        target = total * (f + 1) // fragments
        end = start + 1
        acc += sizes[start]
        while end < last_allowed and acc < target:
            acc += sizes[end]
            end += 1
        if f == fragments - 1:
            end = n
        out.append(list(range(start, end)))
        start = end
    return out


def quant_roundtrip(x: Any, options: QuantizationOptions) -> Any:
    """``dequant(quant(x))`` of a float32 tensor as ``pccl_core::quant``
    encodes it (``docs/quantization.md``): blocks of 1024 elements from the
    start of the tensor, MinMax or ZeroPointScale, round half to even.
    Non-finite blocks come back unchanged here (the core would make them
    NaN); the residual of such a block is then 0."""
    torch = _torch()
    bits = 8 if options.quantized_datatype in (DataType.UINT8, DataType.INT8) else 16
    qmax = float((1 << bits) - 1)
    half = float(((1 << bits) - 1) // 2)
    flat = x.reshape(-1)
    n = flat.numel()
    nb = (n + _QUANT_BLOCK - 1) // _QUANT_BLOCK
    pad = nb * _QUANT_BLOCK - n
    if pad:
        # Pad with the block's own first element: changes neither its min nor its max.
        flat = torch.cat([flat, flat[(nb - 1) * _QUANT_BLOCK :][:1].expand(pad)])
    b = flat.view(nb, _QUANT_BLOCK)
    lo = b.amin(dim=1, keepdim=True)
    hi = b.amax(dim=1, keepdim=True)
    if options.algorithm == QuantizationAlgorithm.MIN_MAX:
        step = hi / qmax - lo / qmax
        step = torch.where((hi - lo).isfinite(), (hi - lo) / qmax, step)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        u = torch.round((b - lo) / safe).clamp_(0.0, qmax)
        dec = torch.where(u <= half, lo + u * step, hi - (qmax - u) * step)
        dec = torch.where(step > 0, dec, lo.expand_as(b))
    else:
        lo2 = torch.clamp(lo, max=0.0)
        hi2 = torch.clamp(hi, min=0.0)
        scale = (hi2 - lo2) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(-lo2 / safe)
        u = torch.round(b / safe + zp).clamp_(0.0, qmax)
        dec = torch.where(scale > 0, (u - zp) * scale, b)
    finite = b.isfinite().all(dim=1, keepdim=True)
    dec = torch.where(finite, dec, b)
    return dec.reshape(-1)[:n].view_as(x)


class _Reduce:
    """One all-reduce of pseudo-gradients (a set of parameter indices), run
    in a background thread or in the caller's. ``recv`` holds the averages
    once :attr:`done`; alone (``TOO_FEW_PEERS``) it holds this peer's own
    pseudo-gradients. Never raises from the thread: the failure is kept in
    :attr:`error`.

    In async mode the background thread runs the whole event's traffic, as
    ``pccl_core::diloco`` does: the shared-state sync of the state just
    applied (:attr:`sync_state`, if set) before the all-reduce, and the
    are-peers-pending vote (:attr:`vote`) after it, so no round trip blocks
    the training thread. Their outcomes are :attr:`sync_info` /
    :attr:`sync_error` and :attr:`pending` / :attr:`vote_error`; a failed
    sync skips the reduce and the vote, a failed reduce skips the vote."""

    def __init__(self, comm: Communicator, idxs: Sequence[int], send: Sequence[Any], recv: Sequence[Any],
                 quant: Optional[QuantizationOptions]) -> None:
        self.comm = comm
        self.idxs = list(idxs)
        self.send = send
        self.recv = recv
        self.descs = [
            ReduceOpDescriptor.from_torch(
                send[i], recv[i], ReduceDescriptor(send[i].numel(), ReduceOp.AVG, tag=i, quantization_options=quant)
            )
            for i in self.idxs
        ]
        self.world = 0
        self.tx = 0
        self.rx = 0
        self.seconds = 0.0
        self.error: Optional[BaseException] = None
        self.done = False
        self.thread: Optional[threading.Thread] = None
        self.sync_state: Optional[SharedState] = None
        self.sync_info: Any = None
        self.sync_error: Optional[BaseException] = None
        self.vote = False
        self.pending: Optional[bool] = None
        self.vote_error: Optional[BaseException] = None

    def failed(self) -> bool:
        """Whether any part of the background work failed."""
        return self.error is not None or self.sync_error is not None or self.vote_error is not None

    def _own(self) -> None:
        for i in self.idxs:
            self.recv[i].copy_(self.send[i])
        self.world = 1

    def alone(self) -> "_Reduce":
        """The result of a peer alone in its group: its own pseudo-gradients."""
        self._own()
        self.done = True
        return self

    def run(self) -> "_Reduce":
        t0 = time.perf_counter()
        if self.sync_state is not None:
            try:
                self.sync_info = self.comm.sync_shared_state(self.sync_state, SharedStateSyncStrategy.ENFORCE_POPULAR)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self.sync_error = e
        if self.sync_error is None:
            try:
                info = self.comm.all_reduce_multiple_with_retry(self.descs, max_in_flight=_MAX_IN_FLIGHT)
                self.world, self.tx, self.rx = info.local_world_size, info.tx_bytes, info.rx_bytes
            except PCCLError as e:
                if e.result == Result.TOO_FEW_PEERS:
                    self._own()  # everyone else left: this peer's delta is the average
                else:
                    self.error = e
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self.error = e
        if self.vote and self.sync_error is None and self.error is None:
            try:
                self.pending = bool(self.comm.are_peers_pending())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self.vote_error = e
        self.seconds = time.perf_counter() - t0
        self.done = True
        return self

    def start(self) -> "_Reduce":
        self.thread = threading.Thread(target=self.run, name="pccl-diloco-reduce", daemon=True)
        self.thread.start()
        return self

    def wait(self) -> float:
        """Waits for the reduce (in short slices, so Ctrl-C is delivered);
        returns the seconds spent blocked."""
        t0 = time.perf_counter()
        th = self.thread
        if th is not None:
            while th.is_alive():
                th.join(_JOIN_POLL_S)
        return time.perf_counter() - t0


class _Event:
    """Accumulates one outer event's figures."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tx = 0
        self.rx = 0
        self.world = 0
        self.applied = 0

    def reduced(self, r: _Reduce) -> None:
        self.tx += r.tx
        self.rx += r.rx
        self.world = r.world
        self.applied += 1


# ---------------------------------------------------------------------------
# DiLoCo
# ---------------------------------------------------------------------------


class DiLoCo:
    """DiLoCo outer steps for ``model`` trained by ``inner_optimizer`` on
    ``communicator`` (connected). See the module documentation for the
    modes, the protocol and the guarantees.

    Arguments: ``outer_lr`` (0.7), ``outer_momentum`` (0.9, in [0, 1)),
    ``nesterov`` (True); ``sync_every`` = H inner steps per outer event
    (>= 1); ``mode`` ``"sync"``, ``"async"`` or ``"streaming"``;
    ``fragments`` = F (streaming: 1 <= F <= min(H, number of parameters));
    ``fragment_sync_delay`` = tau inner steps between a fragment's launch
    and its application (streaming: ``tau * F < H``); ``fragment_update_alpha``
    in (0, 1] (streaming: the model's fragment becomes ``lerp(local, outer,
    alpha)``); ``quantization`` a :class:`pccl.QuantizationOptions` valid
    for float32 (u8/i8/u16/i16, MinMax or ZeroPointScale) or ``None``;
    ``error_feedback`` (needs quantization); ``min_world`` peers to wait for
    before the first inner step of a new run (the same on all founding
    peers).

    Invalid arguments raise ``ValueError``/``TypeError`` before anything is
    changed or communicated. Construction performs the first sync and the
    founding phase (collective calls, see the module documentation) and then
    overwrites the model's parameters with the group's outer parameters.
    """

    def __init__(
        self,
        communicator: Communicator,
        model: Any,
        inner_optimizer: Any,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        sync_every: int = 100,
        mode: str = "sync",
        fragments: int = 1,
        fragment_sync_delay: int = 0,
        fragment_update_alpha: float = 1.0,
        quantization: Optional[QuantizationOptions] = None,
        error_feedback: bool = False,
        min_world: int = 1,
        *,
        resume_from: Optional["DiLoCo"] = None,
    ) -> None:
        # ---- validation: nothing is touched before all of it passed --------
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"pccl.diloco: mode must be one of {sorted(MODES)}, got {mode!r}")
        H = _int("sync_every (H)", sync_every, 1)
        F = _int("fragments", fragments, 1)
        tau = _int("fragment_sync_delay (tau)", fragment_sync_delay, 0)
        lr = _float("outer_lr", outer_lr)
        mu = _float("outer_momentum", outer_momentum)
        alpha = _float("fragment_update_alpha", fragment_update_alpha)
        if lr <= 0:
            raise ValueError(f"pccl.diloco: outer_lr must be > 0, got {lr}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"pccl.diloco: outer_momentum must be in [0, 1), got {mu}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"pccl.diloco: fragment_update_alpha must be in (0, 1], got {alpha}")
        if not isinstance(nesterov, bool):
            raise TypeError(f"pccl.diloco: nesterov must be a bool, got {type(nesterov).__name__}")
        min_world = _int("min_world", min_world, 1)
        if mode != "streaming":
            if F != 1 or tau != 0 or alpha != 1.0:
                raise ValueError(
                    "pccl.diloco: fragments, fragment_sync_delay and fragment_update_alpha apply to "
                    f"mode='streaming' only (got fragments={F}, tau={tau}, alpha={alpha} with mode={mode!r})"
                )
        else:
            if F > H:
                raise ValueError(f"pccl.diloco: fragments must be <= sync_every (H={H}), got {F}")
            if tau * F >= H:
                raise ValueError(
                    f"pccl.diloco: streaming needs fragment_sync_delay * fragments < sync_every "
                    f"(tau={tau} * F={F} = {tau * F} >= H={H}), so that at most one fragment is in flight"
                )
        if quantization is not None:
            if not isinstance(quantization, QuantizationOptions):
                raise TypeError("pccl.diloco: quantization must be a pccl.QuantizationOptions or None")
            if quantization.algorithm != QuantizationAlgorithm.NONE:
                if quantization.algorithm not in _QUANT_ALGOS:
                    raise ValueError(f"pccl.diloco: quantization algorithm {quantization.algorithm!r} is not supported")
                if quantization.quantized_datatype not in _QUANT_TYPES:
                    raise ValueError(
                        "pccl.diloco: pseudo-gradients are float32; quantized_datatype must be UINT8, INT8, "
                        f"UINT16 or INT16, got {quantization.quantized_datatype.name}"
                    )
            else:
                quantization = None
        if error_feedback and quantization is None:
            raise ValueError("pccl.diloco: error_feedback=True needs quantization (there is no error to feed back)")
        if resume_from is not None and not isinstance(resume_from, DiLoCo):
            raise TypeError("pccl.diloco: resume_from must be a pccl.diloco.DiLoCo (the instance being replaced)")
        if not isinstance(communicator, Communicator):
            raise TypeError(f"pccl.diloco: communicator must be a pccl.Communicator, got {type(communicator).__name__}")
        if not hasattr(model, "named_parameters"):
            raise TypeError("pccl.diloco: model must be a torch.nn.Module (it needs named_parameters())")
        if not hasattr(inner_optimizer, "register_step_post_hook"):
            raise TypeError("pccl.diloco: inner_optimizer must be a torch.optim.Optimizer")
        torch = _torch()
        named = list(model.named_parameters())
        if not named:
            raise ValueError("pccl.diloco: the model has no parameters")
        for name, p in named:
            if p.device.type == "cuda":
                # Design for CUDA (not implemented): the outer parameters and
                # momentum would stay float32 tensors in *pinned* CPU memory
                # (torch.empty(..., pin_memory=True)), shared-state sync and
                # all-reduce working on them as now; the pseudo-gradient would
                # be computed on the device (outer cast to the model dtype
                # minus the local parameters) and copied with
                # non_blocking=True into a pinned staging buffer, and the reset
                # copied back the same way. Nothing else changes.
                raise InvalidBufferError(
                    f"pccl.diloco: parameter {name!r} is on {p.device}: CUDA device buffers are not supported yet "
                    "(pccl.diloco works on CPU tensors only; move the model to the CPU)"
                )
            if p.device.type != "cpu":
                raise InvalidBufferError(f"pccl.diloco: parameter {name!r} is on {p.device}; only CPU tensors are supported")
            if not p.dtype.is_floating_point:
                raise TypeError(f"pccl.diloco: parameter {name!r} has dtype {p.dtype}; floating-point parameters only")
            if p.numel() == 0:
                raise ValueError(f"pccl.diloco: parameter {name!r} is empty")
        sizes = [p.numel() for _, p in named]
        if resume_from is not None:
            if resume_from._names != [n for n, _ in named] or any(
                tuple(t.shape) != tuple(p.shape) for t, (_, p) in zip(resume_from._outer, named)
            ):
                raise ValueError("pccl.diloco: resume_from holds the state of a model with other parameters")
        if mode == "streaming":
            frags = split_fragments(sizes, F)
        else:
            frags = [list(range(len(named)))]
        if resume_from is not None:
            resume_from._remove_hook()
            for r in (resume_from._pending, resume_from._frag_pending[2] if resume_from._frag_pending else None):
                if r is not None:
                    r.wait()  # a reduce still in flight must be over before its buffers are read

        # ---- configuration ------------------------------------------------
        self.communicator = communicator
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.mode = mode
        self.sync_every = H
        self.fragments = F
        self.fragment_sync_delay = tau
        self.fragment_update_alpha = alpha
        self.outer_lr = lr
        self.outer_momentum = mu
        self.nesterov = nesterov
        self.quantization = quantization
        self.error_feedback = bool(error_feedback)
        self.min_world = min_world
        self.last_report: Optional[OuterStepReport] = None
        self._lr32 = _f32(lr)
        self._mu32 = _f32(mu)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._frags = frags
        self._offsets = [f * H // F for f in range(F)]
        self._config = [
            META_FORMAT,
            MODES[mode],
            H,
            F,
            tau,
            _f32_bits(alpha),
            _f32_bits(lr),
            _f32_bits(mu),
            1 if nesterov else 0,
            _quant_code(quantization),
        ]

        # ---- buffers (all float32, CPU) ------------------------------------
        with torch.no_grad():
            self._outer = [p.detach().to(torch.float32).contiguous().clone() for p in self._params]
        self._momentum = [torch.zeros(p.shape, dtype=torch.float32) for p in self._params]
        # Async: where the model started its current window (eager updates, see _async_event).
        self._start = [torch.zeros(p.shape, dtype=torch.float32) for p in self._params] if mode == "async" else []
        nsets = 2 if mode == "async" else 1  # async: the next delta is computed while one is in flight
        self._send = [[torch.zeros(p.shape, dtype=torch.float32) for p in self._params] for _ in range(nsets)]
        self._recv = [[torch.zeros(p.shape, dtype=torch.float32) for p in self._params] for _ in range(nsets)]
        self._cur = 0
        self._residual = [torch.zeros(p.shape, dtype=torch.float32) for p in self._params] if error_feedback else None
        self._meta = torch.tensor(self._config + [0, 0], dtype=torch.uint64)
        infos = [TensorInfo.from_torch(t, _PREFIX_OUTER + n) for n, t in zip(self._names, self._outer)]
        infos += [TensorInfo.from_torch(t, _PREFIX_MOMENTUM + n) for n, t in zip(self._names, self._momentum)]
        infos.append(TensorInfo.from_torch(self._meta, _META_NAME))
        self._state = SharedState(infos)
        self._inner_step = 0
        self._outer_step = 0
        if resume_from is not None:
            # Start from the replaced instance's outer state and counters:
            # if the group still runs, the first sync replaces them with the
            # group's; if it is gone (every peer rejoins), the run goes on
            # from here instead of starting over.
            for dst, src in zip(self._outer + self._momentum, resume_from._outer + resume_from._momentum):
                dst.copy_(src)
            if self._residual is not None and resume_from._residual is not None:
                for dst, src in zip(self._residual, resume_from._residual):
                    dst.copy_(src)
            self._inner_step = resume_from._inner_step
            self._outer_step = resume_from._outer_step
            self._meta[_INNER] = self._inner_step
            self._meta[_OUTER] = self._outer_step
            self._state.revision = resume_from._state.revision
        self._synced = False
        self._pending: Optional[_Reduce] = None  # async: the reduce in flight or a ready result
        self._frag_pending: Optional[Tuple[int, int, _Reduce]] = None  # streaming: (fragment, due step, reduce)
        # Streaming: a fragment was applied without a sync; the next launch
        # syncs it (in its background thread), as pccl_core::diloco does.
        self._needs_sync = False
        self._broken: Optional[BaseException] = None
        self._closed = False
        self._hook: Any = None

        # ---- join: first sync, founding phase, model := outer -------------
        try:
            self._first_sync()
            while self._inner_step == 0 and self._world() < self.min_world:
                if self._call("are_peers_pending", communicator.are_peers_pending):
                    self._update_topology()
                    self._sync()
                else:
                    time.sleep(_FOUNDING_POLL_S)
        except BaseException:
            self._leave()
            raise
        self._set_model_all()
        self._start_from_outer()
        if mode == "streaming" and tau > 0 and self._inner_step > 0:
            # The peers that admitted us synced at their step s right after
            # applying a fragment and now launch the fragments due at s;
            # take part (our pseudo-gradient is 0: the model is the outer).
            try:
                self._launch_due(self._inner_step)
            except BaseException as e:
                self._fail(e)

    # ------------------------------------------------------------------ API

    @property
    def inner_step(self) -> int:
        """Inner steps of the group so far (adopted from the group on joining)."""
        return self._inner_step

    @property
    def outer_step(self) -> int:
        """Outer steps applied so far (adopted from the group on joining)."""
        return self._outer_step

    @property
    def revision(self) -> int:
        """The shared state's revision (+1 per sync)."""
        return self._state.revision

    @property
    def world(self) -> int:
        """Peers of this peer's group, as of the latest master update."""
        return self._world()

    @property
    def fragment_indices(self) -> List[List[int]]:
        """Streaming: the parameter indices of each fragment (one fragment otherwise)."""
        return [list(f) for f in self._frags]

    def step(self) -> Optional[OuterStepReport]:
        """Call after every inner optimizer step. Returns an
        :class:`OuterStepReport` when outer steps were applied during this
        call, else ``None``. Raises :class:`RejoinRequired` when this peer
        fell out of step with the group."""
        if self._closed:
            raise RuntimeError("pccl.diloco: step() after close()")
        if self._broken is not None:
            raise RejoinRequired(self._broken, "an earlier outer event failed")
        self._inner_step += 1
        s = self._inner_step
        try:
            if self.mode == "sync":
                report = self._sync_event() if s % self.sync_every == 0 else None
            elif self.mode == "async":
                report = self._async_event() if s % self.sync_every == 0 else None
            else:
                report = self._streaming_step(s)
        except BaseException as e:
            self._fail(e)
        if report is not None:
            self.last_report = report
        return report

    def state_hash(self) -> str:
        """SHA-256 (hex) of the outer parameters' and momentum buffers' bytes,
        in parameter order: equal on every peer after every sync."""
        h = hashlib.sha256()
        for t in self._outer:
            h.update(_tensor_bytes(t))
        for t in self._momentum:
            h.update(_tensor_bytes(t))
        return h.hexdigest()

    def outer_parameters(self) -> Dict[str, Any]:
        """The float32 outer parameters by name (the live tensors: do not modify)."""
        return dict(zip(self._names, self._outer))

    def close(self) -> Optional[OuterStepReport]:
        """Waits for an all-reduce still in flight (async/streaming) and, if
        it succeeded, applies it and sets the model (or its fragment) from
        the outer parameters, with no sync after it (every peer closing at
        the same step applies the same update). Removes the optimizer hook.
        Does not close the communicator. Returns the report of that last
        application, if any; a failed reduce is dropped, not raised."""
        if self._closed:
            return None
        self._closed = True
        self._remove_hook()
        report = None
        ev = _Event()
        if self._pending is not None and self._broken is None:
            r, self._pending = self._pending, None
            blocked = r.wait()
            if self._usable_at_close(r):
                self._apply(r)
                ev.reduced(r)
                self._set_model_all()
                self._start_from_outer()
                report = self._report(ev, r.seconds, blocked)
        elif self._frag_pending is not None and self._broken is None:
            f, _due, r = self._frag_pending
            self._frag_pending = None
            blocked = r.wait()
            if self._usable_at_close(r):
                self._apply(r)
                ev.reduced(r)
                self._set_model_fragment(f)
                report = self._report(ev, r.seconds, blocked)
        else:
            for r in (self._pending, self._frag_pending[2] if self._frag_pending else None):
                if r is not None:
                    r.wait()
        if report is not None:
            self.last_report = report
        return report

    def _usable_at_close(self, r: _Reduce) -> bool:
        """Whether ``close`` applies the finished background work ``r``:
        everything in it succeeded, and the state it synced (if any) still
        has this peer's configuration (its outer step is adopted)."""
        if r.failed():
            return False
        if r.sync_state is not None:
            try:
                self._after_sync(adopt_inner_step=False)
            except ConfigMismatchError:
                return False  # dropped, as a failed reduce is
        return True

    def __enter__(self) -> "DiLoCo":
        if self._hook is None:
            self._hook = self.inner_optimizer.register_step_post_hook(self._on_optimizer_step)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove_hook()
        self.close()

    def __repr__(self) -> str:
        return (
            f"<pccl.diloco.DiLoCo mode={self.mode} H={self.sync_every} inner_step={self._inner_step} "
            f"outer_step={self._outer_step} revision={self._state.revision}>"
        )

    # ------------------------------------------------------------ internals

    def _on_optimizer_step(self, _optimizer: Any, _args: Any, _kwargs: Any) -> None:
        self.step()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _world(self) -> int:
        return int(self.communicator.get_attribute(Attribute.LOCAL_WORLD_SIZE))

    def _leave(self) -> None:
        try:
            self.communicator.close()
        except Exception:  # noqa: BLE001 - already closed or gone
            pass

    def _fail(self, e: BaseException) -> None:
        """Marks the instance unusable, leaves the group, and raises: a peer
        that stayed admitted without following the protocol would stall the
        group's next collective. A reduce still in flight is not waited for:
        with the communicator closed it ends (its thread writes only this
        instance's buffers)."""
        self._broken = e
        self._leave()
        if isinstance(e, (RejoinRequired, ConfigMismatchError)):
            raise e
        if isinstance(e, PCCLError):
            raise RejoinRequired(e) from e
        raise e  # KeyboardInterrupt, bugs: as they are

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """A membership or sync call; any failure means rejoin."""
        try:
            return fn(*args)
        except PCCLError as e:
            raise RejoinRequired(e, what) from e

    def _first_sync(self) -> None:
        comm = self.communicator
        try:
            info = comm.sync_shared_state(self._state, SharedStateSyncStrategy.RECEIVE_ONLY)
        except PCCLError as e:
            if e.result == Result.NO_SHARED_STATE_AVAILABLE:
                try:
                    info = comm.sync_shared_state(self._state, SharedStateSyncStrategy.ENFORCE_POPULAR)
                except PCCLError as e2:
                    raise self._sync_error(e2) from e2
            else:
                raise self._sync_error(e) from e
        self._synced = True
        self._after_sync()
        return info

    def _sync_error(self, e: PCCLError) -> BaseException:
        if e.result == Result.INVALID_ARGUMENT:
            return LayoutMismatchError(
                "pccl.diloco: this model's parameters do not match the group's shared state (a parameter "
                "name, shape or dtype differs, or one is missing); the group's state is unchanged and this "
                f"peer left the group: {e}",
                e,
            )
        return RejoinRequired(e, "first shared-state sync")

    def _prepare_sync(self) -> None:
        """The counters and revision a sync publishes."""
        self._meta[_INNER] = self._inner_step
        self._meta[_OUTER] = self._outer_step
        self._state.revision = self._state.revision + 1

    def _sync(self) -> Tuple[int, int]:
        self._prepare_sync()
        info = self._call(
            "shared-state sync", self.communicator.sync_shared_state, self._state, SharedStateSyncStrategy.ENFORCE_POPULAR
        )
        self._after_sync()
        return info.tx_bytes, info.rx_bytes

    def _adopt_background(self, r: _Reduce, ev: "_Event") -> None:
        """Async: takes in what the background thread of ``r`` did beyond
        its reduce, on the training thread: the sync of the state applied
        at launch (its figures, the configuration check and the outer step;
        the inner step stays this peer's own clock, which moved on) and the
        vote. Raises what the thread kept."""
        if r.sync_state is not None:
            if r.sync_error is not None:
                if isinstance(r.sync_error, PCCLError):
                    raise RejoinRequired(r.sync_error, "shared-state sync") from r.sync_error
                raise r.sync_error
            ev.tx += r.sync_info.tx_bytes
            ev.rx += r.sync_info.rx_bytes
            self._after_sync(adopt_inner_step=False)
        if r.vote_error is not None:
            if isinstance(r.vote_error, PCCLError):
                raise RejoinRequired(r.vote_error, "are_peers_pending") from r.vote_error
            raise r.vote_error

    def _after_sync(self, adopt_inner_step: bool = True) -> None:
        meta = [int(v) for v in self._meta.tolist()]
        for k in range(_CONFIG_ENTRIES):
            if meta[k] != self._config[k]:
                field = META_FIELDS[k]
                raise ConfigMismatchError(
                    field,
                    self._config[k],
                    meta[k],
                    f"pccl.diloco: this peer's {field} ({self._describe(k, self._config[k])}) differs from the "
                    f"group's ({self._describe(k, meta[k])}); every peer of a group needs the same DiLoCo "
                    "configuration; this peer left the group",
                )
        if adopt_inner_step:
            self._inner_step = meta[_INNER]
        self._outer_step = meta[_OUTER]

    @staticmethod
    def _describe(k: int, v: int) -> str:
        if k in (5, 6, 7):
            return f'{struct.unpack("<f", struct.pack("<I", v & 0xFFFFFFFF))[0]:.7g}'
        if k == 1:
            return {c: n for n, c in MODES.items()}.get(v, str(v))
        if k == 9 and v:
            return f"{QuantizationAlgorithm(v >> 8).name}/{DataType(v & 0xFF).name}" if (v >> 8) in (1, 2) else str(v)
        return str(v)

    def _update_topology(self) -> None:
        """Admits the pending peers. A failure is the same on every peer
        (the master decides), so the sync that follows is still common to
        all of them: log it and go on, as ``pccl_core::diloco`` does; a lost
        master connection then fails that sync."""
        try:
            self.communicator.update_topology()
        except PCCLError as e:
            _log.warning("pccl.diloco: update_topology failed (%s); going on with the sync", e)

    def _admit_and_sync(self, ev: _Event) -> None:
        if self._call("are_peers_pending", self.communicator.are_peers_pending):
            self._update_topology()
        tx, rx = self._sync()
        ev.tx += tx
        ev.rx += rx

    # -- pseudo-gradients and the outer step --

    def _compute_delta(self, idxs: Sequence[int], send: Sequence[Any], ref: Optional[Sequence[Any]] = None) -> None:
        """``send[i] = f32(cast_model(ref[i])) - f32(local[i])`` (``ref``:
        the outer parameters, or in async mode this peer's eager start),
        plus the error-feedback residual."""
        torch = _torch()
        ref = self._outer if ref is None else ref
        with torch.no_grad():
            for i in idxs:
                p, o, d = self._params[i], ref[i], send[i]
                if p.dtype == torch.float32:
                    torch.sub(o, p.detach(), out=d)
                else:
                    d.copy_(o.to(p.dtype))  # cast_model(outer), exact in f32
                    d.sub_(p.detach())  # f32(cast(outer)) - f32(local), one rounding
                if self._residual is not None:
                    res = self._residual[i]
                    d.add_(res)
                    res.copy_(d)
                    res.sub_(quant_roundtrip(d, self.quantization))
                    res.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def _sgd(self, o: Any, m: Any, g: Any) -> None:
        """One outer SGD step on ``o``/``m`` with ``g``: the same float32
        operations, in the same order, on every peer (and as
        ``pccl_core::diloco::outer::outer_sgd_step``), no fused multiply-add."""
        torch = _torch()
        mu, lr = self._mu32, self._lr32
        m.mul_(mu)
        m.add_(g)  # m = mu*m + g
        if self.nesterov:
            u = torch.mul(m, mu)
            u.add_(g)  # upd = g + mu*m
        else:
            u = m.clone()
        u.mul_(lr)
        o.sub_(u)  # outer = outer - lr*upd

    def _apply(self, r: _Reduce) -> None:
        """The outer step for the reduced tensors of ``r``."""
        torch = _torch()
        with torch.no_grad():
            for i in r.idxs:
                self._sgd(self._outer[i], self._momentum[i], r.recv[i])
        self._outer_step += 1

    def _eager_start(self, own: Sequence[Any]) -> None:
        """Async: ``start = outer`` after an outer step with this peer's own
        pseudo-gradient, on copies of the outer parameters and momentum
        (the group's state is not touched)."""
        torch = _torch()
        with torch.no_grad():
            for i, st in enumerate(self._start):
                st.copy_(self._outer[i])
                self._sgd(st, self._momentum[i].clone(), own[i])

    def _start_from_outer(self) -> None:
        if self.mode == "async":
            for st, o in zip(self._start, self._outer):
                st.copy_(o)

    def _set_model(self, idxs: Sequence[int], alpha: float = 1.0, ref: Optional[Sequence[Any]] = None) -> None:
        """``local = lerp(local, ref, alpha)`` in float32, cast to the model
        dtype (``alpha = 1``: ``cast(ref)``); ``ref``: the outer parameters
        unless given (async: the eager start)."""
        torch = _torch()
        ref = self._outer if ref is None else ref
        with torch.no_grad():
            for i in idxs:
                p = self._params[i]
                if alpha == 1.0:
                    p.copy_(ref[i])  # cast(outer), round to nearest even
                else:
                    lv = p.detach().to(torch.float32)
                    step = torch.sub(ref[i], lv)
                    step.mul_(_f32(alpha))
                    lv.add_(step)  # local + alpha*(outer - local), in f32
                    p.copy_(lv)

    def _set_model_all(self) -> None:
        self._set_model(range(len(self._params)))

    def _set_model_fragment(self, f: int) -> None:
        self._set_model(self._frags[f], self.fragment_update_alpha)

    def _new_reduce(self, idxs: Sequence[int], k: int = 0) -> _Reduce:
        return _Reduce(self.communicator, idxs, self._send[k], self._recv[k], self.quantization)

    def _report(self, ev: _Event, comm: float, blocked: float) -> OuterStepReport:
        return OuterStepReport(self._outer_step, ev.world, ev.tx, ev.rx, comm, blocked, max(0.0, comm - blocked))

    def _checked(self, r: _Reduce) -> _Reduce:
        if r.error is not None:
            if isinstance(r.error, PCCLError):
                raise RejoinRequired(r.error, "all-reduce of the pseudo-gradients")
            raise r.error
        return r

    # -- sync mode --

    def _sync_event(self) -> OuterStepReport:
        ev = _Event()
        idxs = self._frags[0]
        self._compute_delta(idxs, self._send[0])
        r = self._checked(self._new_reduce(idxs).run())
        self._apply(r)
        ev.reduced(r)
        self._admit_and_sync(ev)
        self._set_model_all()
        t = time.perf_counter() - ev.t0
        return OuterStepReport(self._outer_step, ev.world, ev.tx, ev.rx, t, t, 0.0)

    # -- async mode --

    def _async_event(self) -> Optional[OuterStepReport]:
        ev = _Event()
        idxs = self._frags[0]
        k = self._cur
        self._compute_delta(idxs, self._send[k], self._start)  # relative to where this window started
        blocked = 0.0
        hidden_comm = 0.0
        prev, self._pending = self._pending, None
        pending: Optional[bool] = None
        if prev is not None:
            w0 = time.perf_counter()
            prev.wait()
            blocked += time.perf_counter() - w0
            if prev.sync_error is None:
                self._checked(prev)
            self._adopt_background(prev, ev)
            self._apply(prev)
            ev.reduced(prev)
            hidden_comm = prev.seconds
            pending = prev.pending  # voted in the background after the reduce
        s0 = time.perf_counter()
        if pending is None:  # the first event, or a peer alone: vote here
            pending = self._call("are_peers_pending", self.communicator.are_peers_pending)
        if pending:
            # Drain: reduce this event's delta now, so the newcomer receives
            # exactly the parameters the others hold, with nothing in flight.
            r = self._checked(self._new_reduce(idxs, k).run())
            self._apply(r)
            ev.reduced(r)
            self._update_topology()
            tx, rx = self._sync()
            ev.tx += tx
            ev.rx += rx
            self._start_from_outer()  # nothing in flight: everyone starts from the outer parameters
        else:
            # The eager start reads the outer state before the background
            # sync may repair it.
            self._eager_start(self._send[k])
            r = self._new_reduce(idxs, k)
            if self._world() <= 1:
                if ev.applied:
                    tx, rx = self._sync()
                    ev.tx += tx
                    ev.rx += rx
                self._pending = r.alone()  # applied at the next event: one-step delay, as with peers
            else:
                # Sync of the state just applied, the all-reduce and the
                # vote, all in the background (every peer runs the same
                # sequence); the training thread does not touch the outer
                # state, momentum or counters until it joins the thread.
                if ev.applied:
                    self._prepare_sync()
                    r.sync_state = self._state
                r.vote = True
                self._pending = r.start()
            self._cur = (k + 1) % len(self._send)
        blocked += time.perf_counter() - s0
        self._set_model(range(len(self._params)), ref=self._start)
        if not ev.applied:
            return None
        comm = hidden_comm + (time.perf_counter() - s0)
        return OuterStepReport(self._outer_step, ev.world, ev.tx, ev.rx, comm, blocked, max(0.0, comm - blocked))

    # -- streaming mode --

    def _streaming_step(self, s: int) -> Optional[OuterStepReport]:
        report = None
        fp = self._frag_pending
        if fp is not None and fp[1] == s:
            self._frag_pending = None
            report = self._finish_fragment(fp[0], fp[2], _Event())
        rep2 = self._launch_due(s)
        return rep2 if rep2 is not None else report

    def _launch_due(self, s: int) -> Optional[OuterStepReport]:
        if s <= 0:
            return None
        report = None
        H = self.sync_every
        for f, off in enumerate(self._offsets):
            if (s - off) % H != 0:
                continue
            if self._frag_pending is not None:  # excluded by tau * F < H
                raise RuntimeError("pccl.diloco: internal error: two fragments in flight")
            idxs = self._frags[f]
            self._compute_delta(idxs, self._send[0])
            r = self._new_reduce(idxs)
            if self.fragment_sync_delay == 0:
                if self._needs_sync:
                    self._needs_sync = False
                    self._sync()
                report = self._finish_fragment(f, r.run(), _Event())
            elif self._world() <= 1:
                if self._needs_sync:
                    self._needs_sync = False
                    self._sync()
                self._frag_pending = (f, s + self.fragment_sync_delay, r.alone())
            else:
                # The sync of the fragment applied last (if it was not
                # synced then), the all-reduce and the vote, in the
                # background; nothing touches the outer state meanwhile.
                if self._needs_sync:
                    self._needs_sync = False
                    self._prepare_sync()
                    r.sync_state = self._state
                r.vote = True
                self._frag_pending = (f, s + self.fragment_sync_delay, r.start())
        return report

    def _finish_fragment(self, f: int, r: _Reduce, ev: _Event) -> OuterStepReport:
        blocked0 = r.wait()
        if r.sync_error is None:
            self._checked(r)
        self._adopt_background(r, ev)
        self._apply(r)
        ev.reduced(r)
        s0 = time.perf_counter()
        if r.thread is None:
            # Reduced on this thread (tau = 0) or alone: vote, admit, sync here.
            if self.fragment_sync_delay == 0:
                self._admit_and_sync(ev)
            elif self._call("are_peers_pending", self.communicator.are_peers_pending):
                self._update_topology()
                tx, rx = self._sync()
                ev.tx += tx
                ev.rx += rx
            else:
                self._needs_sync = True
        elif r.pending:
            # Voted in the background: admit now, with nothing in flight,
            # and sync so the newcomer receives the state.
            self._update_topology()
            tx, rx = self._sync()
            ev.tx += tx
            ev.rx += rx
        else:
            self._needs_sync = True  # synced in the background at the next launch
        self._set_model_fragment(f)
        sync_t = time.perf_counter() - s0
        if r.thread is None:  # reduced in this call: all exposed
            t = time.perf_counter() - ev.t0
            return OuterStepReport(self._outer_step, ev.world, ev.tx, ev.rx, t, t, 0.0)
        exposed = blocked0 + sync_t
        comm = r.seconds + sync_t
        return OuterStepReport(self._outer_step, ev.world, ev.tx, ev.rx, comm, exposed, max(0.0, comm - exposed))
