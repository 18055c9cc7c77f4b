/*
 * pccl.h - C API of PCCL-rs (libpccl).
 *
 * PCCL-rs is a Rust implementation of PCCL, the Prime Collective
 * Communications Library: fault-tolerant collective communication for training
 * across the public internet. This header is source-compatible with PCCL 1.0's
 * pccl.h: every type, enumerator value, struct member order and function
 * signature of PCCL 1.0 is kept, so a program written against PCCL 1.0
 * compiles unchanged. Additions are marked "Extension" and all carry the
 * `pccl` prefix; they never change the meaning of the PCCL 1.0 calls.
 *
 * Plain C99 (also valid C++; declarations are extern "C").
 *
 * Conventions that hold for every function below
 * ----------------------------------------------
 *  - Every function returns a pcclResult_t. No function crashes on bad input:
 *    a required pointer that is NULL, an unknown enumerator value or an
 *    inconsistent argument yields pcclInvalidArgument; calling at the wrong
 *    point of the lifecycle yields pcclInvalidUsage. pcclInternalError means a
 *    bug in the library (an internal panic is caught and reported this way; it
 *    never unwinds into the caller).
 *  - On failure, output pointers are left unchanged unless stated otherwise,
 *    and pcclGetLastErrorString() describes the cause.
 *  - pcclInit() must have succeeded before any communicator function is used;
 *    until then those functions return pcclNotInitialized. The master
 *    functions (pcclCreateMaster ... pcclDestroyMaster, pcclSetMasterPeerTimeout),
 *    pcclGetBuildInfo and the extension helpers pcclGetLastErrorString,
 *    pcclGetResultString and pcclSetLogLevel work without pcclInit, as in
 *    PCCL 1.0.
 *  - A communicator is used by one thread at a time: calls on the same
 *    communicator must not overlap in time. A call that would overlap another
 *    call on the same communicator returns pcclInvalidUsage and changes
 *    nothing. Distinct communicators and master instances are independent and
 *    may be used from different threads.
 *  - Handles (pcclComm_t *, pcclMasterInstance_t *) are looked up in the
 *    library's table of live handles and never dereferenced: NULL, a handle
 *    that was already destroyed (e.g. destroyed twice) or a pointer the
 *    library did not create yields pcclInvalidArgument, not a crash. (The
 *    address of a destroyed handle may be reused by a later create; a stale
 *    pointer with that address then names the new object.)
 *  - Collective calls (marked "Collective") must be made by every peer they
 *    name; the master moves those peers forward together. They block until
 *    that happens, until the call fails on this peer, or until the peer
 *    liveness timeout declares an unresponsive peer dead (see
 *    pcclSetCommunicatorTimeouts). When a peer dies or disconnects during a
 *    collective, the call fails promptly on every survivor with
 *    pcclRankConnectionLost; retrying with the remaining peers succeeds.
 *  - If the connection to the master is lost, every later collective call on
 *    that communicator returns pcclMasterConnectionFailed; only
 *    pcclDestroyCommunicator remains useful.
 */
#ifndef PCCL_H
#define PCCL_H

#include "ccoip_inet.h"

#include <stddef.h>
#include <stdint.h>
#ifndef __cplusplus
#include <stdbool.h>
#endif

/*
 * PCCL_EXPORT marks the functions exported by libpccl. Define PCCL_EXPORT
 * yourself before including this header to override it; on Windows define
 * PCCL_STATIC when linking the static library.
 */
#ifndef PCCL_EXPORT
#if defined(_WIN32) || defined(__CYGWIN__)
#if defined(PCCL_STATIC)
#define PCCL_EXPORT
#else
#define PCCL_EXPORT __declspec(dllimport)
#endif
#elif defined(__GNUC__) || defined(__clang__)
#define PCCL_EXPORT __attribute__((visibility("default")))
#else
#define PCCL_EXPORT
#endif
#endif

/* Marks a pointer parameter that may be NULL (documentation only, as in PCCL 1.0). */
#ifndef PCCL_NULLABLE
#define PCCL_NULLABLE /* nothing */
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------- */
/* Enumerations                                                              */
/* ------------------------------------------------------------------------- */

/** Result of every PCCL call. */
typedef enum pcclResult_t {
    pcclSuccess = 0,
    /** pcclInit() has not been called (successfully) yet. */
    pcclNotInitialized = 1,
    /** A bug or unexpected condition inside the library. */
    pcclInternalError = 2,
    /** A pointer, enumerator value or size argument is invalid. */
    pcclInvalidArgument = 3,
    /** The call is not allowed in the current state (e.g. not connected). */
    pcclInvalidUsage = 4,
    /** The operation needs at least two peers in the peer group. */
    pcclTooFewPeers = 5,
    /** The master could not be reached, rejected this peer, or was lost. */
    pcclMasterConnectionFailed = 6,
    /** A connection to another peer could not be established. */
    pcclRankConnectionFailed = 7,
    /** A peer taking part in the operation died or disconnected. */
    pcclRankConnectionLost = 8,
    /** No peer can provide the shared-state content this peer needs. */
    pcclNoSharedStateAvailable = 9,
    /** Asynchronous all-reduces are still in flight; await them first. */
    pcclPendingAsyncOps = 10,
    /** Admitting new peers / rewiring the ring failed; the call may be retried. */
    pcclUpdateTopologyFailed = 11,
    /** Measuring bandwidth or applying an optimized ring failed. */
    pcclTopologyOptimizationFailed = 12
} pcclResult_t;

/** Element type of a buffer. */
typedef enum pcclDataType_t {
    pcclUint8 = 0,
    pcclInt8 = 1,
    pcclInt16 = 2,
    pcclUint16 = 3,
    pcclUint32 = 4,
    pcclInt32 = 5,
    pcclUint64 = 6,
    pcclInt64 = 7,
    /** IEEE 754 binary16. */
    pcclFloat16 = 8,
    /** bfloat16 (the upper half of an IEEE 754 binary32). */
    pcclBFloat16 = 9,
    /** IEEE 754 binary32. */
    pcclFloat = 10,
    /** IEEE 754 binary64. */
    pcclDouble = 11
} pcclDataType_t;

/** Where a shared-state tensor's memory lives. */
typedef enum pcclDeviceType_t {
    pcclDeviceCpu = 0,
    /** CUDA device memory. Not supported yet, in any build (has_cuda_support
     *  is false, with or without the cuda cargo feature): a tensor info with
     *  pcclDeviceCuda is rejected with pcclInvalidArgument. */
    pcclDeviceCuda = 1
} pcclDeviceType_t;

