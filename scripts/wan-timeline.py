#!/usr/bin/env python3
"""Per-connection timeline of a WAN run, from `ss -tin` samples.

bench-wan.sh (TIMELINE=1) samples `ss -tinH` in one host every ~50 ms and
writes blocks of

    @ <unix time>
    <ss lines: a socket line, then its info line>

This script keeps the connections to one destination (the ring's right
neighbour), and prints per interval: goodput (acked bytes over the interval),
how many connections moved data, how many were idle with nothing queued
(application-limited), how many had data queued but not sent, the summed
congestion window and bytes in flight, and the retransmissions. The last
lines give each connection's share of the acked bytes.

    scripts/wan-timeline.py SAMPLES --dst 10.77.0.12 [--bin-ms 100] [--from S --to S]
"""

import argparse
import re
import sys
from collections import defaultdict

FIELD = re.compile(r"(\w+):(\S+)")


def parse(path, dst):
    """Yields (t, {local_port: info dict})."""
    t = None
    socks = {}
    pending = None
    with open(path) as f:
        for line in f:
            if line.startswith("@ "):
                if t is not None:
                    yield t, socks
                t = float(line[2:])
                socks = {}
                pending = None
                continue
            if not line.startswith((" ", "\t")):
                parts = line.split()
                # Recv-Q Send-Q Local Peer (state filtered by ss already).
                if len(parts) >= 4 and parts[3].rsplit(":", 1)[0] == dst:
                    pending = (parts[2].rsplit(":", 1)[1], int(parts[1]))
                else:
                    pending = None
                continue
            if pending is None:
                continue
            port, sendq = pending
            info = {k: v for k, v in FIELD.findall(line)}
            info["sendq"] = sendq
            socks[port] = info
            pending = None
    if t is not None:
        yield t, socks


def num(info, key, default=0):
    v = info.get(key)
    if v is None:
        return default
    try:
        return int(v.split("/")[0].split(",")[0])
    except ValueError:
        try:
            return float(v.split("/")[0])
        except ValueError:
            return default


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("--dst", required=True, help="destination IP of the connections to follow")
    ap.add_argument("--bin-ms", type=float, default=100.0)
    ap.add_argument("--from", dest="t_from", type=float, default=None, help="seconds after the first sample")
    ap.add_argument("--to", dest="t_to", type=float, default=None)
    a = ap.parse_args()

    samples = list(parse(a.samples, a.dst))
    if not samples:
        sys.exit(f"no samples in {a.samples}")
    t0 = samples[0][0]
    prev = {}
    bins = defaultdict(lambda: defaultdict(float))
    share = defaultdict(int)
    for t, socks in samples:
        rel = t - t0
        if a.t_from is not None and rel < a.t_from:
            prev = socks
            continue
        if a.t_to is not None and rel > a.t_to:
            break
        b = int(rel * 1000 // a.bin_ms)
        row = bins[b]
        row["n"] += 1
        for port, info in socks.items():
            acked = num(info, "bytes_acked")
            p = prev.get(port)
            d = acked - num(p, "bytes_acked") if p else 0
            if d < 0:
                d = 0
            row["acked"] += d
            share[port] += d
            mss = num(info, "mss", 1448)
            unacked = num(info, "unacked")
            notsent = num(info, "notsent")
            row["cwnd_bytes"] += num(info, "cwnd") * mss
            row["inflight"] += unacked * mss
            row["notsent"] += notsent
            row["retrans"] += (num(info, "bytes_retrans") - num(p, "bytes_retrans")) if p else 0
            if d > 0:
                row["moving"] += 1
            elif unacked == 0 and notsent == 0 and info["sendq"] == 0:
                row["idle"] += 1
            elif notsent > 0:
                row["blocked"] += 1
            row["conns"] = max(row["conns"], len(socks))
        prev = socks

    print(f"# {a.samples}: connections to {a.dst}, {len(samples)} samples, bins of {a.bin_ms:.0f} ms")
    print(f"{'t_s':>6} {'Mbit/s':>7} {'conns':>5} {'moving':>6} {'idle':>5} {'queued':>6} {'cwnd_KB':>8} {'inflight_KB':>11} {'notsent_KB':>10} {'retrans_KB':>10}")
    for b in sorted(bins):
        row = bins[b]
        n = max(row["n"], 1)
        secs = a.bin_ms / 1000.0
        print(
            f"{b * secs:6.2f} {row['acked'] * 8 / secs / 1e6:7.1f} {int(row['conns']):5d} "
            f"{row['moving'] / n:6.1f} {row['idle'] / n:5.1f} {row['blocked'] / n:6.1f} "
            f"{row['cwnd_bytes'] / n / 1024:8.0f} {row['inflight'] / n / 1024:11.0f} "
            f"{row['notsent'] / n / 1024:10.0f} {row['retrans'] / 1024:10.1f}"
        )
    total = sum(share.values())
    if total:
        parts = sorted(share.values(), reverse=True)
        print(f"# acked bytes per connection, largest first (% of {total / 1e6:.1f} MB): "
              + " ".join(f"{100 * x / total:.0f}" for x in parts))


if __name__ == "__main__":
    main()
