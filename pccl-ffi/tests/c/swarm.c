/*
 * swarm.c - one process of a multi-process swarm test, driven by
 * tests/c_swarm.rs. Every check is exact; the first failed check exits with
 * status 1. Lines on stdout are the protocol with the driver.
 *
 *   swarm master PEER_TIMEOUT_MS
 *       Runs a master on 127.0.0.1 with an OS-chosen port, prints
 *       "PORT <port>", and runs until its stdin reaches end-of-file; then
 *       interrupts, awaits and destroys the master and prints "MASTER_DONE".
 *
 *   swarm peer MASTER_PORT ID SCENARIO ROLE
 *       ID is 0, 1, 2...: peer ID contributes values derived from ID, so every
 *       peer can compute every exact result.
 *
 *     SCENARIO short  (ROLE any; 2 peers, IDs 0 and 1)
 *       the all-reduce suite (below) at world 2; prints "SUITE <checksum>".
 *     SCENARIO kill   (3 peers, IDs 0..2; ROLE survivor or victim; the victim is ID 1)
 *       the all-reduce suite at world 3, then a loop of
 *       pcclAllReduceMultipleWithRetry calls (8 operations of 4 MiB, 2 in
 *       flight); the victim prints "VICTIM_IN_CALL" just before its third call
 *       and loops until the driver SIGKILLs it. Survivors check that every
 *       operation's result is exactly the sum over all three peers or over
 *       the two survivors, and stop after three calls that started with a
 *       world of 2;
 *       they print "KILL_DONE <checksum of the last results>".
 *     SCENARIO sync   (ROLE initial: IDs 0, 1; ROLE late: ID 2)
 *       initial peers sync a shared state at world 2 (revision 1), all-reduce,
 *       print "PHASE1_DONE", then admit the late joiner; the late joiner
 *       connects afterwards with zeroed tensors. All three sync (revision 2;
 *       the late joiner adopts it and receives the content), all-reduce at
 *       world 3, sync again (revision 3, nothing transferred), get
 *       pcclInvalidUsage for a revision that did not advance, and sync
 *       revision 4. Prints "SYNC2 <rev> <checksum>" and "SYNC_DONE <checksum>".
 *
 * The all-reduce suite: every data type x every reduction op with exact
 * expected values (counts 1 to 4099), a large in-place float sum, a
 * quantized (min-max to uint8) sum whose bytes the driver compares across
 * peers, min-max sums of float/double to uint32/uint64 (accepted as by PCCL
 * 1.0, nearly exact, bytes compared across peers too), four async all-reduces with distinct tags in flight at once (with
 * the in-flight rules checked), and pcclAllReduceMultipleWithRetry.
 */
#define _POSIX_C_SOURCE 200809L

#include "pccl.h"
#include "test_util.h"

#include <math.h>

static int g_id = 0;
static uint64_t g_tag = 1; /* advanced identically on every peer */

/* Prints one protocol line and flushes it at once. */
#define SAY(...)                                                                               \
    do {                                                                                       \
        printf(__VA_ARGS__);                                                                   \
        printf("\n");                                                                          \
        fflush(stdout);                                                                        \
    } while (0)

/* ---- expected values ------------------------------------------------------ */

/* Peer `id`'s input at element j for `op`, an integer value. Negative for
 * signed types where the op allows it, to cover signs. */
static double contribution(pcclRedOp_t op, pcclDataType_t t, int id, size_t j) {
    double sign = (dtype_is_signed(t) && op != pcclProd) ? -1.0 : 1.0;
    switch (op) {
    case pcclSum:
        return sign * (double)(id + 1) * (double)(j % 7 + 1);
    case pcclAvg:
        return sign * (double)(id + 1) * 2.0 * (double)(j % 5);
    case pcclProd:
        return (j % 3 == 0) ? (double)(id + 1) : 1.0;
    default: /* max, min */
        return sign * ((double)id * 10.0 + (double)(j % 10));
    }
}

