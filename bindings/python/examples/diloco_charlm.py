"""Train a small character-level language model with DiLoCo across a swarm of
PCCL peers that come and go (``pccl.diloco``).

One command starts everything on this machine: a master (embedded, in this
process), ``--peers`` peers that found the run together, and one more peer
that joins mid-run; one founding peer is killed with SIGKILL during the run::

    python diloco_charlm.py                                  # sync DiLoCo, 3 peers
    python diloco_charlm.py --mode async --quant minmax      # one-step-delayed outer steps, u8 pseudo-gradients
    python diloco_charlm.py --mode streaming --steps 240     # 2 fragments, each applied 2 steps after launch

Each peer trains on its own stream of a text generated deterministically
below, with AdamW as the inner optimizer, and prints one line per outer step
(outer step, loss, world, bytes, hidden communication seconds). At the end
every surviving peer prints the hash of its outer parameters and momentum;
the launcher checks that they are all equal and that the model learned (the
held-out loss of the outer parameters went down), and exits non-zero
otherwise.

A peer that falls out of step with its group (``pccl.diloco.RejoinRequired``)
rejoins as a newcomer: new communicator, ``connect()``, new ``DiLoCo``
(``resume_from=`` the old one).

To run peers on several machines, start a master (``pccl-master`` or
``python -m pccl.master --listen 0.0.0.0:48148``) and on each machine::

    python diloco_charlm.py peer --master MASTER_IP:48148 --steps 2000 --min-world 2
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import pccl
import pccl.diloco

# ---------------------------------------------------------------------------
# data: a deterministic toy language
# ---------------------------------------------------------------------------

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "calls", "remembers"]
OBJECTS = ["the river", "a red ball", "the garden", "an apple", "the moon", "a quiet street", "the music"]
ENDINGS = ["today", "at night", "again", "with joy", "in the rain", "every morning", "slowly"]
CONTEXT = 8


def make_text(n_sentences: int = 3000, seed: int = 1234) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        out.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}.")
    return " ".join(out)


def build_model(vocab: int):
    import torch

    class CharMLP(torch.nn.Module):
        """Embeds the last CONTEXT characters and predicts the next one."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 24)
            self.hidden = torch.nn.Linear(CONTEXT * 24, 192)
            self.out = torch.nn.Linear(192, vocab)

        def forward(self, x):
            h = self.emb(x).flatten(1)
            return self.out(torch.nn.functional.gelu(self.hidden(h)))

    return CharMLP()


# ---------------------------------------------------------------------------
# one peer
# ---------------------------------------------------------------------------


