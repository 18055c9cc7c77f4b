/*
 * ccoip.h - default ports of the CCoIP protocol used by PCCL.
 *
 * Part of PCCL-rs, a Rust implementation of PCCL (Prime Collective
 * Communications Library) that is source-compatible with PCCL 1.0.
 * Values match PCCL 1.0's ccoip.h. Plain C99; usable from C++.
 *
 * Only the master port is fixed (it is whatever the master was created with;
 * 48148 by convention). Each peer's listeners start at the port below and bump
 * upward until a free one is found; peers report their actual ports to the
 * master, so firewalls must allow a small range above each default.
 */
#ifndef CCOIP_H
#define CCOIP_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Port the master listens on for peers' control connections (persistent). */
#define CCOIP_PROTOCOL_PORT_MASTER 48148

/** First port a peer tries for its shared-state distribution listener
 *  (short-lived connections that carry dirty tensors peer to peer). */
#define CCOIP_PROTOCOL_PORT_SHARED_STATE 48149

/** First port a peer tries for its p2p listener (persistent connection pools
 *  to ring neighbours that carry all-reduce traffic). */
#define CCOIP_PROTOCOL_PORT_P2P 48150

/** First port a peer tries for its bandwidth-benchmark listener (short-lived
 *  connections used by pcclOptimizeTopology, one at a time). */
#define CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK 48151

#ifdef __cplusplus
} /* extern "C" (nothing but macros here) */
#endif

#endif /* CCOIP_H */