/** Reduction operation of an all-reduce. */
typedef enum pcclRedOp_t {
    pcclSum = 0,
    /** Sum divided by the number of peers that took part. */
    pcclAvg = 1,
    pcclProd = 2,
    pcclMax = 3,
    pcclMin = 4
} pcclRedOp_t;

/** Communicator attributes readable with pcclGetAttribute. */
typedef enum pcclAttribute_t {
    /** Number of accepted peers in the run, all peer groups together. */
    PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE = 1,
    /** Number of accepted peers in this peer's peer group. */
    PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE = 2,
    /** Number of distinct peer groups in the run. */
    PCCL_ATTRIBUTE_NUM_DISTINCT_PEER_GROUPS = 3,
    /** Number of peers in the largest peer group. */
    PCCL_ATTRIBUTE_LARGEST_PEER_GROUP_WORLD_SIZE = 4
} pcclAttribute_t;

/** How a peer takes part in pcclSynchronizeSharedState. */
typedef enum pcclSharedStateSyncStrategy_t {
    /** Vote with this peer's content; send to and receive from others as
     *  needed so that every peer ends with the most popular content. All
     *  peers of a sync using this strategy must use it. */
    PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR = 0,
    /** Never send, never vote: receive the popular content. */
    PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY = 1,
    /** Never receive: this peer's content must already be the popular one
     *  (otherwise the call fails); others may fetch from it. */
    PCCL_SHARED_STATE_SYNC_STRATEGY_SEND_ONLY = 2
} pcclSharedStateSyncStrategy_t;

/** Hint about the distribution of the values being reduced. */
typedef enum pcclDistributionHint_t {
    pcclDistributionNone = 0,
    pcclDistributionNormal = 1,
    pcclDistributionUniform = 2
} pcclDistributionHint_t;

/** Quantization applied to all-reduce traffic.
 *
 *  Accepted combinations (anything else is pcclInvalidArgument):
 *  - source pcclFloat16, pcclBFloat16, pcclFloat or pcclDouble, quantized to
 *    pcclUint8, pcclInt8, pcclUint16 or pcclInt16 strictly narrower than the
 *    source (so 16-bit sources take 8-bit codes only), with pcclQuantMinMax
 *    or pcclQuantZeroPointScale;
 *  - as in PCCL 1.0, source pcclFloat or pcclDouble quantized to pcclUint32
 *    or pcclUint64 with pcclQuantMinMax (even pcclUint64 codes of pcclFloat,
 *    which are twice the source's size). These blocks are coded in double
 *    precision: 2^32 - 1 steps for pcclUint32, 2^53 - 1 for pcclUint64 (a
 *    double resolves no more), so they are nearly lossless.
 *  The op must not be pcclProd. Every peer ends with bit-identical results. */
typedef enum pcclQuantizationAlgorithm_t {
    /** No quantization; quantized_datatype is ignored. */
    pcclQuantNone = 0,
    /** Linear map of [min, max] onto the quantized integer type's range. */
    pcclQuantMinMax = 1,
    /** Zero point plus scale onto the quantized integer type. */
    pcclQuantZeroPointScale = 2
} pcclQuantizationAlgorithm_t;

/** Extension: verbosity of the library's log (see pcclSetLogLevel). */
typedef enum pcclLogLevel_t {
    pcclLogOff = 0,
    pcclLogError = 1,
    pcclLogWarn = 2,
    pcclLogInfo = 3,
    pcclLogDebug = 4,
    pcclLogTrace = 5
} pcclLogLevel_t;

/** Extension: how an all-reduce moves its data (see pcclSetAllReduceAlgorithm). */
typedef enum pcclAlgorithm_t {
    /** The master chooses: the relay for tiny all-reduces (at most 4 KiB
     *  per peer), the one-hop direct algorithm for small ones (groups of at
     *  most 16 peers), the ring otherwise. */
    pcclAlgorithmAuto = 0,
    /** Reduce-scatter then all-gather around the ring: bandwidth-optimal,
     *  2(w-1) hops of latency. */
    pcclAlgorithmRing = 1,
    /** Every peer sends its whole buffer to every other peer and reduces all
     *  contributions in rank order: one hop, (w-1) times the bytes.
     *  All-reduce only. */
    pcclAlgorithmDirect = 2,
    /** Every peer's buffer rides in its request to the master, which hands
     *  all of them back; every peer reduces them in rank order. One round
     *  trip to the master in all. Unquantized all-reduces of at most 4096
     *  bytes per peer (64 KiB in all) only; larger ones are
     *  pcclInvalidArgument. */
    pcclAlgorithmRelay = 3
} pcclAlgorithm_t;

/* ------------------------------------------------------------------------- */
/* Structures                                                                */
/* ------------------------------------------------------------------------- */

/** Parameters of pcclCreateCommunicator. */
typedef struct pcclCommCreateParams_t {
    /** Address of the master to connect to. */
    ccoip_socket_address_t master_address;
    /** Peer group of this peer: collectives and shared-state sync span only
     *  peers with the same value. Use 0 everywhere for a single group. */
    uint32_t peer_group;
    /** Connections per ring neighbour, striped by all-reduce traffic and
     *  shared by concurrent async all-reduces. 0 means 1. */
    uint32_t p2p_connection_pool_size;
} pcclCommCreateParams_t;

/** Opaque communicator handle (created by pcclCreateCommunicator). */
typedef struct pcclComm_t pcclComm_t;

/** Opaque (reserved by PCCL 1.0; not used by any function). */
typedef struct pcclRankInfo_t pcclRankInfo_t;

/** Outcome of an all-reduce. */
typedef struct pcclReduceInfo_t {
    /** Number of peers that took part in the operation. */
    uint32_t local_world_size;
    /** Bytes this peer sent for the operation. */
    uint64_t tx_bytes;
    /** Bytes this peer received for the operation. */
    uint64_t rx_bytes;
} pcclReduceInfo_t;

/** Type and value distribution of the all-reduce operands. */
typedef struct pcclReduceOperandDescriptor_t {
    pcclDataType_t datatype;
    pcclDistributionHint_t distribution_hint;
} pcclReduceOperandDescriptor_t;

