"""Shared fixtures: an in-process master on a free port, and a launcher for
peer processes (``peer_worker.py``) that are always reaped, even when a test
fails."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

import pccl

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peer_worker.py"


def torch_or_skip() -> Any:
    """Imports torch; skips the test when it is missing, unless
    ``PCCL_REQUIRE_TORCH`` is set (CI), where a missing torch is a failure."""
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        if os.environ.get("PCCL_REQUIRE_TORCH"):
            pytest.fail("PyTorch is required (PCCL_REQUIRE_TORCH is set) but not installed")
        pytest.skip("PyTorch is not installed (set PCCL_REQUIRE_TORCH=1 to make this a failure)")


def numpy_or_skip() -> Any:
    try:
        import numpy

        return numpy
    except ImportError:
        if os.environ.get("PCCL_REQUIRE_TORCH"):
            pytest.fail("NumPy is required but not installed")
        pytest.skip("NumPy is not installed")


def peer_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PCCL_PEER_PORT_BASE"] = "0"  # ephemeral listener ports: tests run in parallel safely
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PCCL_LOG", "warn")
    return env


class Peer:
    """A peer process; its stdout JSON events are collected by a thread."""

    def __init__(
        self, name: str, argv: List[str], log_path: Path, stdin: bool = False, env: Optional[Dict[str, str]] = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True,
            env={**peer_env(), **(env or {})},
            cwd=str(HERE),
        )
        self.events: List[Dict[str, Any]] = []
        self._queue: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "raw", "line": line}
            self.events.append(ev)
            self._queue.put(ev)
        self._queue.put(None)

    def stderr_text(self) -> str:
        try:
            self._log.flush()
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def wait_event(self, pred: Callable[[Dict[str, Any]], bool], timeout: float) -> Dict[str, Any]:
        """Returns the first event (already seen or new) that satisfies ``pred``."""
        for ev in list(self.events):
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: timed out waiting for an event; stderr:\n{self.stderr_text()}")
            try:
                ev = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                # Put the end marker back so later waits end too.
                self._queue.put(None)
                raise AssertionError(
                    f"{self.name} exited ({self.proc.poll()}) before the event; events: {self.events[-5:]}; "
                    f"stderr:\n{self.stderr_text()}"
                )
            if ev.get("event") == "error":
                raise AssertionError(f"{self.name} failed: {ev.get('error')}\n{ev.get('tb')}")
            if pred(ev):
                return ev

    def result(self, timeout: float) -> Dict[str, Any]:
        ev = self.wait_event(lambda e: e.get("event") == "result", timeout)
        try:
            self.proc.wait(timeout=max(1.0, timeout / 4))
        except subprocess.TimeoutExpired:
            pass
        return ev

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._log.close()


class Launcher:
    def __init__(self, master_addr: str, tmp: Path) -> None:
        self.master_addr = master_addr
        self.tmp = tmp
        self.peers: List[Peer] = []

    def spawn(
        self, scenario: str, rank: int, stdin: bool = False, env: Optional[Dict[str, str]] = None, **args: Any
    ) -> Peer:
        args.setdefault("master", self.master_addr)
        args["rank"] = rank
        name = f"{scenario}[{rank}]"
        argv = [sys.executable, str(WORKER), scenario, json.dumps(args)]
        p = Peer(name, argv, self.tmp / f"{scenario}-{rank}.log", stdin, env)
        self.peers.append(p)
        return p

    def spawn_cmd(self, name: str, argv: List[str]) -> Peer:
        p = Peer(name, argv, self.tmp / f"{name}.log")
        self.peers.append(p)
        return p

    def reap_all(self) -> None:
        for p in self.peers:
            p.reap()


@pytest.fixture
def master():
    """An in-process master bound to a free loopback port."""
    m = pccl.MasterNode("127.0.0.1:0", peer_timeout_ms=3000)
    m.run()
    try:
        yield m
    finally:
        m.interrupt()
        m.close()


@pytest.fixture
def launcher(master, tmp_path):
    lz = Launcher(master.listen_address, tmp_path)
    try:
        yield lz
    finally:
        lz.reap_all()