/* The exact result over peers 0..world-1 (all sums divide evenly for Avg). */
static double expected(pcclRedOp_t op, pcclDataType_t t, int world, size_t j) {
    double acc = contribution(op, t, 0, j);
    int id;
    for (id = 1; id < world; id++) {
        double v = contribution(op, t, id, j);
        switch (op) {
        case pcclSum:
        case pcclAvg:
            acc += v;
            break;
        case pcclProd:
            acc *= v;
            break;
        case pcclMax:
            acc = v > acc ? v : acc;
            break;
        default:
            acc = v < acc ? v : acc;
            break;
        }
    }
    return op == pcclAvg ? acc / (double)world : acc;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n == 0 ? 1 : n);
    MUST_TRUE(p != NULL);
    return p;
}

/* ---- membership -------------------------------------------------------------- */

static pcclComm_t *connect_to(uint16_t master_port) {
    pcclCommCreateParams_t params;
    pcclComm_t *comm = NULL;
    int attempt;
    memset(&params, 0, sizeof params);
    params.master_address = ipv4_address(127, 0, 0, 1, master_port);
    params.peer_group = 0;
    params.p2p_connection_pool_size = 2;
    MUST(pcclInit(), pcclSuccess);
    MUST(pcclCreateCommunicator(&params, &comm), pcclSuccess);
    MUST(pcclSetCommunicatorPorts(comm, 0, 0, 0), pcclSuccess);
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
    return comm;
}

static int world_size(pcclComm_t *comm) {
    int w = 0;
    MUST(pcclGetAttribute(comm, PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE, &w), pcclSuccess);
    return w;
}

/* Admits pending peers (collectively with the other accepted peers) until
 * the run has `want` peers. */