def run_peer(a: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    text = make_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(len(data) * 0.9)
    train, held = data[:split], data[split:]
    gen = torch.Generator().manual_seed(1000 + a.rank)  # every peer reads its own batches

    def batch(src, n, g):
        idx = torch.randint(0, len(src) - CONTEXT - 1, (n,), generator=g)
        x = torch.stack([src[i : i + CONTEXT] for i in idx.tolist()])
        return x, src[idx + CONTEXT]

    eval_x, eval_y = batch(held, 512, torch.Generator().manual_seed(7))  # the same on every peer

    torch.manual_seed(a.rank)  # different initial weights: the group's are adopted at the first sync
    model = build_model(len(chars))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    quant = {
        "none": None,
        "minmax": pccl.QuantizationOptions(pccl.DataType.UINT8, pccl.QuantizationAlgorithm.MIN_MAX),
        "zps": pccl.QuantizationOptions(pccl.DataType.UINT8, pccl.QuantizationAlgorithm.ZERO_POINT_SCALE),
    }[a.quant]
    config = dict(
        outer_lr=a.outer_lr if a.outer_lr is not None else 0.7,
        outer_momentum=a.outer_momentum if a.outer_momentum is not None else 0.9,
        nesterov=True,
        sync_every=a.sync_every,
        mode=a.mode,
        quantization=quant,
        error_feedback=quant is not None,
        min_world=a.min_world,
    )
    if a.mode == "streaming":
        config.update(fragments=2, fragment_sync_delay=2, fragment_update_alpha=1.0)

    def eval_loss(d) -> float:
        # The loss of the *outer* parameters: the same on every peer.
        outer = d.outer_parameters()
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                p.copy_(outer[n])
            loss = torch.nn.functional.cross_entropy(model(eval_x), eval_y).item()
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        return loss

    def join(previous=None) -> "pccl.diloco.DiLoCo":
        comm = pccl.Communicator(a.master, peer_group=a.group)
        comm.connect(n_attempts=10)
        # resume_from: should the whole group have fallen apart, go on from our state.
        d = pccl.diloco.DiLoCo(comm, model, opt, **config, resume_from=previous)
        print(f"[peer {a.rank}] joined at outer step {d.outer_step} (inner step {d.inner_step}), world {d.world}", flush=True)
        return d

    if a.wait_go:
        print(f"[peer {a.rank}] ready; waiting for the launcher's go", flush=True)
        sys.stdin.readline()
    d = join()
    print(f"[peer {a.rank}] held-out loss of the outer parameters at the start: {eval_loss(d):.4f}", flush=True)
    losses: List[float] = []
    while d.inner_step < a.steps:
        x, y = batch(train, 32, gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        try:
            rep = d.step()
        except pccl.diloco.RejoinRequired as e:
            print(f"[peer {a.rank}] rejoining: {e}", flush=True)
            d = join(d)
            continue
        if rep is not None:
            recent = losses[-a.sync_every :]
            print(
                f"[peer {a.rank}] outer {rep.outer_step:4d}  inner {d.inner_step:5d}  loss {sum(recent) / len(recent):.4f}"
                f"  world {rep.world}  tx {rep.tx_bytes} B  rx {rep.rx_bytes} B  hidden {rep.hidden_seconds:.3f} s"
                f"  (comm {rep.comm_seconds:.3f} s, exposed {rep.exposed_seconds:.3f} s)",
                flush=True,
            )
        if a.step_time:
            time.sleep(a.step_time)  # stands in for a bigger model's compute
    d.close()  # async/streaming: applies the reduce still in flight (every peer does the same)
    print(
        f"[peer {a.rank}] final outer {d.outer_step} inner {d.inner_step} held-out loss {eval_loss(d):.4f} "
        f"hash {d.state_hash()}",
        flush=True,
    )
    d.communicator.close()
    return 0


# ---------------------------------------------------------------------------
# launcher: embedded master + peers, one killed, one added
# ---------------------------------------------------------------------------


class Child:
    def __init__(self, rank: int, a: argparse.Namespace, master: str, wait_go: bool = False) -> None:
        self.rank = rank
        self.outer = 0
        self.final: Optional[str] = None
        self.start_loss: Optional[float] = None
        self.final_loss: Optional[float] = None
        argv = [sys.executable, os.path.abspath(__file__), "peer", "--master", master, "--rank", str(rank)]
        argv += ["--mode", a.mode, "--quant", a.quant, "--steps", str(a.steps), "--sync-every", str(a.sync_every)]
        argv += ["--step-time", str(a.step_time), "--min-world", str(a.peers)]
        for flag, v in (("--outer-lr", a.outer_lr), ("--outer-momentum", a.outer_momentum)):
            argv += [flag, str(v)] if v is not None else []
        argv += ["--wait-go"] if wait_go else []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("PCCL_PEER_PORT_BASE", "0")  # any free ports: several peers on one machine
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE if wait_go else subprocess.DEVNULL, text=True, env=env
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "outer":
                try:
                    self.outer = int(parts[3])
                except ValueError:
                    pass
            if "at the start:" in line:
                self.start_loss = float(parts[-1])
            if len(parts) >= 3 and parts[2] == "final":
                self.final = parts[-1]
                self.final_loss = float(parts[parts.index("loss") + 1])


def launch(a: argparse.Namespace) -> int:
    master = pccl.MasterNode("127.0.0.1:0")
    master.run()
    print(f"--- launcher: master listening on {master.listen_address}", flush=True)
    children: List[Child] = []
    killed: Dict[int, bool] = {}
    late: Optional[Child] = None
    try:
        children = [Child(r, a, master.listen_address) for r in range(a.peers)]
        if a.join_at is not None:
            late = Child(a.peers, a, master.listen_address, wait_go=True)  # imports overlap the others' run
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline:
            progress = max((c.outer for c in children if c.proc.poll() is None), default=0)
            if a.kill_at is not None and progress >= a.kill_at and not killed and a.peers > 1:
                victim = children[-1]
                print(f"--- launcher: killing peer {victim.rank} (SIGKILL) at outer step {progress}", flush=True)
                victim.proc.send_signal(signal.SIGKILL)
                killed[victim.rank] = True
            if late is not None and progress >= a.join_at:
                print(f"--- launcher: adding peer {late.rank} at outer step {progress}", flush=True)
                late.go()
                children.append(late)
                late = None
            if all(c.proc.poll() is not None for c in children if c.rank not in killed):
                break
            time.sleep(0.05)
        else:
            print("--- launcher: timed out", flush=True)
            return 1
        survivors = [c for c in children if c.rank not in killed]
        for c in survivors:
            c.reader.join(5)
        failed = [c.rank for c in survivors if c.proc.returncode != 0 or c.final is None]
        if failed:
            print(f"--- launcher: peers {failed} failed", flush=True)
            return 1
        hashes = {c.final for c in survivors}
        if len(hashes) != 1:
            print(f"--- launcher: FINAL STATE HASHES DIFFER: {[(c.rank, c.final) for c in survivors]}", flush=True)
            return 1
        first = next(c.start_loss for c in survivors if c.start_loss is not None)
        last = survivors[0].final_loss
        print(
            f"--- launcher: final state hashes agree across {len(survivors)} surviving peers ({hashes.pop()[:16]}); "
            f"held-out loss {first:.4f} -> {last:.4f}",
            flush=True,
        )
        if not last < first:
            print("--- launcher: the model did not learn", flush=True)
            return 1
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
    ap.add_argument("role", nargs="?", choices=["launch", "peer"], default="launch")
    ap.add_argument("--mode", choices=sorted(pccl.diloco.MODES), default="sync", help="DiLoCo variant")
    ap.add_argument("--quant", choices=["none", "minmax", "zps"], default="none",
                    help="quantize the pseudo-gradients to u8 (with error feedback)")
    ap.add_argument("--steps", type=int, default=200, help="inner steps of the run")
    ap.add_argument("--sync-every", type=int, default=10, help="H: inner steps per outer step")
    ap.add_argument("--outer-lr", type=float, default=None, help="outer learning rate (default 0.7)")
    ap.add_argument("--outer-momentum", type=float, default=None,
                    help="outer Nesterov momentum (default 0.9)")
    ap.add_argument("--peers", type=int, default=3, help="founding peers (launch mode)")
    ap.add_argument("--kill-at", type=int, default=None, help="SIGKILL the last founding peer at this outer step")
    ap.add_argument("--join-at", type=int, default=None, help="add a peer at this outer step")
    ap.add_argument("--no-churn", action="store_true", help="neither kill nor add peers")
    ap.add_argument("--step-time", type=float, default=0.01, help="extra seconds per inner step, standing in for compute")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (launch mode)")
    ap.add_argument("--master", default="127.0.0.1:48148", help="master address (peer mode)")
    ap.add_argument("--rank", type=int, default=0, help="label for the output and the data stream (peer mode)")
    ap.add_argument("--group", type=int, default=0, help="peer group (peer mode)")
    ap.add_argument("--min-world", type=int, default=1, help="peers to wait for before the run starts (peer mode)")
    ap.add_argument("--wait-go", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "peer":
        return run_peer(a)
    outer_steps = max(1, a.steps // a.sync_every) * (2 if a.mode == "streaming" else 1)
    if a.no_churn:
        a.kill_at = a.join_at = None
    else:
        a.kill_at = a.kill_at if a.kill_at is not None else max(1, outer_steps // 4)
        a.join_at = a.join_at if a.join_at is not None else max(2, outer_steps // 2)
    return launch(a)


if __name__ == "__main__":
    sys.exit(main())
