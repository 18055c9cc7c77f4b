"""PCCL 1.0's master lifetime: a script that only does
``master = pccl.MasterNode(...); master.run()`` keeps serving after its last
line until SIGINT or SIGTERM, then exits cleanly; interrupt()/close()/``with``
are the ways to stop without waiting. Every script runs as a real process on
a free port; every process is reaped, pass or fail."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Launcher, numpy_or_skip, peer_env

SERVING_LINE = "keeps serving after the script ended"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> str:
    """Polls a log file until it contains ``text``; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before printing {text!r}:\n{content[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {text!r}:\n{content[-3000:]}")
        time.sleep(0.05)


class Script:
    """A Python script run as its own process, stderr to a file."""

    def __init__(self, tmp: Path, name: str, source: str) -> None:
        self.path = tmp / f"{name}.py"
        self.path.write_text(source)
        self.err = tmp / f"{name}.stderr"
        self._err = open(self.err, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.path)],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=peer_env(),
        )

    def stderr(self) -> str:
        self._err.flush()
        return self.err.read_text()

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self._err.close()


@pytest.fixture
def scripts(tmp_path):
    started = []

    def run(name: str, source: str) -> Script:
        s = Script(tmp_path, name, source)
        started.append(s)
        return s

    try:
        yield run
    finally:
        for s in started:
            s.reap()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_plain_master_script_serves_until_signalled(scripts, tmp_path, sig):
    numpy_or_skip()
    addr = f"127.0.0.1:{free_port()}"
    # Exactly PCCL 1.0's master script.
    master = scripts("master", f"import pccl\nmaster = pccl.MasterNode({addr!r})\nmaster.run()\n")
    # The message is printed at interpreter exit: the script body is over.
    wait_for_text(master.err, SERVING_LINE, master.proc, timeout=60)
    assert master.proc.poll() is None
    # Two peers connect to it and all-reduce.
    launcher = Launcher(addr, tmp_path)
    try:
        peers = [launcher.spawn("pair_sum", r, world=2) for r in range(2)]
        results = [p.result(timeout=90) for p in peers]
    finally:
        launcher.reap_all()
    assert [r["value"] for r in results] == [3.0, 3.0] and all(r["world"] == 2 for r in results)
    assert master.proc.poll() is None, "the master must still be serving"
    master.proc.send_signal(sig)
    assert master.proc.wait(timeout=30) == 0, master.stderr()
    assert "Traceback" not in master.stderr(), master.stderr()


def test_dropped_master_keeps_serving(scripts):
    addr = f"127.0.0.1:{free_port()}"
    source = (
        "import gc, pccl\n"
        "def start():\n"
        f"    m = pccl.MasterNode({addr!r})\n"
        "    m.run()\n"
        "start()\n"
        "gc.collect()\n"
        f"c = pccl.Communicator({addr!r}, shared_state_port=0, p2p_port=0, benchmark_port=0)\n"
        "c.connect(n_attempts=1)\n"
        "import sys\n"
        "print('world', c.get_attribute(pccl.Attribute.GLOBAL_WORLD_SIZE), file=sys.stderr, flush=True)\n"
        "c.close()\n"
    )
    s = scripts("dropped", source)
    text = wait_for_text(s.err, SERVING_LINE, s.proc, timeout=60)
    assert "world 1" in text
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0, s.stderr()


@pytest.mark.parametrize(
    "stop",
    [
        "m = pccl.MasterNode(ADDR)\nm.run()\nm.interrupt()\n",
        "m = pccl.MasterNode(ADDR)\nm.run()\nm.close()\n",
        "with pccl.MasterNode(ADDR) as m:\n    m.run()\n",
        "m = pccl.MasterNode(ADDR)\nm.run()\nm.interrupt()\nm.await_termination()\n",
        "m = pccl.MasterNode(ADDR)\n",  # never run
    ],
    ids=["interrupt", "close", "with", "await", "not-run"],
)
def test_stopped_master_does_not_wait_at_exit(scripts, stop):
    addr = f"127.0.0.1:{free_port()}"
    s = scripts("stopped", "import pccl\n" + stop.replace("ADDR", repr(addr)))
    assert s.proc.wait(timeout=60) == 0, s.stderr()
    assert SERVING_LINE not in s.stderr()


def test_script_ended_by_ctrl_c_stops_its_master(scripts):
    addr = f"127.0.0.1:{free_port()}"
    s = scripts("ctrl-c", f"import pccl\nm = pccl.MasterNode({addr!r})\nm.run()\nraise KeyboardInterrupt\n")
    rc = s.proc.wait(timeout=60)
    assert rc in (-signal.SIGINT, 130), (rc, s.stderr())
    assert SERVING_LINE not in s.stderr() and "KeyboardInterrupt" in s.stderr()
