"""Broadcast, all-gather and reduce-scatter across real peer processes:
every dtype against references computed in the workers, exact bytes,
bit-identical broadcast / all-gather outputs on every peer, the async forms,
call-time errors, and Ctrl-C inside a broadcast."""

from __future__ import annotations

from conftest import numpy_or_skip, torch_or_skip


def test_numpy_collectives_exact(launcher):
    numpy_or_skip()
    world = 3
    peers = [launcher.spawn("collectives_numpy", r, world=world) for r in range(world)]
    results = [p.result(timeout=180) for p in peers]
    for r in results:
        # 11 dtypes x 5 counts x 3 roots; 11 x 4 counts; 11 x 5 ops x 4 counts.
        assert r["checked"] == {
            "broadcast": 11 * 5 * 3,
            "all_gather": 11 * 4,
            "reduce_scatter": 11 * 5 * 4,
            "async": 3,
            "errors": 3 + 10 + 2,
        }, r
    # The peers agree on the rank order, and every rank is taken once.
    assert len({tuple(r["ids"]) for r in results}) == 1, results
    assert sorted(r["ring_rank"] for r in results) == list(range(world))
    # Broadcast and all-gather outputs are bit-identical on every peer.
    assert len({r["digest"] for r in results}) == 1, results
    for p in peers:
        assert p.proc.wait(timeout=30) == 0, p.stderr_text()


def test_torch_collectives_exact(launcher):
    torch_or_skip()
    world = 2
    peers = [launcher.spawn("collectives_torch", r, world=world) for r in range(world)]
    results = [p.result(timeout=180) for p in peers]
    for r in results:
        per_dtype = 2 * (5 * world + 4 + 3 * 4)  # blocking and async
        assert r["checked"] == r["ndtypes"] * per_dtype, r
        assert r["ndtypes"] >= 9, r
    assert sorted(r["ring_rank"] for r in results) == list(range(world))
    assert len({r["digest"] for r in results}) == 1, results
    for p in peers:
        assert p.proc.wait(timeout=30) == 0, p.stderr_text()


def test_direct_algorithm_applies_to_all_reduce_only(launcher):
    """PCCL_ALGORITHM=direct on every peer: all-reduces run direct, and
    broadcast, all-gather and reduce-scatter still run, with exact results
    identical on every peer."""
    numpy_or_skip()
    world = 2
    env = {"PCCL_ALGORITHM": "direct"}
    peers = [launcher.spawn("collectives_direct", r, world=world, env=env) for r in range(world)]
    results = [p.result(timeout=90) for p in peers]
    root = next(r for r in results if r["bcast_rank"] == 0)
    by_rank = {r["gather_rank"]: r["rank"] + 1 for r in results}
    gathered = [by_rank[k] for k in range(world) for _ in range(8)]
    for r in results:
        assert r["bcast"] == [root["rank"] + 1] * 8, r
        assert r["gathered"] == gathered, r
        assert r["rs_status"] == "SUCCESS", r
        # Every peer's all-gather output is the same: each segment sums to world x it.
        seg = gathered[8 * r["rs_rank"] : 8 * r["rs_rank"] + 8]
        assert r["seg"] == [world * v for v in seg], r
        assert r["sum"] == 3, r
