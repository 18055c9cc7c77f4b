"""Train a small PyTorch model with a swarm of PCCL peers that come and go.

One command starts everything on this machine: a master, N peers, then kills
one peer (SIGKILL, mid-run) and later adds a new one, which receives the
model and optimizer state from the others by shared-state sync::

    python train_swarm.py                       # 3 peers, 60 steps
    python train_swarm.py --peers 4 --steps 100 --kill-at 30 --join-at 50

Each peer runs the canonical fault-tolerant loop:

1. admit pending peers (``are_peers_pending`` / ``update_topology``),
2. sync the shared state (weights, Adam buffers, revision),
3. forward/backward on its own data,
4. all-reduce the gradients (average) with retry,
5. optimizer step, ``revision += 1``.

To run peers on several machines, start a master (``pccl-master`` or
``python -m pccl.master --listen 0.0.0.0:48148``) and on each machine::

    python train_swarm.py peer --master MASTER_IP:48148 --steps 1000
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import pccl
from pccl import Attribute, PCCLError, ReduceDescriptor, ReduceOp, ReduceOpDescriptor, Result, SharedState, TensorInfo


# ---------------------------------------------------------------------------
# one peer
# ---------------------------------------------------------------------------


def run_peer(master: str, rank: int, steps: int, group: int = 0, step_time: float = 0.0, wait_go: bool = False) -> int:
    import torch

    torch.manual_seed(0)  # same start everywhere; a newcomer gets the current state by sync anyway
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # One step with zero gradients creates Adam's buffers (and changes nothing else)
    # so they can be part of the shared state from the start.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()

    target = torch.nn.Linear(16, 1)  # the function to learn, identical on every peer
    with torch.no_grad():
        target.weight.copy_(torch.linspace(-1, 1, 16) / 4)
        target.bias.fill_(0.5)
    data = torch.Generator().manual_seed(1000 + rank)  # every peer sees different data

    if wait_go:
        # Launcher mode: imports are done; join when told to.
        print(f"[peer {rank}] ready; waiting for the launcher's go", flush=True)
        sys.stdin.readline()
    comm = pccl.Communicator(master, peer_group=group)
    comm.connect(n_attempts=10)
    print(f"[peer {rank}] joined the swarm", flush=True)

    entries = [TensorInfo.from_torch(t, f"model.{name}") for name, t in model.state_dict().items()]
    params = list(model.parameters())
    for i, p in enumerate(params):
        st = opt.state[p]
        entries += [
            TensorInfo.from_torch(st["exp_avg"], f"adam.{i}.exp_avg"),
            TensorInfo.from_torch(st["exp_avg_sq"], f"adam.{i}.exp_avg_sq"),
            TensorInfo.from_torch(st["step"], f"adam.{i}.step"),
        ]
    shared = SharedState(entries)

    first = True
    while True:
        # 1. Admit newcomers. (A newcomer's connect() returned together with
        #    the others' update_topology(), so it starts at the sync.)
        if not first:
            try:
                if comm.are_peers_pending():
                    comm.update_topology()
            except PCCLError as e:
                print(f"[peer {rank}] topology update failed ({e.result.name}); retrying", flush=True)
                continue
        first = False

        # 2. Agree on the state (a newcomer receives it here).
        try:
            sync = comm.sync_shared_state(shared)
        except PCCLError as e:
            print(f"[peer {rank}] shared-state sync failed ({e.result.name}); retrying", flush=True)
            continue
        if sync.rx_bytes:
            print(f"[peer {rank}] received {sync.rx_bytes} bytes of shared state at revision {shared.revision}", flush=True)
        if shared.revision >= steps:
            break
        world = comm.get_attribute(Attribute.LOCAL_WORLD_SIZE)

        # 3. Local forward/backward.
        x = torch.randn(64, 16, generator=data)
        y = torch.sin(2 * target(x)).detach()
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()

        # 4. Average the gradients over the peers that are still there.
        if world > 1:
            descs = [
                ReduceOpDescriptor.from_torch(p.grad, p.grad, ReduceDescriptor(p.grad.numel(), ReduceOp.AVG, tag=i))
                for i, p in enumerate(params)
            ]
            try:
                info = comm.all_reduce_multiple_with_retry(descs, max_in_flight=4)
                world = info.local_world_size
            except PCCLError as e:
                if e.result != Result.TOO_FEW_PEERS:
                    raise
                world = 1  # everyone else left: keep training alone

        # 5. Step and advance the revision.
        opt.step()
        shared.revision += 1
        print(f"[peer {rank}] step {shared.revision:4d}  loss {loss.item():.5f}  world {world}", flush=True)
        if step_time:
            time.sleep(step_time)  # stands in for a bigger model's compute time

    print(f"[peer {rank}] done at revision {shared.revision}", flush=True)
    comm.close()
    return 0


# ---------------------------------------------------------------------------
# launcher: master + peers, one killed, one added
# ---------------------------------------------------------------------------


class Child:
    def __init__(self, rank: int, master: str, steps: int, step_time: float, wait_go: bool = False) -> None:
        self.rank = rank
        self.step = 0
        self.done = False
        env = dict(os.environ, PCCL_PEER_PORT_BASE=os.environ.get("PCCL_PEER_PORT_BASE", "0"), PYTHONUNBUFFERED="1")
        argv = [sys.executable, os.path.abspath(__file__), "peer", "--master", master, "--rank", str(rank)]
        argv += ["--steps", str(steps), "--step-time", str(step_time)] + (["--wait-go"] if wait_go else [])
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE if wait_go else subprocess.DEVNULL, text=True, env=env
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def go(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "step":
                try:
                    self.step = int(parts[3])
                except ValueError:
                    pass
            if " done at revision" in line:
                self.done = True


def launch(
    n_peers: int, steps: int, kill_at: Optional[int], join_at: Optional[int], timeout: float, step_time: float
) -> int:
    master = pccl.MasterNode("127.0.0.1:0")
    master.run()
    print(f"master listening on {master.listen_address}", flush=True)
    children: List[Child] = []
    killed: Dict[int, bool] = {}
    late: Optional[Child] = None
    try:
        children = [Child(r, master.listen_address, steps, step_time) for r in range(n_peers)]
        if join_at is not None:
            # Started now so its imports overlap the others' training; joins at `join_at`.
            late = Child(n_peers, master.listen_address, steps, step_time, wait_go=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            progress = max((c.step for c in children if c.proc.poll() is None), default=0)
            if kill_at is not None and progress >= kill_at and not killed and n_peers > 1:
                victim = children[-1]
                print(f"--- launcher: killing peer {victim.rank} (SIGKILL) at step {progress}", flush=True)
                victim.proc.send_signal(signal.SIGKILL)
                killed[victim.rank] = True
            if late is not None and progress >= join_at:
                print(f"--- launcher: adding peer {late.rank} at step {progress}", flush=True)
                late.go()
                children.append(late)
                late = None
            alive = [c for c in children if c.rank not in killed]
            if all(c.proc.poll() is not None for c in alive):
                break
            time.sleep(0.05)
        else:
            print("--- launcher: timed out", flush=True)
            return 1
        failed = [c.rank for c in children if c.rank not in killed and c.proc.returncode != 0]
        if failed:
            print(f"--- launcher: peers {failed} failed", flush=True)
            return 1
        print(f"--- launcher: all {len(children) - len(killed)} surviving peers finished {steps} steps", flush=True)
        return 0
    finally:
        for c in children + ([late] if late is not None else []):
            if c.proc.poll() is None:
                c.proc.kill()
            c.proc.wait()
        master.interrupt()
        master.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", choices=["launch", "peer"], default="launch")
    ap.add_argument("--peers", type=int, default=3, help="peers started at the beginning (launch mode)")
    ap.add_argument("--steps", type=int, default=60, help="training steps (shared-state revisions)")
    ap.add_argument("--kill-at", type=int, default=None, help="SIGKILL the last peer at this step (default steps/3)")
    ap.add_argument("--join-at", type=int, default=None, help="add a peer at this step (default steps/2)")
    ap.add_argument("--no-churn", action="store_true", help="neither kill nor add peers")
    ap.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (launch mode)")
    ap.add_argument("--master", default="127.0.0.1:48148", help="master address (peer mode)")
    ap.add_argument("--rank", type=int, default=0, help="label for the output (peer mode)")
    ap.add_argument("--group", type=int, default=0, help="peer group (peer mode)")
    ap.add_argument("--step-time", type=float, default=0.1, help="extra seconds per step, standing in for compute")
    ap.add_argument("--wait-go", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode == "peer":
        return run_peer(a.master, a.rank, a.steps, a.group, a.step_time, a.wait_go)
    kill_at = None if a.no_churn else (a.kill_at if a.kill_at is not None else max(1, a.steps // 3))
    join_at = None if a.no_churn else (a.join_at if a.join_at is not None else max(1, a.steps // 2))
    return launch(a.peers, a.steps, kill_at, join_at, a.timeout, a.step_time)


if __name__ == "__main__":
    sys.exit(main())