/** Quantization of all-reduce traffic. */
typedef struct pcclQuantizationOptions_t {
    /** Integer type values are quantized to on the wire (ignored when
     *  algorithm is pcclQuantNone). */
    pcclDataType_t quantized_datatype;
    pcclQuantizationAlgorithm_t algorithm;
} pcclQuantizationOptions_t;

/** What an all-reduce reduces. */
typedef struct pcclReduceDescriptor_t {
    /** Number of elements (not bytes) in each of the send and receive buffers; > 0. */
    size_t count;
    pcclRedOp_t op;
    /** Identifies the operation: every peer uses the same tag for the same
     *  all-reduce, and concurrent async all-reduces use distinct tags. */
    uint64_t tag;
    pcclReduceOperandDescriptor_t src_descriptor;
    pcclQuantizationOptions_t quantization_options;
} pcclReduceDescriptor_t;

/** One entry of pcclAllReduceMultipleWithRetry. */
typedef struct pcclReduceSingleDescriptor_t {
    void *sendbuf;
    void *recvbuf;
    pcclReduceDescriptor_t descriptor;
} pcclReduceOpDescriptor_t;

/** Handle of an async all-reduce, filled by pcclAllReduceAsync. */
typedef struct pcclAsyncReduceOp_t {
    pcclComm_t *comm;
    uint64_t tag;
} pcclAsyncReduceOp_t;

/** Extension: outcome of a broadcast, all-gather or reduce-scatter (see
 *  pcclBroadcast, pcclAllGather, pcclReduceScatter, pcclAwaitAsyncCollective). */
typedef struct pcclCollectiveInfo_t {
    /** Number of peers that took part in the operation. */
    uint32_t world_size;
    /** This peer's rank in the operation, 0 .. world_size-1: its position in
     *  the master's ring, which orders all-gather output and reduce-scatter
     *  segments and names broadcast roots. Ranks stay the same until the next
     *  pcclUpdateTopology or pcclOptimizeTopology, or a peer loss. */
    uint32_t rank;
    /** Bytes this peer wrote to the network for the operation (headers included). */
    uint64_t tx_bytes;
    /** Bytes this peer read from the network for the operation (headers included). */
    uint64_t rx_bytes;
    /** The algorithm the master chose (pcclAlgorithmRing for every broadcast,
     *  all-gather and reduce-scatter; for an all-reduce awaited with
     *  pcclAwaitAsyncCollective, Ring or Direct). */
    pcclAlgorithm_t algorithm;
} pcclCollectiveInfo_t;

/** Unique identity of a peer (never reused, unlike ring positions). */
typedef struct pcclRankUuid_t {
    uint8_t data[16];
} pcclRankUuid_t;

/** One named tensor of a shared state. The memory stays owned by the caller. */
typedef struct pcclTensorInfo_t {
    /** NUL-terminated name, unique within the shared state; the same tensor
     *  has the same name on every peer. */
    const char *name;
    /** count elements of datatype; may be NULL only when count is 0. */
    void *data;
    size_t count;
    pcclDataType_t datatype;
    pcclDeviceType_t device_type;
    /** If true, peers may keep different contents for this tensor: it is
     *  hashed and reported but never forced to agree. */
    bool allow_content_inequality;
} pcclTensorInfo_t;

/** A shared state: a revision counter plus an array of tensors. */
typedef struct pcclSharedState_t {
    /** Must be one more than at the previous successful sync of this peer;
     *  updated by pcclSynchronizeSharedState (a newcomer adopts the group's). */
    uint64_t revision;
    /** Number of entries in infos. */
    size_t count;
    /** count tensor descriptions; may be NULL only when count is 0. */
    pcclTensorInfo_t *infos;
} pcclSharedState_t;

/** Outcome of a shared-state sync. */
typedef struct pcclSharedStateSyncInfo_t {
    /** Bytes of tensor data this peer sent to others. */
    uint64_t tx_bytes;
    /** Bytes of tensor data this peer received from others. */
    uint64_t rx_bytes;
} pcclSharedStateSyncInfo_t;

/** Opaque master instance handle (created by pcclCreateMaster). */
typedef struct pcclMasterInstanceState_t pcclMasterInstance_t;

/** Build properties of the loaded library. */
typedef struct pcclBuildInfo_t {
    /** Whether CUDA device buffers are accepted (pcclDeviceCuda). Always
     *  false: there is no CUDA code yet, so even a build with the cuda cargo
     *  feature reports false and rejects pcclDeviceCuda. */
    bool has_cuda_support;
} pcclBuildInfo_t;

/* ------------------------------------------------------------------------- */
/* Library                                                                   */
/* ------------------------------------------------------------------------- */

/**
 * Initializes the library. Must succeed before communicator functions are used.
 *
 * Idempotent and thread-safe: later calls return pcclSuccess and do nothing.
 * Blocks only while the library's internal runtime starts; no network access.
 *
 * @return pcclSuccess on success (or if already initialized).
 * @return pcclInternalError if the internal runtime could not be started.
 */
PCCL_EXPORT pcclResult_t pcclInit(void);

/* ------------------------------------------------------------------------- */
/* Communicator                                                              */
/* ------------------------------------------------------------------------- */

/**
 * Creates an unconnected communicator. Does not block and does not touch the
 * network; connect it with pcclConnect.
 *
 * @param params Creation parameters; must not be NULL. Copied; the caller may
 *        free it after the call.
 * @param comm_out Receives the new communicator; must not be NULL. Set to NULL
 *        on failure. Free it with pcclDestroyCommunicator.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a pointer is NULL, or master_address has an
 *         unknown protocol or port 0.
 */
PCCL_EXPORT pcclResult_t pcclCreateCommunicator(const pcclCommCreateParams_t *params,
                                                pcclComm_t **comm_out);

/**
 * Reads an attribute of a connected communicator. Does not block: the value is
 * the one known after this peer's last collective membership call (pcclConnect,
 * pcclUpdateTopology) or the last failure that removed a peer.
 *
 * @param communicator The communicator; must not be NULL.
 * @param attribute Which attribute to read.
 * @param p_attribute_out Receives the value; must not be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a pointer is NULL or the attribute is unknown.
 * @return pcclInvalidUsage if the communicator is not connected.
 */
PCCL_EXPORT pcclResult_t pcclGetAttribute(const pcclComm_t *communicator, pcclAttribute_t attribute,
                                          int *p_attribute_out);

