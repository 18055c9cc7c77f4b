/*
 * collectives.c - one process of the broadcast / all-gather / reduce-scatter
 * swarm test, driven by tests/c_collectives.rs. Every check is exact; the
 * first failed check exits with status 1. Lines on stdout are the protocol
 * with the driver.
 *
 *   collectives master PEER_TIMEOUT_MS
 *       Runs a master on 127.0.0.1 with an OS-chosen port, prints
 *       "PORT <port>", and runs until its stdin reaches end-of-file; then
 *       interrupts, awaits and destroys the master and prints "MASTER_DONE".
 *
 *   collectives peer MASTER_PORT ID WORLD
 *       ID is 0 .. WORLD-1. Peer ID's inputs are derived from ID, so every
 *       peer computes every expected result itself. In order:
 *        1. before pcclInit, pcclBroadcast returns pcclNotInitialized; before
 *           pcclConnect it returns pcclInvalidUsage; pcclSetAllReduceAlgorithm
 *           with an unknown algorithm is pcclInvalidArgument, with
 *           pcclAlgorithmRing it succeeds;
 *        2. connects and admits peers until the group has WORLD peers;
 *           pcclSetAllReduceAlgorithm is then pcclInvalidUsage;
 *        3. an all-gather of the peers' IDs (uint32) gives the rank -> ID map
 *           (checked: a permutation of 0 .. WORLD-1, this peer's ID at its
 *           rank; info world_size and rank checked);
 *        4. broadcast from every root, for every data type and counts 1, 2,
 *           WORLD, 7 and 1001: every peer's buffer equals the root's input
 *           byte for byte (the root's own buffer unchanged);
 *        5. all-gather for every data type and counts 1, 2, 5 and 1001:
 *           rank r's input at elements r*count ... exactly;
 *        6. reduce-scatter for every data type, ops sum, max and min, and
 *           recvcounts 1, 2, 5 and 333: this rank's segment of the reduction
 *           over all peers' integer-valued inputs, exactly;
 *        7. the async forms: one broadcast, all-gather and reduce-scatter in
 *           flight at once with distinct tags (a blocking call reusing an
 *           in-flight tag is pcclInvalidArgument, pcclUpdateTopology is
 *           pcclPendingAsyncOps), awaited with pcclAwaitAsyncCollective and
 *           pcclAwaitAsyncReduce; results exact, a second await of a
 *           handle is pcclInvalidArgument;
 *        8. argument errors, every one pcclInvalidArgument and local (no
 *           peer needs to take part): NULL buffers, NULL communicator, NULL
 *           handle_out, NULL descriptor, unknown datatype and op, count 0,
 *           root >= WORLD, overlapping all-gather and reduce-scatter
 *           buffers, quantization on an integer type; pcclAwaitAsyncCollective
 *           with NULL or an unknown tag;
 *        9. prints "COLL <checksum>" over every broadcast and all-gather
 *           output (the driver checks it is the same on every peer), then
 *           "RS <checksum>" over the reduce-scatter outputs in rank order,
 *           gathered with an all-gather (same on every peer too), destroys
 *           the communicator and prints "PEER_DONE".
 */
#define _POSIX_C_SOURCE 200809L

#include "pccl.h"
#include "test_util.h"

static int g_id = 0;
static int g_world = 0;
static uint64_t g_tag = 1; /* advanced identically on every peer */
static uint32_t g_rank_id[64]; /* rank -> peer ID */
static uint32_t g_rank = 0;

#define SAY(...)                                                                               \
    do {                                                                                       \
        printf(__VA_ARGS__);                                                                   \
        printf("\n");                                                                          \
        fflush(stdout);                                                                        \
    } while (0)

static void *xmalloc(size_t n) {
    void *p = malloc(n == 0 ? 1 : n);
    MUST_TRUE(p != NULL);
    return p;
}

/* Byte b of peer `id`'s pattern for dtype t: arbitrary bytes (NaNs included
 * for the float types), which broadcast and all-gather must copy unchanged. */
static unsigned char pattern(int id, pcclDataType_t t, size_t b) {
    return (unsigned char)((size_t)id * 77u + b * 13u + (size_t)t * 5u + (b >> 8) + 1u);
}

