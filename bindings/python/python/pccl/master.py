"""Run a PCCL master: ``python -m pccl.master --listen 0.0.0.0:48148`` (or ``pccl-master``).

Prints ``pccl-master listening on IP:PORT`` once the socket is bound (with
``--listen 127.0.0.1:0`` the port is picked by the kernel) and serves until
SIGINT (Ctrl-C) or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import List, Optional

from . import MasterNode, PCCLError, set_log_level


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pccl-master", description="Run the PCCL master node (coordinator).")
    parser.add_argument(
        "--listen",
        "--listen-address",
        dest="listen",
        default="0.0.0.0:48148",
        help="address to listen on, ip:port (default 0.0.0.0:48148; port 0 picks a free port)",
    )
    parser.add_argument(
        "--peer-timeout-ms",
        type=int,
        default=None,
        help="evict a peer that shows no sign of life for this long (default 5000)",
    )
    parser.add_argument("--log-level", default="info", help="native log level (error, warn, info, debug, trace)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_log_level(args.log_level)
    try:
        master = MasterNode(args.listen, peer_timeout_ms=args.peer_timeout_ms)
        master.run()
    except (PCCLError, ValueError) as e:
        print(f"pccl-master: {e}", file=sys.stderr)
        return 2

    def _shutdown(signum: int, _frame: object) -> None:
        logging.getLogger("pccl").info("received signal %d; shutting down the master", signum)
        master.interrupt()

    # Both signals just ask the master to stop; await_termination() runs the
    # handlers while it waits (without the GIL) and returns once it stopped.
    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    print(f"pccl-master listening on {master.listen_address}", flush=True)
    master.await_termination()
    master.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