/**
 * Destroys a communicator. If it is connected, this peer leaves the run
 * gracefully (the other peers see it as gone). Async all-reduces still in
 * flight are aborted. Blocks until every background task of the communicator
 * has stopped and no longer touches caller memory (bounded by the connect
 * timeout), so caller buffers may be freed once it returns.
 *
 * After this call the communicator pointer, and every pcclAsyncReduceOp_t that
 * refers to it, are invalid, whatever the result (except pcclInvalidUsage).
 *
 * @param communicator The communicator; must not be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if communicator is NULL or not a live
 *         communicator (e.g. destroyed already).
 * @return pcclInvalidUsage if another call on the communicator is in progress
 *         on another thread; nothing is destroyed then.
 */
PCCL_EXPORT pcclResult_t pcclDestroyCommunicator(pcclComm_t *communicator);

/**
 * Connects to the master and joins the run. Blocks until the master has
 * registered this peer and the already accepted peers have admitted it in a
 * pcclUpdateTopology call (the first peer of a run is accepted at once), with
 * all ring connections established. May block for a long time, depending on
 * how often the existing peers call pcclUpdateTopology. Unless admitted at
 * once, it says so on stderr at the default log level (one line naming the
 * master and what it waits for, then one every 3 seconds, then one when
 * admitted; PCCL_LOG=warn or pcclSetLogLevel(pcclLogWarn) silences them).
 *
 * On failure the communicator is left unconnected and pcclConnect may be
 * called again.
 *
 * @param communicator The communicator; must not be NULL.
 *
 * @return pcclSuccess once this peer is accepted.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if communicator is NULL.
 * @return pcclInvalidUsage if the communicator is already connected.
 * @return pcclMasterConnectionFailed if the master cannot be reached within
 *         the connect timeout, rejects this peer, or is lost while waiting.
 * @return pcclRankConnectionFailed if connections to the ring neighbours
 *         could not be established.
 */
PCCL_EXPORT pcclResult_t pcclConnect(pcclComm_t *communicator);

/**
 * Collective (all accepted peers, all peer groups). Admits pending peers and
 * (re)connects ring neighbours as the master directs. Blocks until every
 * accepted peer has made the call and every required connection is up.
 *
 * @param communicator The communicator; must not be NULL.
 *
 * @return pcclSuccess once the new topology is in place.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if communicator is NULL.
 * @return pcclInvalidUsage if the communicator is not connected.
 * @return pcclPendingAsyncOps if async all-reduces are still in flight on this
 *         communicator (await them first); nothing is changed.
 * @return pcclUpdateTopologyFailed if connections to new neighbours could not
 *         be established or a peer was lost during the update; the call may
 *         be retried.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclUpdateTopology(pcclComm_t *communicator);

/**
 * Collective (all accepted peers, all peer groups). Tells whether any peer is
 * waiting to be admitted, so a training loop can skip pcclUpdateTopology
 * cheaply. Blocks until every accepted peer has made the call. Unlike other
 * collectives it may be called while async all-reduces are in flight.
 *
 * @param communicator The communicator; must not be NULL.
 * @param pending_out Receives true if peers are pending; must not be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a pointer is NULL.
 * @return pcclInvalidUsage if the communicator is not connected.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclArePeersPending(const pcclComm_t *communicator, bool *pending_out);

/**
 * Collective (all accepted peers, all peer groups). Measures the bandwidth of
 * peer pairs not measured yet, lets the master compute a ring order that
 * maximizes the slowest link, and rewires the ring. Blocks until every
 * accepted peer has made the call, the measurements are done and the new
 * ring's connections are up.
 *
 * @param communicator The communicator; must not be NULL.
 *
 * @return pcclSuccess if the topology was optimized or left unchanged.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if communicator is NULL.
 * @return pcclInvalidUsage if the communicator is not connected or is the
 *         only peer of the run (as in PCCL 1.0).
 * @return pcclPendingAsyncOps if async all-reduces are still in flight.
 * @return pcclTopologyOptimizationFailed if measuring or rewiring failed
 *         (e.g. a peer was lost); the previous ring stays in use.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclOptimizeTopology(const pcclComm_t *communicator);

/* ------------------------------------------------------------------------- */
/* All-reduce                                                                */
/* ------------------------------------------------------------------------- */