static void fill_pattern(unsigned char *buf, int id, pcclDataType_t t, size_t bytes) {
    size_t b;
    for (b = 0; b < bytes; b++) {
        buf[b] = pattern(id, t, b);
    }
}

static void check_pattern(const unsigned char *buf, int id, pcclDataType_t t, size_t bytes, const char *what,
                          size_t count) {
    size_t b;
    for (b = 0; b < bytes; b++) {
        if (buf[b] != pattern(id, t, b)) {
            fprintf(stderr, "peer %d: %s %s count %zu: byte %zu is %u, expected %u (peer %d's input)\n", g_id,
                    what, dtype_name(t), count, b, buf[b], pattern(id, t, b), id);
            MUST_TRUE(buf[b] == pattern(id, t, b));
        }
    }
}

/* Peer `id`'s integer-valued reduce-scatter input at element j. */
static double rs_value(pcclRedOp_t op, pcclDataType_t t, int id, size_t j) {
    double sign = dtype_is_signed(t) && (j % 2 == 1) ? -1.0 : 1.0;
    if (op == pcclSum) {
        return sign * (double)(id + 1) * (double)(j % 7 + 1);
    }
    return sign * (double)((id * 5 + (int)(j % 11)) % 17);
}

static double rs_expected(pcclRedOp_t op, pcclDataType_t t, size_t j) {
    double acc = rs_value(op, t, 0, j);
    int id;
    for (id = 1; id < g_world; id++) {
        double v = rs_value(op, t, id, j);
        if (op == pcclSum) {
            acc += v;
        } else if (op == pcclMax) {
            acc = v > acc ? v : acc;
        } else {
            acc = v < acc ? v : acc;
        }
    }
    return acc;
}

static pcclComm_t *connect_to(uint16_t master_port) {
    pcclCommCreateParams_t params;
    pcclComm_t *comm = NULL;
    unsigned char b[4] = {0};
    int attempt;
    memset(&params, 0, sizeof params);
    params.master_address = ipv4_address(127, 0, 0, 1, master_port);
    params.peer_group = 0;
    params.p2p_connection_pool_size = 2;
    MUST(pcclBroadcast(b, 4, pcclUint8, 0, 1, NULL, NULL), pcclNotInitialized);
    MUST(pcclInit(), pcclSuccess);
    MUST(pcclCreateCommunicator(&params, &comm), pcclSuccess);
    MUST(pcclSetCommunicatorPorts(comm, 0, 0, 0), pcclSuccess);
    MUST(pcclBroadcast(b, 4, pcclUint8, 0, 1, comm, NULL), pcclInvalidUsage);
    MUST(pcclSetAllReduceAlgorithm(comm, (pcclAlgorithm_t)7), pcclInvalidArgument);
    MUST(pcclSetAllReduceAlgorithm(NULL, pcclAlgorithmRing), pcclInvalidArgument);
    MUST(pcclSetAllReduceAlgorithm(comm, pcclAlgorithmRing), pcclSuccess);
    for (attempt = 0;; attempt++) {
        pcclResult_t r = pcclConnect(comm);
        if (r == pcclSuccess) {
            break;
        }
        fprintf(stderr, "peer %d: connect attempt %d: %s (%s)\n", g_id, attempt, result_name(r),
                pcclGetLastErrorString());
        MUST_TRUE(attempt < 10);
        sleep_ms(200);
    }
    MUST(pcclSetAllReduceAlgorithm(comm, pcclAlgorithmAuto), pcclInvalidUsage);
    return comm;
}

static int group_world(pcclComm_t *comm) {
    int w = 0;
    MUST(pcclGetAttribute(comm, PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE, &w), pcclSuccess);
    return w;
}

static void wait_world(pcclComm_t *comm, int want) {
    int spins;
    for (spins = 0; group_world(comm) < want; spins++) {
        bool pending = false;
        MUST_TRUE(spins < 3000);
        MUST(pcclArePeersPending(comm, &pending), pcclSuccess);
        if (pending) {
            pcclResult_t r = pcclUpdateTopology(comm);
            MUST_TRUE(r == pcclSuccess || r == pcclUpdateTopologyFailed);
        } else {
            sleep_ms(20);
        }
    }
    MUST_TRUE(group_world(comm) == want);
}

