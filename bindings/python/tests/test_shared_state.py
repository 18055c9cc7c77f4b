"""Shared-state sync across peer processes, with a peer joining late and
receiving the state (NumPy arrays; a PyTorch model's state_dict plus Adam
buffers)."""

from __future__ import annotations

from conftest import numpy_or_skip, torch_or_skip


def _check_late_joiner(peers, late, timeout):
    results = [p.result(timeout=timeout) for p in peers + [late]]
    for p in peers + [late]:
        assert p.proc.returncode == 0, p.stderr_text()
    syncs = [[e for e in p.events if e.get("event") == "sync"] for p in peers + [late]]
    by_rev = [{e["revision"]: e["digest"] for e in s} for s in syncs]
    # The newcomer's first sync hands it exactly the group's state.
    first = syncs[-1][0]
    assert first["first"]
    assert first["rx"] > 0, first
    assert by_rev[0][first["revision"]] == first["digest"]
    # From then on every peer holds identical bytes at each revision.
    common = set(by_rev[0]) & set(by_rev[1]) & set(by_rev[2])
    assert len(common) >= 5
    for rev in common:
        assert by_rev[0][rev] == by_rev[1][rev] == by_rev[2][rev], rev
    assert len({r["revision"] for r in results}) == 1
    return results


def test_numpy_shared_state_late_joiner(launcher):
    numpy_or_skip()
    peers = [launcher.spawn("shared_numpy", r, world=3) for r in range(2)]
    peers[0].wait_event(lambda e: e.get("event") == "sync" and e["revision"] >= 3, timeout=60)
    late = launcher.spawn("shared_numpy", 2, world=3, late=True, receive_only_first=True)
    results = _check_late_joiner(peers, late, timeout=90)
    # counter advanced once per revision, on every peer (the newcomer got it by sync)
    assert len({r["counter"] for r in results}) == 1


def test_torch_model_and_optimizer_late_joiner(launcher):
    torch_or_skip()
    peers = [launcher.spawn("shared_torch", r, world=3) for r in range(2)]
    peers[0].wait_event(lambda e: e.get("event") == "sync" and e["revision"] >= 2, timeout=90)
    late = launcher.spawn("shared_torch", 2, world=3, late=True)
    _check_late_joiner(peers, late, timeout=120)


def test_sync_progress_callback_reports_increasing_bytes(master):
    """``on_sync_progress`` (extension): a newcomer's fetch calls it with
    byte counts that never decrease, then once with ``done`` and every byte."""
    import threading

    import pccl

    np = numpy_or_skip()
    n = 64 << 20
    reports = []
    holder = pccl.Communicator(master.listen_address, shared_state_port=0, p2p_port=0, benchmark_port=0)
    holder.connect()
    newcomer = pccl.Communicator(
        master.listen_address,
        shared_state_port=0,
        p2p_port=0,
        benchmark_port=0,
        on_sync_progress=reports.append,
        progress_interval_s=0.001,
    )
    joined = threading.Thread(target=newcomer.connect)
    joined.start()
    while holder.get_attribute(pccl.Attribute.GLOBAL_WORLD_SIZE) < 2:
        if holder.are_peers_pending():
            holder.update_topology()
    joined.join()

    src = (np.arange(n, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    s_holder = pccl.SharedState([pccl.TensorInfo.from_numpy(src, "x")])
    s_holder.revision = 1
    s_new = pccl.SharedState([pccl.TensorInfo.from_numpy(dst, "x")])
    t = threading.Thread(target=holder.sync_shared_state, args=(s_holder,))
    t.start()
    newcomer.sync_shared_state(s_new)
    t.join()
    assert (dst == src).all()
    assert len(reports) >= 2, reports
    assert all(isinstance(r, pccl.SyncProgress) for r in reports)
    assert all(b.received_bytes >= a.received_bytes for a, b in zip(reports, reports[1:])), reports
    last = reports[-1]
    assert last.done and last.received_bytes == n and last.total_bytes == n
    assert sum(r.done for r in reports) == 1
    assert last.bytes_per_sec > 0 and last.eta_s == 0
    newcomer.close()
    holder.close()