/**
 * Collective (accepted peers of this peer group, same tag). All-reduces
 * descriptor->count elements and blocks until the result is in recvbuff or
 * the operation failed. The set of peers is fixed when the operation starts.
 * On success every participant's recvbuff holds the same bytes.
 *
 * Buffers must be host memory: no build supports CUDA device memory yet
 * (pcclGetBuildInfo reports has_cuda_support false). The library cannot
 * tell a device pointer from a host pointer here, because a raw buffer
 * carries no device type: passing one is undefined behaviour (it would be
 * read as host memory), not an error code. sendbuff == recvbuff (in place)
 * is allowed; other overlap is not. sendbuff is never written unless it is
 * recvbuff. On failure a separate recvbuff has unspecified contents. An
 * in-place buffer is restored on failure: it holds the input again, byte for
 * byte, so a retry reduces the original data. The operation saves each range
 * right before it first overwrites it, so restoring costs up to one more copy
 * of the buffer by the end of the operation, and nothing for ranges not yet
 * written. With the environment variable PCCL_IN_PLACE_RESTORE=0 (read when
 * the communicator is created) nothing is saved: peak memory is the buffer
 * itself plus the sub-chunks in flight, and an in-place operation that fails
 * after it began writing returns pcclRankConnectionLost with the buffer's
 * contents unspecified (one that fails before returns it untouched).
 *
 * @param sendbuff Input, count elements; must not be NULL.
 * @param recvbuff Output, count elements; must not be NULL.
 * @param descriptor Count, op, tag, datatype, quantization; must not be NULL.
 * @param communicator The communicator; must not be NULL.
 * @param reduce_info_out May be NULL; written only on success.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a required pointer is NULL, count is 0, the
 *         byte size overflows, an enumerator is unknown, the quantization
 *         combination is unsupported, the buffers partially overlap, or the
 *         tag is already used by an in-flight async all-reduce.
 * @return pcclInvalidUsage if the communicator is not connected.
 * @return pcclTooFewPeers if the peer group has fewer than two accepted peers.
 * @return pcclRankConnectionLost if a participating peer died or disconnected
 *         (or stopped making progress past the liveness timeout); retrying
 *         with the remaining peers succeeds.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclAllReduce(const void *sendbuff, void *recvbuff,
                                       const pcclReduceDescriptor_t *descriptor,
                                       const pcclComm_t *communicator,
                                       pcclReduceInfo_t *PCCL_NULLABLE reduce_info_out);

/**
 * Collective (accepted peers of this peer group, same tag). Starts an
 * all-reduce and returns without waiting for it; complete it with
 * pcclAwaitAsyncReduce. Several async all-reduces with distinct tags may be in
 * flight at once. Until they are awaited, further all-reduces (distinct tags),
 * pcclArePeersPending and pcclGetAttribute may be called on the communicator;
 * pcclUpdateTopology, pcclOptimizeTopology and pcclSynchronizeSharedState
 * return pcclPendingAsyncOps.
 *
 * Does not block on the network. Both buffers must stay valid, sendbuff
 * unmodified and recvbuff unread, until pcclAwaitAsyncReduce returns.
 * Arguments and buffer rules are those of pcclAllReduce.
 *
 * @param sendbuff Input, count elements; must not be NULL.
 * @param recvbuff Output, count elements; must not be NULL.
 * @param descriptor Count, op, tag, datatype, quantization; must not be NULL.
 * @param communicator The communicator; must not be NULL.
 * @param reduce_handle_out Receives the handle; must not be NULL.
 *
 * @return pcclSuccess if the operation was started.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument as for pcclAllReduce, or if reduce_handle_out is NULL.
 * @return pcclInvalidUsage if the communicator is not connected.
 * @return pcclTooFewPeers if the peer group has fewer than two accepted peers.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclAllReduceAsync(const void *sendbuff, void *recvbuff,
                                            const pcclReduceDescriptor_t *descriptor,
                                            const pcclComm_t *communicator,
                                            pcclAsyncReduceOp_t *reduce_handle_out);

/**
 * Collective (accepted peers of this peer group, same descriptors). Performs
 * count all-reduces, at most max_in_flight at a time. When one fails because
 * a peer was lost, the others in flight are awaited and every unfinished
 * operation is retried with the remaining peers, until all succeed or fewer
 * than two peers remain. Blocks until then.
 *
 * Tags must be distinct. In-place descriptors (sendbuf == recvbuf) are
 * supported: a retried operation always reduces the original input (a
 * failed in-place operation restores its buffer first, see pcclAllReduce).
 * With PCCL_IN_PLACE_RESTORE=0 an in-place operation that failed after it
 * began writing cannot be retried: the call then stops and returns
 * pcclRankConnectionLost, every operation awaited, and the buffers of the
 * operations that did not succeed have unspecified contents.
 *
 * @param descriptors Array of count descriptors; must not be NULL.
 * @param count Number of descriptors; > 0.
 * @param communicator The communicator; must not be NULL.
 * @param reduce_info_out May be NULL. On success (and on pcclTooFewPeers)
 *        receives the world size after the last operation and the tx/rx
 *        bytes summed over all successful operations.
 * @param max_in_flight Maximum concurrent operations; > 0.
 *
 * @return pcclSuccess if every operation succeeded.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a pointer is NULL, count or max_in_flight is
 *         not positive, tags repeat, or a descriptor is invalid (see
 *         pcclAllReduce); nothing is started in that case.
 * @return pcclInvalidUsage if the communicator is not connected.
 * @return pcclTooFewPeers if the peer group has, or drops to, fewer than two
 *         peers; the results of unfinished operations are unspecified.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclAllReduceMultipleWithRetry(const pcclReduceOpDescriptor_t *descriptors,
                                                        size_t count,
                                                        const pcclComm_t *communicator,
                                                        pcclReduceInfo_t *PCCL_NULLABLE reduce_info_out,
                                                        int max_in_flight);

/**
 * Waits for an async all-reduce started by pcclAllReduceAsync. Blocks until
 * the operation has completed or failed; afterwards the library no longer
 * touches its buffers. Each handle is awaited once. (Extension: it also
 * accepts the handles of pcclBroadcastAsync, pcclAllGatherAsync and
 * pcclReduceScatterAsync, reporting world size and bytes; the rank is
 * reported only by pcclAwaitAsyncCollective.)
 *
 * @param reduce_handle The handle; must not be NULL, and its comm must not be NULL.
 * @param reduce_info_out May be NULL; written only on success.
 *
 * @return pcclSuccess if the all-reduce succeeded (recvbuff holds the result).
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a pointer is NULL or the handle's tag names
 *         no in-flight operation of that communicator (e.g. already awaited).
 * @return pcclInvalidUsage if the communicator is not connected.
 * @return pcclRankConnectionLost if a participating peer died or disconnected;
 *         recvbuff's contents are unspecified.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclAwaitAsyncReduce(const pcclAsyncReduceOp_t *reduce_handle,
                                              pcclReduceInfo_t *PCCL_NULLABLE reduce_info_out);

/* ------------------------------------------------------------------------- */
/* Shared state                                                              */
/* ------------------------------------------------------------------------- */

/**
 * Collective (accepted peers of this peer group). Makes this peer's shared
 * state bit-identical to the group's: revisions are checked, every tensor is
 * hashed, the master elects the most popular content, and peers that are out
 * of date or diverged fetch exactly the differing tensors from other peers and
 * verify them by hash. Blocks until this peer's state is in sync (or the call
 * failed). Works with a single peer (nothing is transferred).
 *
 * The tensors are used in place. On success shared_state->revision holds the
 * group's revision; on failure it is unchanged, tensors this peer was fetching
 * have unspecified contents, and all other tensors are untouched.
 *
 * @param communicator The communicator; must not be NULL.
 * @param shared_state The state; must not be NULL. Each entry needs a non-NULL
 *        unique name, a known datatype and device type, and non-NULL data
 *        unless its count is 0.
 * @param strategy How this peer takes part (see pcclSharedStateSyncStrategy_t).
 * @param sync_info_out May be NULL; written only on success.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a pointer is NULL, an entry is invalid (see
 *         above; pcclDeviceCuda included: no build supports it yet), names repeat,
 *         sizes overflow, or the strategy is unknown.
 * @return pcclInvalidUsage if the communicator is not connected, the revision
 *         did not advance by exactly one, a send-only peer does not hold the
 *         popular content, or a received tensor failed hash verification.
 * @return pcclPendingAsyncOps if async all-reduces are still in flight.
 * @return pcclNoSharedStateAvailable if this peer must receive content that
 *         no peer of the group can send.
 * @return pcclRankConnectionLost if a peer involved in the transfer died or
 *         disconnected; retrying succeeds with the remaining peers.
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */
PCCL_EXPORT pcclResult_t pcclSynchronizeSharedState(const pcclComm_t *communicator,
                                                    pcclSharedState_t *shared_state,
                                                    pcclSharedStateSyncStrategy_t strategy,
                                                    pcclSharedStateSyncInfo_t *PCCL_NULLABLE sync_info_out);