static void check_info(const pcclCollectiveInfo_t *info) {
    MUST_TRUE(info->world_size == (uint32_t)g_world);
    MUST_TRUE(info->rank == g_rank);
    MUST_TRUE(info->algorithm == pcclAlgorithmRing);
}

/* 3. rank -> ID map. */
static void learn_ranks(pcclComm_t *comm) {
    uint32_t me = (uint32_t)g_id;
    uint32_t ids[64];
    int seen[64] = {0};
    pcclCollectiveInfo_t info;
    int r;
    memset(&info, 0xff, sizeof info);
    MUST(pcclAllGather(&me, ids, 1, pcclUint32, g_tag++, comm, &info), pcclSuccess);
    MUST_TRUE(info.world_size == (uint32_t)g_world);
    MUST_TRUE(info.rank < (uint32_t)g_world);
    MUST_TRUE(ids[info.rank] == me);
    g_rank = info.rank;
    for (r = 0; r < g_world; r++) {
        MUST_TRUE(ids[r] < (uint32_t)g_world && !seen[ids[r]]);
        seen[ids[r]] = 1;
        g_rank_id[r] = ids[r];
    }
}

/* 4. */
static uint64_t broadcasts(pcclComm_t *comm, uint64_t h) {
    size_t counts[5] = {1, 2, 0, 7, 1001};
    size_t ci, di;
    uint32_t root;
    counts[2] = (size_t)g_world;
    for (root = 0; root < (uint32_t)g_world; root++) {
        for (di = 0; di < 12; di++) {
            pcclDataType_t t = ALL_DTYPES[di];
            for (ci = 0; ci < 5; ci++) {
                size_t n = counts[ci], bytes = n * dtype_size(t);
                unsigned char *buf = (unsigned char *)xmalloc(bytes);
                pcclCollectiveInfo_t info;
                int root_id = (int)g_rank_id[root];
                if (root == g_rank) {
                    fill_pattern(buf, g_id, t, bytes);
                } else {
                    memset(buf, 0xa5, bytes);
                }
                MUST(pcclBroadcast(buf, n, t, root, g_tag++, comm, &info), pcclSuccess);
                check_info(&info);
                check_pattern(buf, root_id, t, bytes, "broadcast", n);
                h = fnv1a(h, buf, bytes);
                free(buf);
            }
        }
    }
    return h;
}

/* 5. */
static uint64_t all_gathers(pcclComm_t *comm, uint64_t h) {
    static const size_t counts[4] = {1, 2, 5, 1001};
    size_t ci, di;
    int r;
    for (di = 0; di < 12; di++) {
        pcclDataType_t t = ALL_DTYPES[di];
        for (ci = 0; ci < 4; ci++) {
            size_t n = counts[ci], bytes = n * dtype_size(t);
            unsigned char *send = (unsigned char *)xmalloc(bytes);
            unsigned char *recv = (unsigned char *)xmalloc(bytes * (size_t)g_world);
            pcclCollectiveInfo_t info;
            fill_pattern(send, g_id, t, bytes);
            memset(recv, 0x5a, bytes * (size_t)g_world);
            MUST(pcclAllGather(send, recv, n, t, g_tag++, comm, &info), pcclSuccess);
            check_info(&info);
            for (r = 0; r < g_world; r++) {
                check_pattern(recv + (size_t)r * bytes, (int)g_rank_id[r], t, bytes, "all-gather", n);
            }
            check_pattern(send, g_id, t, bytes, "all-gather send buffer", n);
            h = fnv1a(h, recv, bytes * (size_t)g_world);
            free(send);
            free(recv);
        }
    }
    return h;
}

/* Fills a reduce-scatter send buffer of world*n elements. */
static void *rs_send(pcclRedOp_t op, pcclDataType_t t, size_t n) {
    size_t j, total = n * (size_t)g_world;
    void *send = xmalloc(total * dtype_size(t));
    for (j = 0; j < total; j++) {
        put_value(send, t, j, rs_value(op, t, g_id, j));
    }
    return send;
}

