/*
 * hello.c - the canonical PCCL training loop in C.
 *
 *   hello [STEPS [MASTER_IP:PORT]]        (defaults: 5, 127.0.0.1:48148)
 *
 * Start a master first (any PCCL master, e.g. `pccl-master`), then run this
 * program on two or more machines (or twice on one; set PCCL_PEER_PORT_BASE=0
 * to give each process free ports). Every peer:
 *
 *   1. connects, retrying while the master is not reachable yet;
 *   2. each step: lets pending peers join (update topology), makes its
 *      shared state - the model weights - identical to the group's (a
 *      newcomer receives them; the revision is the step number), all-reduces
 *      its local "gradient" (average, retried if a peer dies), applies the
 *      same update as every other peer, and prints a checksum of the weights;
 *   3. stops after STEPS steps.
 *
 * All peers print the same checksum at every step: the weights are
 * bit-identical everywhere.
 *
 * Build: cc -std=c99 hello.c $(pkg-config --cflags --libs pccl)
 */
#define _POSIX_C_SOURCE 200809L

#include <pccl.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N_WEIGHTS 1024

/* Prints the failed call, its result name and the library's message; exits. */
#define PCCL_CHECK(call)                                                                       \
    do {                                                                                       \
        pcclResult_t r_ = (call);                                                              \
        if (r_ != pcclSuccess) {                                                               \
            const char *name_ = "?";                                                           \
            pcclGetResultString(r_, &name_);                                                   \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, name_, pcclGetLastErrorString());   \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static void sleep_ms(long ms) {
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    nanosleep(&ts, NULL);
}

/* FNV-1a checksum of the weights' bytes. */
static unsigned long long checksum(const float *w, size_t n) {
    const unsigned char *p = (const unsigned char *)w;
    unsigned long long h = 1469598103934665603ULL;
    size_t i;
    for (i = 0; i < n * sizeof(float); i++) {
        h = (h ^ p[i]) * 1099511628211ULL;
    }
    return h;
}

static int parse_address(const char *text, ccoip_socket_address_t *addr) {
    unsigned a, b, c, d, port;
    if (sscanf(text, "%u.%u.%u.%u:%u", &a, &b, &c, &d, &port) != 5 || a > 255 || b > 255 ||
        c > 255 || d > 255 || port == 0 || port > 65535) {
        return 0;
    }
    memset(addr, 0, sizeof *addr);
    addr->inet.protocol = inetIPv4;
    addr->inet.ipv4.data[0] = (uint8_t)a;
    addr->inet.ipv4.data[1] = (uint8_t)b;
    addr->inet.ipv4.data[2] = (uint8_t)c;
    addr->inet.ipv4.data[3] = (uint8_t)d;
    addr->port = (uint16_t)port;
    return 1;
}

int main(int argc, char **argv) {
    static float weights[N_WEIGHTS], grad[N_WEIGHTS];
    long steps = argc > 1 ? strtol(argv[1], NULL, 10) : 5;
    const char *master = argc > 2 ? argv[2] : "127.0.0.1:48148";
    pcclCommCreateParams_t params;
    pcclComm_t *comm = NULL;
    pcclTensorInfo_t tensor;
    pcclSharedState_t state;
    pcclReduceOpDescriptor_t op;
    unsigned seed = (unsigned)getpid();
    long step = 0, pass;
    int attempt, world = 0, i;

    memset(&params, 0, sizeof params);
    if (steps < 1 || !parse_address(master, &params.master_address)) {
        fprintf(stderr, "usage: %s [STEPS [MASTER_IP:PORT]]\n", argv[0]);
        return 2;
    }
    params.peer_group = 0;
    params.p2p_connection_pool_size = 1;

    PCCL_CHECK(pcclInit());
    PCCL_CHECK(pcclCreateCommunicator(&params, &comm));

    /* 1. Connect, retrying while the master is not up yet. */
    for (attempt = 1;; attempt++) {
        pcclResult_t r = pcclConnect(comm);
        if (r == pcclSuccess) {
            break;
        }
        if (attempt == 10) {
            PCCL_CHECK(r);
        }
        fprintf(stderr, "connect attempt %d failed (%s); retrying\n", attempt, pcclGetLastErrorString());
        sleep_ms(1000);
    }

    /* The shared state: the weights (all zero until the first sync). */
    memset(&tensor, 0, sizeof tensor);
    tensor.name = "weights";
    tensor.data = weights;
    tensor.count = N_WEIGHTS;
    tensor.datatype = pcclFloat;
    tensor.device_type = pcclDeviceCpu;
    tensor.allow_content_inequality = false;
    state.revision = 0;
    state.count = 1;
    state.infos = &tensor;

    for (pass = 0; step < steps; pass++) {
        pcclReduceInfo_t info;
        pcclResult_t r;
        bool pending = false;

        /* 2a. Let waiting peers join (alone, always update: that admits
         *     them). Not on this peer's first pass: the peers that admitted
         *     it have done this part of the step already and are on their
         *     way to the shared-state sync, where it must meet them. */
        if (pass > 0) {
            PCCL_CHECK(pcclGetAttribute(comm, PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE, &world));
            if (world > 1) {
                PCCL_CHECK(pcclArePeersPending(comm, &pending));
            }
            if (world == 1 || pending) {
                r = pcclUpdateTopology(comm);
                if (r != pcclSuccess && r != pcclUpdateTopologyFailed) {
                    PCCL_CHECK(r);
                }
            }
        }
        PCCL_CHECK(pcclGetAttribute(comm, PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE, &world));
        if (world < 2) {
            printf("waiting for peers...\n");
            fflush(stdout);
            sleep_ms(200);
            continue;
        }

        /* 2b. Make the weights identical to the group's (revision = step). A
         *     newcomer adopts the group's revision, i.e. its step. */
        state.revision = (uint64_t)step;
        PCCL_CHECK(pcclSynchronizeSharedState(comm, &state, PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR,
                                              NULL));
        step = (long)state.revision;

        /* 2c. A local "gradient" (different on every peer), averaged. */
        for (i = 0; i < N_WEIGHTS; i++) {
            grad[i] = weights[i] * 0.01f - (float)((unsigned)i * 7u + seed) / 4096.0f;
        }
        memset(&op, 0, sizeof op);
        op.sendbuf = grad;
        op.recvbuf = grad;
        op.descriptor.count = N_WEIGHTS;
        op.descriptor.op = pcclAvg;
        op.descriptor.tag = (uint64_t)step;
        op.descriptor.src_descriptor.datatype = pcclFloat;
        op.descriptor.src_descriptor.distribution_hint = pcclDistributionNone;
        op.descriptor.quantization_options.algorithm = pcclQuantNone;
        r = pcclAllReduceMultipleWithRetry(&op, 1, comm, &info, 1);
        if (r == pcclTooFewPeers) {
            step++; /* the other peers left; the next sync keeps the revision moving */
            continue;
        }
        PCCL_CHECK(r);

        /* 2d. The same update on every peer keeps the weights identical. */
        for (i = 0; i < N_WEIGHTS; i++) {
            weights[i] -= 0.5f * grad[i];
        }
        printf("step %ld world %u checksum %016llx\n", step, info.local_world_size,
               checksum(weights, N_WEIGHTS));
        fflush(stdout);
        step++;
    }

    PCCL_CHECK(pcclDestroyCommunicator(comm));
    return 0;
}