/* ------------------------------------------------------------------------- */
/* Master                                                                    */
/* ------------------------------------------------------------------------- */

/**
 * Creates a master instance that will listen on listen_address. Does not
 * block and does not bind yet (pcclRunMaster does). Needs no pcclInit.
 *
 * @param listen_address Address and port to listen on (e.g. 0.0.0.0:48148).
 * @param p_master_handle_out Receives the instance; must not be NULL. Set to
 *        NULL on failure. Free it with pcclDestroyMaster.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if p_master_handle_out is NULL or the address
 *         has an unknown protocol.
 */
PCCL_EXPORT pcclResult_t pcclCreateMaster(ccoip_socket_address_t listen_address,
                                          pcclMasterInstance_t **p_master_handle_out);

/**
 * Starts the master. Non-blocking: binds the listen socket, starts the
 * master's background threads and returns once it accepts connections.
 *
 * @param master_instance The instance; must not be NULL.
 *
 * @return pcclSuccess once the master is listening.
 * @return pcclInvalidArgument if master_instance is NULL.
 * @return pcclInvalidUsage if the instance was already run, or the listen
 *         address could not be bound (in use, not local, no permission).
 */
PCCL_EXPORT pcclResult_t pcclRunMaster(pcclMasterInstance_t *master_instance);

/**
 * Asks a running master to stop. Non-blocking (safe to call from another
 * thread, e.g. on a shutdown signal); pair with pcclMasterAwaitTermination.
 * Calling it again after a successful call returns pcclSuccess.
 *
 * @param master_instance The instance; must not be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if master_instance is NULL.
 * @return pcclInvalidUsage if the master was never run.
 */
PCCL_EXPORT pcclResult_t pcclInterruptMaster(pcclMasterInstance_t *master_instance);

/**
 * Waits for a running master to terminate. Blocks until pcclInterruptMaster
 * has been called (from any thread) and the master's threads have exited and
 * its connections are closed.
 *
 * @param master_instance The instance; must not be NULL.
 *
 * @return pcclSuccess once the master has terminated.
 * @return pcclInvalidArgument if master_instance is NULL.
 * @return pcclInvalidUsage if the master was never run.
 */
PCCL_EXPORT pcclResult_t pcclMasterAwaitTermination(pcclMasterInstance_t *master_instance);

/**
 * Destroys a master instance. Normally called after pcclMasterAwaitTermination;
 * a master still running is interrupted and awaited first (this then blocks
 * until it has terminated). The pointer is invalid afterwards, whatever the
 * result.
 *
 * @param master_instance The instance; must not be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if master_instance is NULL or not a live
 *         master instance (e.g. destroyed twice).
 */
PCCL_EXPORT pcclResult_t pcclDestroyMaster(pcclMasterInstance_t *master_instance);

/* ------------------------------------------------------------------------- */
/* Build information                                                         */
/* ------------------------------------------------------------------------- */

/**
 * Describes this build of the library. Does not block; needs no pcclInit.
 *
 * @param info Receives the build information; must not be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if info is NULL.
 */
PCCL_EXPORT pcclResult_t pcclGetBuildInfo(pcclBuildInfo_t *info);

/* ------------------------------------------------------------------------- */
/* Extensions (not in PCCL 1.0)                                              */
/* ------------------------------------------------------------------------- */

/**
 * Extension. Detailed, human-readable message of the last failed pccl call on
 * the calling thread, e.g. "invalid argument: descriptor.count is 0". Returns
 * "" if no call has failed on this thread. Does not block; needs no pcclInit.
 *
 * @return A NUL-terminated string owned by the library, never NULL. Valid until
 *         the next pccl call on the same thread; copy it to keep it.
 */
PCCL_EXPORT const char *pcclGetLastErrorString(void);

/**
 * Extension. Sets the verbosity of the library's log (written to stderr),
 * process-wide. Overrides the PCCL_LOG / RUST_LOG environment variables;
 * without either, the log shows warnings plus the progress lines of long
 * waits (admission in pcclConnect, long shared-state fetches). A level set
 * here applies to those lines too (pcclLogWarn drops them).
 * Does not block; needs no pcclInit.
 *
 * @param level One of pcclLogOff ... pcclLogTrace.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if level is unknown.
 */
PCCL_EXPORT pcclResult_t pcclSetLogLevel(pcclLogLevel_t level);

/**
 * Extension. Sets the timeouts of a communicator. Must be called before
 * pcclConnect. Does not block.
 *
 * @param comm The communicator; must not be NULL.
 * @param peer_liveness_timeout_ms How long a peer (or the master) may stay
 *        silent during an operation before it is treated as dead and the
 *        operation fails with pcclRankConnectionLost. 0 keeps the default.
 * @param connect_timeout_ms Limit for establishing one connection (master or
 *        peer). 0 keeps the default.
 *
 * In this version peer_liveness_timeout_ms is how long a shared-state
 * transfer may make no progress before this peer gives up on the sending
 * peer and fetches from another holder (default 5000 ms). In collectives a
 * silent peer is removed by the master after its own timeout
 * (pcclSetMasterPeerTimeout, default 5000 ms), which fails the collectives
 * it took part in on every survivor.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if comm is NULL.
 * @return pcclInvalidUsage if the communicator is already connected.
 */
PCCL_EXPORT pcclResult_t pcclSetCommunicatorTimeouts(pcclComm_t *comm, uint32_t peer_liveness_timeout_ms,
                                                     uint32_t connect_timeout_ms);

/**
 * Extension. Sets how long the master waits for a silent peer before
 * removing it (which fails the collectives it was part of on every survivor).
 * Must be called before pcclRunMaster. Does not block; needs no pcclInit.
 *
 * @param master The master instance; must not be NULL.
 * @param peer_liveness_timeout_ms The timeout; 0 keeps the default.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if master is NULL.
 * @return pcclInvalidUsage if the master was already run.
 */