static void rs_check(const void *recv, pcclRedOp_t op, pcclDataType_t t, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        size_t j = (size_t)g_rank * n + i;
        double got = get_value(recv, t, i), want = rs_expected(op, t, j);
        if (got != want) {
            fprintf(stderr, "peer %d (rank %u): reduce-scatter %s op %d count %zu element %zu: got %.17g, "
                            "expected %.17g\n",
                    g_id, (unsigned)g_rank, dtype_name(t), (int)op, n, i, got, want);
            MUST_TRUE(got == want);
        }
    }
}

/* 6. Returns the hash of this rank's outputs. */
static uint64_t reduce_scatters(pcclComm_t *comm, uint64_t h) {
    static const size_t counts[4] = {1, 2, 5, 333};
    static const pcclRedOp_t ops[3] = {pcclSum, pcclMax, pcclMin};
    size_t ci, di, oi;
    for (di = 0; di < 12; di++) {
        pcclDataType_t t = ALL_DTYPES[di];
        for (oi = 0; oi < 3; oi++) {
            for (ci = 0; ci < 4; ci++) {
                size_t n = counts[ci];
                void *send = rs_send(ops[oi], t, n);
                void *recv = xmalloc(n * dtype_size(t));
                pcclReduceDescriptor_t d = reduce_descriptor(n, ops[oi], g_tag++, t);
                pcclCollectiveInfo_t info;
                memset(recv, 0x77, n * dtype_size(t));
                MUST(pcclReduceScatter(send, recv, &d, comm, &info), pcclSuccess);
                check_info(&info);
                rs_check(recv, ops[oi], t, n);
                h = fnv1a(h, recv, n * dtype_size(t));
                free(send);
                free(recv);
            }
        }
    }
    return h;
}

/* 7. */
static void async_ops(pcclComm_t *comm) {
    const size_t n = 37;
    const pcclDataType_t t = pcclInt32;
    size_t bytes = n * dtype_size(t);
    unsigned char *bbuf = (unsigned char *)xmalloc(bytes);
    unsigned char *gsend = (unsigned char *)xmalloc(bytes);
    unsigned char *grecv = (unsigned char *)xmalloc(bytes * (size_t)g_world);
    void *rsend = rs_send(pcclSum, t, n);
    void *rrecv = xmalloc(bytes);
    uint64_t tb = g_tag++, tg = g_tag++, tr = g_tag++;
    pcclReduceDescriptor_t d = reduce_descriptor(n, pcclSum, tr, t);
    pcclAsyncReduceOp_t hb, hg, hr;
    pcclCollectiveInfo_t info;
    pcclReduceInfo_t rinfo;
    int r;
    const uint32_t root = (uint32_t)(g_world - 1);

    if (root == g_rank) {
        fill_pattern(bbuf, g_id, t, bytes);
    } else {
        memset(bbuf, 0, bytes);
    }
    fill_pattern(gsend, g_id, t, bytes);
    MUST(pcclBroadcastAsync(bbuf, n, t, root, tb, comm, &hb), pcclSuccess);
    MUST(pcclAllGatherAsync(gsend, grecv, n, t, tg, comm, &hg), pcclSuccess);
    MUST(pcclReduceScatterAsync(rsend, rrecv, &d, comm, &hr), pcclSuccess);
    MUST_TRUE(hb.comm == comm && hb.tag == tb && hg.tag == tg && hr.tag == tr);
    /* In-flight rules. */
    MUST(pcclAllGather(gsend, grecv, n, t, tb, comm, NULL), pcclInvalidArgument);
    MUST(pcclBroadcastAsync(bbuf, n, t, 0, tr, comm, &hb), pcclInvalidArgument);
    MUST_TRUE(hb.tag == tb);
    MUST(pcclUpdateTopology(comm), pcclPendingAsyncOps);

    memset(&info, 0, sizeof info);
    MUST(pcclAwaitAsyncCollective(&hr, &info), pcclSuccess);
    check_info(&info);
    rs_check(rrecv, pcclSum, t, n);
    MUST(pcclAwaitAsyncReduce(&hb, &rinfo), pcclSuccess);
    MUST_TRUE(rinfo.local_world_size == (uint32_t)g_world);
    check_pattern(bbuf, (int)g_rank_id[root], t, bytes, "async broadcast", n);
    MUST(pcclAwaitAsyncCollective(&hg, NULL), pcclSuccess);
    for (r = 0; r < g_world; r++) {
        check_pattern(grecv + (size_t)r * bytes, (int)g_rank_id[r], t, bytes, "async all-gather", n);
    }
    MUST(pcclAwaitAsyncCollective(&hg, &info), pcclInvalidArgument);
    MUST(pcclAwaitAsyncReduce(&hb, &rinfo), pcclInvalidArgument);
    free(bbuf);
    free(gsend);
    free(grecv);
    free(rsend);
    free(rrecv);
}

