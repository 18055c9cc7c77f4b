#!/usr/bin/env python3
"""Plots validation loss against bytes sent and against wall time from the
peer-0 logs that scripts/bench-diloco.sh leaves in LOG_DIR.

    python3 scripts/plot-diloco.py LOG_DIR OUT.png   (needs matplotlib)
"""
import re
import sys
from pathlib import Path


def series(path):
    """(total_tx, elapsed_s, val_loss) per outer step of one peer log."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("outer_step="):
            continue
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        out.append((int(f["total_tx"]), float(f["elapsed_s"]), float(f["val_loss"])))
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_dir, out = Path(sys.argv[1]), sys.argv[2]
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for log in sorted(log_dir.glob("*-peer0.txt")):
        name = re.sub(r"-peer0\.txt$", "", log.name)
        s = series(log)
        if not s:
            continue
        tx, t, loss = zip(*s)
        style = "--" if name.endswith("u8") else "-"
        ax_b.plot([b / 1e6 for b in tx], loss, style, marker=".", label=name)
        ax_t.plot(t, loss, style, marker=".", label=name)
    ax_b.set_xscale("log")
    ax_b.set_xlabel("MB sent per peer (log)")
    ax_t.set_xlabel("wall time (s)")
    for ax in (ax_b, ax_t):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("diloco-charlm, 4 peers on wan-emu (100 ms RTT, 100 Mbit/s)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