PCCL_EXPORT pcclResult_t pcclSetMasterPeerTimeout(pcclMasterInstance_t *master, uint32_t peer_liveness_timeout_ms);

/**
 * Extension. Name of a result code, e.g. "pcclRankConnectionLost". Does not
 * block; needs no pcclInit.
 *
 * @param result The result code.
 * @param out Receives a static NUL-terminated string (never freed); must not
 *        be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if out is NULL or result is not a known code
 *         (*out is then left unchanged).
 */
PCCL_EXPORT pcclResult_t pcclGetResultString(pcclResult_t result, const char **out);

/**
 * Extension. Sets the first port tried for each of the communicator's
 * listeners (see ccoip.h; a taken port is bumped upward, and the actual ports
 * are reported to the master). 0 lets the operating system pick any free
 * port, which is what tests and several peers on one host want. Must be
 * called before pcclConnect. Does not block.
 *
 * The same can be set without code changes through the environment variable
 * PCCL_PEER_PORT_BASE, read by pcclCreateCommunicator: "0" means any free
 * ports; a number N (at most 65533) means shared state N, p2p N+1, benchmark
 * N+2. Other values are ignored with a logged warning. This function
 * overrides the variable.
 *
 * @param comm The communicator; must not be NULL.
 * @param shared_state_port First port of the shared-state listener
 *        (default CCOIP_PROTOCOL_PORT_SHARED_STATE), or 0.
 * @param p2p_port First port of the p2p listener (default
 *        CCOIP_PROTOCOL_PORT_P2P), or 0.
 * @param benchmark_port First port of the bandwidth-benchmark listener
 *        (default CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK), or 0.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if comm is NULL or not a live communicator.
 * @return pcclInvalidUsage if the communicator is already connected.
 */
PCCL_EXPORT pcclResult_t pcclSetCommunicatorPorts(pcclComm_t *comm, uint16_t shared_state_port,
                                                  uint16_t p2p_port, uint16_t benchmark_port);

/**
 * Extension. The address a running master listens on, with the port actually
 * bound: create the master with port 0 to let the operating system pick a
 * free one, run it, then read the port here. Does not block; needs no
 * pcclInit.
 *
 * @param master_instance The instance; must not be NULL.
 * @param address_out Receives the address; must not be NULL.
 *
 * @return pcclSuccess on success.
 * @return pcclInvalidArgument if a pointer is NULL or master_instance is not
 *         a live master instance.
 * @return pcclInvalidUsage if the master has not been run (pcclRunMaster).
 */
PCCL_EXPORT pcclResult_t pcclGetMasterListenAddress(const pcclMasterInstance_t *master_instance,
                                                    ccoip_socket_address_t *address_out);

/**
 * Extension. Sets the all-reduce algorithm this peer asks the master for.
 * Must be called before pcclConnect. Does not block. Every peer of a peer
 * group must ask for the same algorithm: the master fails a collective
 * whose peers' calls disagree (in algorithm, count, type, op, root or
 * quantization) with pcclInvalidUsage on all of them.
 *
 * Without this call the algorithm comes from the environment variable
 * PCCL_ALGORITHM, read by pcclCreateCommunicator: "auto",
 * "ring", "direct" or "relay"; unset or any other value means auto (another value is
 * logged as a warning). This function overrides the variable.
 *
 * The setting applies to all-reduces only: broadcast, all-gather and
 * reduce-scatter always leave the choice to the master, which runs them on
 * the ring. Direct in a group of more than 16 peers, and relay for an
 * all-reduce past its bound, fail with pcclInvalidArgument.
 *
 * @param comm The communicator; must not be NULL.
 * @param algorithm pcclAlgorithmAuto, pcclAlgorithmRing, pcclAlgorithmDirect
 *        or pcclAlgorithmRelay.
 *
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if comm is not a live communicator or
 *         algorithm is unknown.
 * @return pcclInvalidUsage if the communicator is already connected.
 */
PCCL_EXPORT pcclResult_t pcclSetAllReduceAlgorithm(pcclComm_t *comm, pcclAlgorithm_t algorithm);

/*
 * Broadcast, all-gather and reduce-scatter (extensions)
 * -----------------------------------------------------
 * These follow the rules of pcclAllReduce: collective over the accepted
 * peers of this peer group, which must all make the same call with the same
 * tag, count, datatype (and root, op, quantization); host memory only; the
 * set of peers is fixed when the operation starts. Ranks are positions in
 * the master's ring (pcclCollectiveInfo_t.rank); they are the same on every
 * peer and stay fixed until the next pcclUpdateTopology or
 * pcclOptimizeTopology, or a peer loss. Tags share one space with async
 * all-reduces: a tag used by an async operation that has not been awaited
 * yields pcclInvalidArgument.
 *
 * Common results:
 * @return pcclSuccess on success.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a required pointer is NULL, a count is 0,
 *         the byte size overflows, an enumerator is unknown, the buffers
 *         overlap (broadcast has one buffer), the tag is in use by an
 *         async operation not yet awaited, or as stated per function.
 *         Nothing is started and no buffer is touched in that case.
 * @return pcclInvalidUsage if the communicator is not connected, or another
 *         call on it is in progress.
 * @return pcclTooFewPeers if the peer group has fewer than two accepted peers.
 * @return pcclRankConnectionLost if a participating peer died or
 *         disconnected during the operation, or the group's size changed
 *         between the call and the operation; every survivor gets it, and
 *         retrying with the remaining peers succeeds. The output buffer's
 *         contents are then unspecified (a failed broadcast leaves non-root
 *         buffers partly written; the root's buffer is never written).
 * @return pcclMasterConnectionFailed if the master connection was lost.
 */

/**
 * Extension. Collective. Broadcast: every peer's buf ends with the bytes of
 * the buf of the peer whose rank is root. Blocks until done or failed. The
 * root's buf is only read.
 *
 * @param buf count elements of datatype; input on the root, output elsewhere;
 *        must not be NULL.
 * @param count Number of elements; > 0.
 * @param datatype Element type (no conversion is done; bytes are copied).
 * @param root Rank of the sending peer; < the peer group's world size
 *        (PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE), else pcclInvalidArgument.
 * @param tag Operation tag (as pcclReduceDescriptor_t.tag).
 * @param communicator The communicator; must not be NULL.
 * @param info_out May be NULL; written only on success.
 *
 * @return See "Common results" above.
 */