/* 8. Every call fails locally before anything is started. */
static void argument_errors(pcclComm_t *comm) {
    float a[64], b[64 * 8];
    pcclReduceDescriptor_t d = reduce_descriptor(4, pcclSum, 999, pcclFloat);
    pcclAsyncReduceOp_t handle;
    pcclCollectiveInfo_t info;
    const uint64_t tag = 999;
    memset(a, 0, sizeof a);
    memset(b, 0, sizeof b);
    memset(&info, 0x3c, sizeof info);

    /* Broadcast. */
    EXPECT(pcclBroadcast(NULL, 4, pcclFloat, 0, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcast(a, 0, pcclFloat, 0, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcast(a, 4, (pcclDataType_t)12, 0, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcast(a, 4, (pcclDataType_t)-1, 0, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcast(a, 4, pcclFloat, (uint32_t)g_world, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcast(a, 4, pcclFloat, UINT32_MAX, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcast(a, 4, pcclFloat, 0, tag, NULL, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcast(a, SIZE_MAX / 2, pcclFloat, 0, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclBroadcastAsync(a, 4, pcclFloat, 0, tag, comm, NULL), pcclInvalidArgument);
    EXPECT(pcclBroadcastAsync(a, 4, pcclFloat, (uint32_t)g_world, tag, comm, &handle), pcclInvalidArgument);

    /* All-gather. */
    EXPECT(pcclAllGather(NULL, b, 4, pcclFloat, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclAllGather(a, NULL, 4, pcclFloat, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclAllGather(a, b, 0, pcclFloat, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclAllGather(a, b, 4, (pcclDataType_t)42, tag, comm, &info), pcclInvalidArgument);
    EXPECT(pcclAllGather(a, b, 4, pcclFloat, tag, NULL, &info), pcclInvalidArgument);
    EXPECT(pcclAllGather(b, b, 4, pcclFloat, tag, comm, &info), pcclInvalidArgument); /* in place */
    EXPECT(pcclAllGather(b + 4, b, 4, pcclFloat, tag, comm, &info), pcclInvalidArgument); /* inside recv */
    EXPECT(pcclAllGatherAsync(a, b, 4, pcclFloat, tag, comm, NULL), pcclInvalidArgument);
    EXPECT(pcclAllGatherAsync(a, a + 2, 4, pcclFloat, tag, comm, &handle), pcclInvalidArgument);

    /* Reduce-scatter. */
    EXPECT(pcclReduceScatter(NULL, a, &d, comm, &info), pcclInvalidArgument);
    EXPECT(pcclReduceScatter(b, NULL, &d, comm, &info), pcclInvalidArgument);
    EXPECT(pcclReduceScatter(b, a, NULL, comm, &info), pcclInvalidArgument);
    EXPECT(pcclReduceScatter(b, a, &d, NULL, &info), pcclInvalidArgument);
    EXPECT(pcclReduceScatter(b, b + 4, &d, comm, &info), pcclInvalidArgument); /* recv inside send */
    EXPECT(pcclReduceScatter(b, b, &d, comm, &info), pcclInvalidArgument);     /* in place */
    d.count = 0;
    EXPECT(pcclReduceScatter(b, a, &d, comm, &info), pcclInvalidArgument);
    d.count = 4;
    d.op = (pcclRedOp_t)9;
    EXPECT(pcclReduceScatter(b, a, &d, comm, &info), pcclInvalidArgument);
    d.op = pcclSum;
    d.src_descriptor.datatype = (pcclDataType_t)77;
    EXPECT(pcclReduceScatter(b, a, &d, comm, &info), pcclInvalidArgument);
    d.src_descriptor.datatype = pcclInt32;
    d.quantization_options.algorithm = pcclQuantMinMax;
    d.quantization_options.quantized_datatype = pcclUint8;
    EXPECT(pcclReduceScatter(b, a, &d, comm, &info), pcclInvalidArgument); /* integers do not quantize */
    d = reduce_descriptor(4, pcclSum, tag, pcclFloat);
    EXPECT(pcclReduceScatterAsync(b, a, &d, comm, NULL), pcclInvalidArgument);

    /* Awaits. */
    EXPECT(pcclAwaitAsyncCollective(NULL, &info), pcclInvalidArgument);
    handle.comm = NULL;
    handle.tag = tag;
    EXPECT(pcclAwaitAsyncCollective(&handle, &info), pcclInvalidArgument);
    handle.comm = comm;
    EXPECT(pcclAwaitAsyncCollective(&handle, &info), pcclInvalidArgument);

    /* Nothing was written to the info by a failed call. */
    {
        unsigned char want[sizeof info];
        memset(want, 0x3c, sizeof want);
        CHECK(memcmp(&info, want, sizeof info) == 0);
    }
    MUST_TRUE(failure_count() == 0);
}

static int run_master(long timeout_ms) {
    pcclMasterInstance_t *master = NULL;
    ccoip_socket_address_t addr;
    MUST(pcclCreateMaster(ipv4_address(127, 0, 0, 1, 0), &master), pcclSuccess);
    MUST(pcclSetMasterPeerTimeout(master, (uint32_t)timeout_ms), pcclSuccess);
    MUST(pcclRunMaster(master), pcclSuccess);
    MUST(pcclGetMasterListenAddress(master, &addr), pcclSuccess);
    SAY("PORT %u", (unsigned)addr.port);
    while (getchar() != EOF) {
    }
    MUST(pcclInterruptMaster(master), pcclSuccess);
    MUST(pcclMasterAwaitTermination(master), pcclSuccess);
    MUST(pcclDestroyMaster(master), pcclSuccess);
    SAY("MASTER_DONE");
    return 0;
}

int main(int argc, char **argv) {
    pcclComm_t *comm;
    uint64_t h = 1469598103934665603ULL, hrs = 1469598103934665603ULL;
    uint64_t all[64];
    pcclCollectiveInfo_t info;
    int r;

    if (argc == 3 && strcmp(argv[1], "master") == 0) {
        return run_master(strtol(argv[2], NULL, 10));
    }
    if (argc != 5 || strcmp(argv[1], "peer") != 0) {
        fprintf(stderr, "usage: %s master PEER_TIMEOUT_MS\n"
                        "       %s peer MASTER_PORT ID WORLD\n",
                argv[0], argv[0]);
        return 2;
    }
    g_id = (int)strtol(argv[3], NULL, 10);
    g_world = (int)strtol(argv[4], NULL, 10);
    MUST_TRUE(g_world >= 2 && g_world <= 64 && g_id >= 0 && g_id < g_world);

    comm = connect_to((uint16_t)strtol(argv[2], NULL, 10));
    wait_world(comm, g_world);
    learn_ranks(comm);
    h = broadcasts(comm, h);
    h = all_gathers(comm, h);
    hrs = reduce_scatters(comm, hrs);
    async_ops(comm);
    argument_errors(comm);
    /* The communicator still works after the refused calls. */
    MUST(pcclAllGather(&hrs, all, 1, pcclUint64, g_tag++, comm, &info), pcclSuccess);
    check_info(&info);
    MUST_TRUE(all[g_rank] == hrs);
    hrs = 1469598103934665603ULL;
    for (r = 0; r < g_world; r++) {
        hrs = fnv1a(hrs, &all[r], sizeof all[r]);
    }
    SAY("COLL %016llx", (unsigned long long)h);
    SAY("RS %016llx", (unsigned long long)hrs);
    MUST(pcclDestroyCommunicator(comm), pcclSuccess);
    SAY("PEER_DONE %d", g_id);
    return 0;
}