static void wait_world(pcclComm_t *comm, int want) {
    int spins;
    for (spins = 0; world_size(comm) < want; spins++) {
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
    MUST_TRUE(world_size(comm) == want);
}

/* ---- the all-reduce suite ----------------------------------------------------- */

static uint64_t check_typed(const void *recv, pcclDataType_t t, pcclRedOp_t op, int world, size_t count,
                            uint64_t h) {
    size_t j;
    for (j = 0; j < count; j++) {
        double got = get_value(recv, t, j), want = expected(op, t, world, j);
        if (got != want) {
            fprintf(stderr, "peer %d: %s op %d world %d element %zu: got %.17g, expected %.17g\n", g_id,
                    dtype_name(t), (int)op, world, j, got, want);
            MUST_TRUE(got == want);
        }
    }
    return fnv1a(h, recv, count * dtype_size(t));
}

static uint64_t typed_all_reduces(pcclComm_t *comm, int world, uint64_t h) {
    static const size_t counts[5] = {1, 2, 3, 1000, 4099};
    static const pcclRedOp_t ops[5] = {pcclSum, pcclAvg, pcclProd, pcclMax, pcclMin};
    int ti, oi, n = 0;
    for (ti = 0; ti < 12; ti++) {
        for (oi = 0; oi < 5; oi++, n++) {
            pcclDataType_t t = ALL_DTYPES[ti];
            pcclRedOp_t op = ops[oi];
            size_t count = counts[n % 5], j;
            void *send = xmalloc(count * dtype_size(t));
            void *recv = xmalloc(count * dtype_size(t));
            pcclReduceDescriptor_t d = reduce_descriptor(count, op, g_tag++, t);
            pcclReduceInfo_t info;
            for (j = 0; j < count; j++) {
                put_value(send, t, j, contribution(op, t, g_id, j));
            }
            memset(&info, 0, sizeof info);
            MUST(pcclAllReduce(send, recv, &d, comm, &info), pcclSuccess);
            MUST_TRUE(info.local_world_size == (uint32_t)world);
            MUST_TRUE(info.tx_bytes > 0 || count < (size_t)world);
            h = check_typed(recv, t, op, world, count, h);
            /* the input is untouched */
            for (j = 0; j < count; j++) {
                MUST_TRUE(get_value(send, t, j) == contribution(op, t, g_id, j));
            }
            free(send);
            free(recv);
        }
    }
    return h;
}

static uint64_t big_in_place(pcclComm_t *comm, int world, size_t count, uint64_t h) {
    float *buf = (float *)xmalloc(count * sizeof(float));
    pcclReduceDescriptor_t d = reduce_descriptor(count, pcclSum, g_tag++, pcclFloat);
    pcclReduceInfo_t info;
    size_t j;
    for (j = 0; j < count; j++) {
        buf[j] = (float)contribution(pcclSum, pcclUint32, g_id, j);
    }
    MUST(pcclAllReduce(buf, buf, &d, comm, &info), pcclSuccess);
    MUST_TRUE(info.local_world_size == (uint32_t)world);
    for (j = 0; j < count; j++) {
        MUST_TRUE((double)buf[j] == expected(pcclSum, pcclUint32, world, j));
    }
    h = fnv1a(h, buf, count * sizeof(float));
    free(buf);
    return h;
}

/* Quantized: results are approximate but bit-identical on every peer (the
 * driver compares the checksums printed by each peer). */
static uint64_t quantized(pcclComm_t *comm, int world, uint64_t h) {
    const size_t count = 20000;
    float *send = (float *)xmalloc(count * sizeof(float));
    float *recv = (float *)xmalloc(count * sizeof(float));
    pcclReduceDescriptor_t d = reduce_descriptor(count, pcclSum, g_tag++, pcclFloat);
    double exact, err, max_err = 0.0;
    size_t j;
    int id;
    d.quantization_options.algorithm = pcclQuantMinMax;
    d.quantization_options.quantized_datatype = pcclUint8;
    for (j = 0; j < count; j++) {
        send[j] = (float)((double)(g_id + 1) * (double)(j % 100) / 100.0);
    }
    MUST(pcclAllReduce(send, recv, &d, comm, NULL), pcclSuccess);
    for (j = 0; j < count; j++) {
        exact = 0.0;
        for (id = 0; id < world; id++) {
            exact += (double)(float)((double)(id + 1) * (double)(j % 100) / 100.0);
        }
        err = fabs((double)recv[j] - exact);
        max_err = err > max_err ? err : max_err;
    }
    /* the whole range is about 6; 8-bit steps are about 0.025 */
    if (max_err > 0.25) {
        fprintf(stderr, "peer %d: quantized all-reduce error %g too large\n", g_id, max_err);
        MUST_TRUE(max_err <= 0.25);
    }
    h = fnv1a(h, recv, count * sizeof(float));
    free(send);
    free(recv);
    return h;
}

/* MinMax to 32/64-bit codes from float/double, which PCCL 1.0 accepts: each
 * combination is accepted, nearly exact, and bit-identical on every peer
 * (the results go into the suite's checksum). */
static uint64_t quantized_wide(pcclComm_t *comm, int world, uint64_t h) {
    static const pcclDataType_t srcs[2] = {pcclFloat, pcclDouble};
    static const pcclDataType_t codes[2] = {pcclUint32, pcclUint64};
    const size_t count = 5000;
    double exact, got, err, max_err;
    size_t j;
    int s, q, id;
    for (s = 0; s < 2; s++) {
        for (q = 0; q < 2; q++) {
            size_t es = dtype_size(srcs[s]);
            void *send = xmalloc(count * es);
            void *recv = xmalloc(count * es);
            pcclReduceDescriptor_t d = reduce_descriptor(count, pcclSum, g_tag++, srcs[s]);
            d.quantization_options.algorithm = pcclQuantMinMax;
            d.quantization_options.quantized_datatype = codes[q];
            for (j = 0; j < count; j++) {
                double v = (double)(g_id + 1) * (double)(j % 100) / 100.0;
                if (srcs[s] == pcclFloat) {
                    ((float *)send)[j] = (float)v;
                } else {
                    ((double *)send)[j] = v;
                }
            }
            MUST(pcclAllReduce(send, recv, &d, comm, NULL), pcclSuccess);
            max_err = 0.0;
            for (j = 0; j < count; j++) {
                exact = 0.0;
                for (id = 0; id < world; id++) {
                    double v = (double)(id + 1) * (double)(j % 100) / 100.0;
                    exact += srcs[s] == pcclFloat ? (double)(float)v : v;
                }
                got = srcs[s] == pcclFloat ? (double)((float *)recv)[j] : ((double *)recv)[j];
                err = fabs(got - exact);
                max_err = err > max_err ? err : max_err;
            }
            /* the range is about 6: 32-bit steps are about 1.4e-9, and an
             * f32 result rounds at about 5e-7 */
            if (max_err > 1e-5) {
                fprintf(stderr, "peer %d: wide quantized all-reduce (%d, %d) error %g\n", g_id,
                        (int)srcs[s], (int)codes[q], max_err);
                MUST_TRUE(max_err <= 1e-5);
            }
            h = fnv1a(h, recv, count * es);
            free(send);
            free(recv);
        }
    }
    return h;
}

static uint64_t async_ops(pcclComm_t *comm, int world, uint64_t h) {
    enum { N = 4 };
    static const pcclDataType_t types[N] = {pcclFloat, pcclInt32, pcclDouble, pcclBFloat16};
    static const pcclRedOp_t ops[N] = {pcclSum, pcclMax, pcclAvg, pcclMin};
    static const size_t counts[N] = {50000, 777, 3, 4096};
    void *send[N], *recv[N];
    pcclAsyncReduceOp_t handles[N], dup;
    pcclReduceDescriptor_t d[N];
    pcclReduceInfo_t info;
    bool pending = true;
    int i;
    size_t j;

    for (i = 0; i < N; i++) {
        send[i] = xmalloc(counts[i] * dtype_size(types[i]));
        recv[i] = xmalloc(counts[i] * dtype_size(types[i]));
        for (j = 0; j < counts[i]; j++) {
            put_value(send[i], types[i], j, contribution(ops[i], types[i], g_id, j));
        }
        d[i] = reduce_descriptor(counts[i], ops[i], g_tag++, types[i]);
        MUST(pcclAllReduceAsync(send[i], recv[i], &d[i], comm, &handles[i]), pcclSuccess);
        MUST_TRUE(handles[i].comm == comm && handles[i].tag == d[i].tag);
    }
    /* Rules while async operations are in flight (all local checks). */
    MUST(pcclAllReduceAsync(send[0], recv[0], &d[0], comm, &dup), pcclInvalidArgument);
    MUST(pcclAllReduce(send[1], recv[1], &d[1], comm, NULL), pcclInvalidArgument);
    MUST(pcclUpdateTopology(comm), pcclPendingAsyncOps);
    MUST(pcclOptimizeTopology(comm), pcclPendingAsyncOps);
    /* Are-peers-pending is allowed meanwhile (collective: every peer calls it). */
    MUST(pcclArePeersPending(comm, &pending), pcclSuccess);
    MUST_TRUE(pending == false);
    for (i = N - 1; i >= 0; i--) {
        memset(&info, 0, sizeof info);
        MUST(pcclAwaitAsyncReduce(&handles[i], &info), pcclSuccess);
        MUST_TRUE(info.local_world_size == (uint32_t)world);
        h = check_typed(recv[i], types[i], ops[i], world, counts[i], h);
        MUST(pcclAwaitAsyncReduce(&handles[i], &info), pcclInvalidArgument);
    }
    MUST(pcclUpdateTopology(comm), pcclSuccess); /* no longer pending */
    for (i = 0; i < N; i++) {
        free(send[i]);
        free(recv[i]);
    }
    return h;
}

static uint64_t multiple(pcclComm_t *comm, int world, uint64_t h) {
    enum { N = 6 };
    const size_t count = 30000;
    pcclReduceOpDescriptor_t ops[N];
    pcclReduceInfo_t info;
    int32_t *send[N], *recv[N];
    int i;
    size_t j;
    for (i = 0; i < N; i++) {
        send[i] = (int32_t *)xmalloc(count * sizeof(int32_t));
        recv[i] = (i % 2 == 0) ? send[i] : (int32_t *)xmalloc(count * sizeof(int32_t));
        for (j = 0; j < count; j++) {
            send[i][j] = (int32_t)contribution(pcclSum, pcclInt32, g_id, j + (size_t)i);
        }
        ops[i].sendbuf = send[i];
        ops[i].recvbuf = recv[i];
        ops[i].descriptor = reduce_descriptor(count, pcclSum, g_tag++, pcclInt32);
    }
    memset(&info, 0, sizeof info);
    MUST(pcclAllReduceMultipleWithRetry(ops, N, comm, &info, 2), pcclSuccess);
    MUST_TRUE(info.local_world_size == (uint32_t)world);
    MUST_TRUE(info.tx_bytes > 0 && info.rx_bytes > 0);
    for (i = 0; i < N; i++) {
        for (j = 0; j < count; j++) {
            MUST_TRUE((double)recv[i][j] == expected(pcclSum, pcclInt32, world, j + (size_t)i));
        }
        h = fnv1a(h, recv[i], count * sizeof(int32_t));
        if (recv[i] != send[i]) {
            free(recv[i]);
        }
        free(send[i]);
    }
    return h;
}

static uint64_t suite(pcclComm_t *comm, int world, size_t big_count) {
    uint64_t h = FNV_OFFSET;
    h = typed_all_reduces(comm, world, h);
    h = big_in_place(comm, world, big_count, h);
    h = quantized(comm, world, h);
    h = quantized_wide(comm, world, h);
    h = async_ops(comm, world, h);
    h = multiple(comm, world, h);
    return h;
}

/* ---- kill scenario ------------------------------------------------------------ */

#define KILL_OPS 8
#define KILL_COUNT (1u << 20)
#define KILL_ANNOUNCE_ITERATION 2
#define VICTIM_ID 1

/* Peer id's input for op k of iteration it, element j. */
static float kill_value(int id, int it, int k, size_t j) {
    return (float)((id + 1) * (int)((j + (size_t)k + (size_t)it) % 13 + 1));
}

static void kill_loop(pcclComm_t *comm, int victim) {
    float *buf[KILL_OPS], *out[KILL_OPS];
    pcclReduceOpDescriptor_t ops[KILL_OPS];
    pcclReduceInfo_t info;
    uint64_t h = FNV_OFFSET;
    int it, k, after_kill = 0, mixed_calls = 0, calls_with_loss = 0;
    size_t j;

    for (k = 0; k < KILL_OPS; k++) {
        buf[k] = (float *)xmalloc(KILL_COUNT * sizeof(float));
        /* ops 0 and 2 in place (a retry must reduce the original input) */
        out[k] = (k % 2 == 0) ? buf[k] : (float *)xmalloc(KILL_COUNT * sizeof(float));
    }
    for (it = 0;; it++) {
        int world_before = world_size(comm), n_all = 0, n_surv = 0;
        MUST_TRUE(it < 100000);
        for (k = 0; k < KILL_OPS; k++) {
            for (j = 0; j < KILL_COUNT; j++) {
                buf[k][j] = kill_value(g_id, it, k, j);
            }
            ops[k].sendbuf = buf[k];
            ops[k].recvbuf = out[k];
            ops[k].descriptor = reduce_descriptor(KILL_COUNT, pcclSum, g_tag++, pcclFloat);
        }
        if (victim && it == KILL_ANNOUNCE_ITERATION) {
            SAY("VICTIM_IN_CALL"); /* the driver SIGKILLs this process shortly */
        }
        memset(&info, 0, sizeof info);
        MUST(pcclAllReduceMultipleWithRetry(ops, KILL_OPS, comm, &info, 2), pcclSuccess);
        if (victim) {
            continue;
        }
        /* Each op ran either with all three peers or with the survivors 0 and 2. */
        for (k = 0; k < KILL_OPS; k++) {
            int all = 1, surv = 1;
            for (j = 0; j < KILL_COUNT; j++) {
                float m = kill_value(0, it, k, j); /* = the base value */
                all = all && out[k][j] == 6.0f * m;
                surv = surv && out[k][j] == 4.0f * m;
            }
            if (!all && !surv) {
                fprintf(stderr, "peer %d: iteration %d op %d: result is neither the 3-peer nor the 2-peer sum\n",
                        g_id, it, k);
                MUST_TRUE(all || surv);
            }
            n_all += all;
            n_surv += surv;
        }
        if (n_all > 0 && n_surv > 0) {
            mixed_calls++;
        }
        if (world_before == 3 && n_surv > 0) {
            calls_with_loss++;
        }
        if (world_before == 2) {
            /* Started after this peer learnt of the loss: all with two. */
            MUST_TRUE(info.local_world_size == 2);
            MUST_TRUE(n_surv == KILL_OPS);
        }
        /* Stop after three calls done wholly by the two survivors. Counted
         * from the results, which both survivors share, and not from
         * world_before: one survivor may learn of the loss a call later than
         * the other, and would then start a call the other never joins. */
        if (n_surv == KILL_OPS && ++after_kill >= 3) {
            break;
        }
    }
    for (k = 0; k < KILL_OPS; k++) {
        h = fnv1a(h, out[k], KILL_COUNT * sizeof(float));
    }
    /* calls_with_loss: calls that began with three peers (as this peer saw
     * it) and whose operations, some or all, completed with two: the victim
     * died inside (or right at the start of) the call, which still
     * succeeded with exact results. mixed_calls: those of them in which
     * earlier operations completed with three peers and later ones with two. */
    SAY("KILL_STATS iterations=%d mixed_calls=%d calls_with_loss=%d", it + 1, mixed_calls, calls_with_loss);
    SAY("KILL_DONE %016llx", (unsigned long long)h);
    for (k = 0; k < KILL_OPS; k++) {
        if (out[k] != buf[k]) {
            free(out[k]);
        }
        free(buf[k]);
    }
}

/* ---- sync scenario ------------------------------------------------------------ */

#define W_COUNT 5000
#define B_COUNT 33
#define L_COUNT 8

struct model {
    float weights[W_COUNT];
    double bias[B_COUNT];
    int64_t steps[1];
    int32_t local[L_COUNT];
    pcclTensorInfo_t infos[5];
    pcclSharedState_t state;
};

static void model_init(struct model *m, int late) {
    size_t j;
    memset(m, 0, sizeof *m);
    for (j = 0; j < W_COUNT; j++) {
        m->weights[j] = late ? 0.0f : (float)(j % 101) * 0.25f;
    }
    for (j = 0; j < B_COUNT; j++) {
        m->bias[j] = late ? 0.0 : (double)j * 1.5;
    }
    m->steps[0] = late ? 0 : 1;
    for (j = 0; j < L_COUNT; j++) {
        m->local[j] = g_id * 100 + (int32_t)j;
    }
    m->infos[0].name = "weights";
    m->infos[0].data = m->weights;
    m->infos[0].count = W_COUNT;
    m->infos[0].datatype = pcclFloat;
    m->infos[1].name = "bias";
    m->infos[1].data = m->bias;
    m->infos[1].count = B_COUNT;
    m->infos[1].datatype = pcclDouble;
    m->infos[2].name = "steps";
    m->infos[2].data = m->steps;
    m->infos[2].count = 1;
    m->infos[2].datatype = pcclInt64;
    m->infos[3].name = "empty";
    m->infos[3].data = NULL;
    m->infos[3].count = 0;
    m->infos[3].datatype = pcclUint8;
    m->infos[4].name = "local";
    m->infos[4].data = m->local;
    m->infos[4].count = L_COUNT;
    m->infos[4].datatype = pcclInt32;
    m->infos[4].allow_content_inequality = true;
    for (j = 0; j < 5; j++) {
        m->infos[j].device_type = pcclDeviceCpu;
    }
    m->state.revision = 0;
    m->state.count = 5;
    m->state.infos = m->infos;
}

static uint64_t model_hash(const struct model *m) {
    uint64_t h = FNV_OFFSET;
    h = fnv1a(h, m->weights, sizeof m->weights);
    h = fnv1a(h, m->bias, sizeof m->bias);
    h = fnv1a(h, m->steps, sizeof m->steps);
    return h;
}

/* The content every peer must hold after the sync of revision `rev` >= 2. */
static void check_model(const struct model *m, float weight_offset, int64_t steps) {
    size_t j;
    for (j = 0; j < W_COUNT; j++) {
        MUST_TRUE(m->weights[j] == (float)(j % 101) * 0.25f + weight_offset);
    }
    for (j = 0; j < B_COUNT; j++) {
        MUST_TRUE(m->bias[j] == (double)j * 1.5);
    }
    MUST_TRUE(m->steps[0] == steps);
}

static void advance(struct model *m) {
    size_t j;
    for (j = 0; j < W_COUNT; j++) {
        m->weights[j] += 1.0f;
    }
    m->steps[0] += 1;
}

static void sum_check(pcclComm_t *comm, int world) {
    enum { C = 1000 };
    int64_t send[C], recv[C];
    pcclReduceDescriptor_t d = reduce_descriptor(C, pcclSum, g_tag++, pcclInt64);
    size_t j;
    for (j = 0; j < C; j++) {
        send[j] = (int64_t)contribution(pcclSum, pcclInt64, g_id, j);
    }
    MUST(pcclAllReduce(send, recv, &d, comm, NULL), pcclSuccess);
    for (j = 0; j < C; j++) {
        MUST_TRUE((double)recv[j] == expected(pcclSum, pcclInt64, world, j));
    }
}

static void sync_scenario(pcclComm_t *comm, int late) {
    static struct model m;
    pcclSharedStateSyncInfo_t info;
    size_t j;

    model_init(&m, late);
    if (!late) {
        wait_world(comm, 2);
        m.state.revision = 1;
        memset(&info, 0xff, sizeof info);
        MUST(pcclSynchronizeSharedState(comm, &m.state, PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR, &info),
             pcclSuccess);
        MUST_TRUE(m.state.revision == 1);
        MUST_TRUE(info.rx_bytes == 0 && info.tx_bytes == 0); /* both hold the same content */
        check_model(&m, 0.0f, 1);
        for (j = 0; j < L_COUNT; j++) { /* allowed to differ: untouched */
            MUST_TRUE(m.local[j] == g_id * 100 + (int32_t)j);
        }
        sum_check(comm, 2);
        SAY("PHASE1_DONE");
        wait_world(comm, 3);
        advance(&m);
        m.state.revision = 2;
    } else {
        m.state.revision = 0; /* a newcomer adopts the group's revision */
        MUST_TRUE(world_size(comm) == 3);
    }

    memset(&info, 0xff, sizeof info);
    MUST(pcclSynchronizeSharedState(comm, &m.state, PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR, &info),
         pcclSuccess);
    MUST_TRUE(m.state.revision == 2);
    check_model(&m, 1.0f, 2);
    if (late) {
        MUST_TRUE(info.rx_bytes >= sizeof m.weights + sizeof m.bias + sizeof m.steps);
        MUST_TRUE(info.tx_bytes == 0);
    } else {
        MUST_TRUE(info.rx_bytes == 0);
    }
    SAY("SYNC2 %llu %016llx", (unsigned long long)m.state.revision, (unsigned long long)model_hash(&m));

    /* The late joiner now takes part in all-reduces. */
    g_tag = 1000;
    sum_check(comm, 3);

    /* Revision 3: everyone advances identically; nothing is transferred. */
    advance(&m);
    m.state.revision = 3;
    MUST(pcclSynchronizeSharedState(comm, &m.state, PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR, &info),
         pcclSuccess);
    MUST_TRUE(info.rx_bytes == 0);
    check_model(&m, 2.0f, 3);

    /* A revision that does not advance by exactly one is an error, not a repair. */
    MUST(pcclSynchronizeSharedState(comm, &m.state, PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR, &info),
         pcclInvalidUsage);
    MUST_TRUE(m.state.revision == 3);
    m.state.revision = 4;
    MUST(pcclSynchronizeSharedState(comm, &m.state, PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR, &info),
         pcclSuccess);
    MUST_TRUE(m.state.revision == 4);
    check_model(&m, 2.0f, 3);
    SAY("SYNC_DONE %016llx", (unsigned long long)model_hash(&m));
}

/* ---- main ------------------------------------------------------------------------- */

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
    const char *scenario, *role;
    uint16_t port;

    if (argc == 3 && strcmp(argv[1], "master") == 0) {
        return run_master(strtol(argv[2], NULL, 10));
    }
    if (argc != 6 || strcmp(argv[1], "peer") != 0) {
        fprintf(stderr, "usage: %s master PEER_TIMEOUT_MS\n"
                        "       %s peer MASTER_PORT ID short|kill|sync ROLE\n",
                argv[0], argv[0]);
        return 2;
    }
    port = (uint16_t)strtol(argv[2], NULL, 10);
    g_id = (int)strtol(argv[3], NULL, 10);
    scenario = argv[4];
    role = argv[5];

    comm = connect_to(port);
    if (strcmp(scenario, "short") == 0) {
        wait_world(comm, 2);
        SAY("SUITE %016llx", (unsigned long long)suite(comm, 2, 100000));
    } else if (strcmp(scenario, "kill") == 0) {
        wait_world(comm, 3);
        SAY("SUITE %016llx", (unsigned long long)suite(comm, 3, 1 << 20));
        g_tag = 1u << 20;
        kill_loop(comm, strcmp(role, "victim") == 0);
    } else if (strcmp(scenario, "sync") == 0) {
        sync_scenario(comm, strcmp(role, "late") == 0);
    } else {
        fprintf(stderr, "unknown scenario %s\n", scenario);
        return 2;
    }
    MUST(pcclDestroyCommunicator(comm), pcclSuccess);
    SAY("PEER_DONE %d", g_id);
    return 0;
}