PCCL_EXPORT pcclResult_t pcclBroadcast(void *buf, size_t count, pcclDataType_t datatype, uint32_t root,
                                       uint64_t tag, const pcclComm_t *communicator,
                                       pcclCollectiveInfo_t *PCCL_NULLABLE info_out);

/**
 * Extension. Collective. Starts a broadcast (as pcclBroadcast) and returns
 * without waiting; complete it with pcclAwaitAsyncCollective (or
 * pcclAwaitAsyncReduce). buf must stay valid, and unread and unwritten by
 * the caller, until then. In-flight rules are those of pcclAllReduceAsync.
 *
 * @param handle_out Receives the handle; must not be NULL.
 * @return See "Common results" above (pcclRankConnectionLost is reported by
 *         the await).
 */
PCCL_EXPORT pcclResult_t pcclBroadcastAsync(void *buf, size_t count, pcclDataType_t datatype, uint32_t root,
                                            uint64_t tag, const pcclComm_t *communicator,
                                            pcclAsyncReduceOp_t *handle_out);

/**
 * Extension. Collective. All-gather: recvbuff ends with every peer's
 * sendbuff concatenated in rank order (rank r's sendcount elements at
 * element r * sendcount); the same bytes on every peer. Blocks until done or
 * failed. sendbuff is only read.
 *
 * @param sendbuff sendcount elements; must not be NULL.
 * @param recvbuff world × sendcount elements, world being the peer group's
 *        size (PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE) at the call; must not be
 *        NULL and must not overlap sendbuff (no in-place form).
 * @param sendcount Elements per peer; > 0.
 * @param datatype Element type (bytes are copied unchanged).
 * @param tag Operation tag.
 * @param communicator The communicator; must not be NULL.
 * @param info_out May be NULL; written only on success.
 *
 * @return See "Common results" above.
 */
PCCL_EXPORT pcclResult_t pcclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount,
                                       pcclDataType_t datatype, uint64_t tag, const pcclComm_t *communicator,
                                       pcclCollectiveInfo_t *PCCL_NULLABLE info_out);

/**
 * Extension. Collective. Starts an all-gather (as pcclAllGather) and returns
 * without waiting; complete it with pcclAwaitAsyncCollective (or
 * pcclAwaitAsyncReduce). Both buffers must stay valid, sendbuff unmodified
 * and recvbuff unread, until then.
 *
 * @param handle_out Receives the handle; must not be NULL.
 * @return See "Common results" above.
 */
PCCL_EXPORT pcclResult_t pcclAllGatherAsync(const void *sendbuff, void *recvbuff, size_t sendcount,
                                            pcclDataType_t datatype, uint64_t tag, const pcclComm_t *communicator,
                                            pcclAsyncReduceOp_t *handle_out);

/**
 * Extension. Collective. Reduce-scatter: the peers' sendbuffs are reduced
 * element-wise with descriptor->op, and recvbuff ends with this peer's
 * rank's segment of the result: elements rank * count ... (rank + 1) * count
 * - 1, count being descriptor->count. Every element is reduced in one
 * order for all peers, so the segments of all peers together are one
 * consistent result. Quantization options work as for pcclAllReduce.
 * Blocks until done or failed. sendbuff is only read.
 *
 * @param sendbuff world × count elements, world being the peer group's size
 *        at the call; must not be NULL.
 * @param recvbuff count elements; must not be NULL and must not overlap
 *        sendbuff.
 * @param descriptor count (each rank's share, > 0), op, tag, datatype,
 *        quantization, exactly as for pcclAllReduce; must not be NULL.
 * @param communicator The communicator; must not be NULL.
 * @param info_out May be NULL; written only on success.
 *
 * @return See "Common results" above; also pcclInvalidArgument for an
 *         unsupported quantization combination.
 */
PCCL_EXPORT pcclResult_t pcclReduceScatter(const void *sendbuff, void *recvbuff,
                                           const pcclReduceDescriptor_t *descriptor,
                                           const pcclComm_t *communicator,
                                           pcclCollectiveInfo_t *PCCL_NULLABLE info_out);

/**
 * Extension. Collective. Starts a reduce-scatter (as pcclReduceScatter) and
 * returns without waiting; complete it with pcclAwaitAsyncCollective (or
 * pcclAwaitAsyncReduce). Both buffers must stay valid, sendbuff unmodified
 * and recvbuff unread, until then.
 *
 * @param handle_out Receives the handle; must not be NULL.
 * @return See "Common results" above.
 */
PCCL_EXPORT pcclResult_t pcclReduceScatterAsync(const void *sendbuff, void *recvbuff,
                                                const pcclReduceDescriptor_t *descriptor,
                                                const pcclComm_t *communicator,
                                                pcclAsyncReduceOp_t *handle_out);

/**
 * Extension. Waits for any async operation: one started by
 * pcclBroadcastAsync, pcclAllGatherAsync, pcclReduceScatterAsync or
 * pcclAllReduceAsync. Blocks until it has completed or failed; afterwards
 * the library no longer touches its buffers. Each handle is awaited once,
 * with this function or pcclAwaitAsyncReduce (which accepts the same
 * handles and reports world size and bytes as a pcclReduceInfo_t).
 *
 * @param handle The handle; must not be NULL, and its comm must not be NULL.
 * @param info_out May be NULL; written only on success.
 *
 * @return pcclSuccess if the operation succeeded.
 * @return pcclNotInitialized if pcclInit has not been called.
 * @return pcclInvalidArgument if a pointer is NULL or the handle's tag names
 *         no in-flight operation of that communicator (e.g. already awaited).
 * @return pcclInvalidUsage if the communicator is not connected.
 * @return pcclRankConnectionLost, pcclInvalidUsage (the peers' calls
 *         disagreed), pcclInvalidArgument (the master refused the operation,
 *         e.g. the direct algorithm for a broadcast), or
 *         pcclMasterConnectionFailed: the operation failed.
 */
PCCL_EXPORT pcclResult_t pcclAwaitAsyncCollective(const pcclAsyncReduceOp_t *handle,
                                                  pcclCollectiveInfo_t *PCCL_NULLABLE info_out);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PCCL_H */
