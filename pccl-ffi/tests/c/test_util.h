/*
 * test_util.h - helpers shared by the C test programs of pccl-ffi
 * (args.c, swarm.c): result checks with exact codes, typed buffer access for
 * every pcclDataType_t (including float16 / bfloat16), sleeping, checksums.
 * Plain C99 + POSIX; header-only (every function is static).
 */
#ifndef PCCL_TEST_UTIL_H
#define PCCL_TEST_UTIL_H

#include "pccl.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int g_checks = 0;
static int g_failures = 0;

/* Define PCCL_TEST_THREADS before including this header when checks run on
 * several threads: the counters are then updated under a mutex. */
#ifdef PCCL_TEST_THREADS
#include <pthread.h>
static pthread_mutex_t g_count_lock = PTHREAD_MUTEX_INITIALIZER;
#define COUNT_LOCK() pthread_mutex_lock(&g_count_lock)
#define COUNT_UNLOCK() pthread_mutex_unlock(&g_count_lock)
#else
#define COUNT_LOCK() ((void)0)
#define COUNT_UNLOCK() ((void)0)
#endif

/* Counts one check; returns `ok`. */
static inline int record_check(int ok) {
    COUNT_LOCK();
    g_checks++;
    if (!ok) {
        g_failures++;
    }
    COUNT_UNLOCK();
    return ok;
}

static inline int failure_count(void) {
    int n;
    COUNT_LOCK();
    n = g_failures;
    COUNT_UNLOCK();
    return n;
}

static inline const char *result_name(pcclResult_t r) {
    const char *name = NULL;
    if (pcclGetResultString(r, &name) != pcclSuccess || name == NULL) {
        return "<unknown result>";
    }
    return name;
}

/* Checks that `call` returns exactly `want`; counts and reports failures. */
#define EXPECT(call, want)                                                                     \
    do {                                                                                       \
        pcclResult_t got_ = (call);                                                            \
        pcclResult_t want_ = (want);                                                           \
        if (!record_check(got_ == want_)) {                                                    \
            fprintf(stderr, "%s:%d: FAIL %s\n    returned %s (%d), expected %s (%d)\n"       \
                            "    last error: %s\n",                                            \
                    __FILE__, __LINE__, #call, result_name(got_), (int)got_,                   \
                    result_name(want_), (int)want_, pcclGetLastErrorString());                  \
        }                                                                                      \
    } while (0)

/* Checks a condition; counts and reports failures. */
#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!record_check((cond) ? 1 : 0)) {                                                   \
            fprintf(stderr, "%s:%d: FAIL CHECK(%s)\n", __FILE__, __LINE__, #cond);             \
        }                                                                                      \
    } while (0)

/* Like EXPECT but exits the process at once on failure (for multi-process
 * tests, where going on after a failure only produces follow-up noise). */
#define MUST(call, want)                                                                       \
    do {                                                                                       \
        int before_ = failure_count();                                                         \
        EXPECT(call, want);                                                                    \
        if (failure_count() != before_) {                                                           \
            fflush(stdout);                                                                    \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

#define MUST_TRUE(cond)                                                                        \
    do {                                                                                       \
        int before_ = failure_count();                                                         \
        CHECK(cond);                                                                           \
        if (failure_count() != before_) {                                                           \
            fflush(stdout);                                                                    \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static inline void sleep_ms(long ms) {
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static inline ccoip_socket_address_t ipv4_address(uint8_t a, uint8_t b, uint8_t c, uint8_t d, uint16_t port) {
    ccoip_socket_address_t addr;
    memset(&addr, 0, sizeof addr);
    addr.inet.protocol = inetIPv4;
    addr.inet.ipv4.data[0] = a;
    addr.inet.ipv4.data[1] = b;
    addr.inet.ipv4.data[2] = c;
    addr.inet.ipv4.data[3] = d;
    addr.port = port;
    return addr;
}

/* ---- element types -------------------------------------------------------- */

static const pcclDataType_t ALL_DTYPES[12] = {
    pcclUint8,  pcclInt8,  pcclInt16,   pcclUint16,   pcclUint32, pcclInt32,
    pcclUint64, pcclInt64, pcclFloat16, pcclBFloat16, pcclFloat,  pcclDouble};

static inline const char *dtype_name(pcclDataType_t t) {
    static const char *names[12] = {"u8",  "i8",  "i16", "u16",  "u32", "i32",
                                    "u64", "i64", "f16", "bf16", "f32", "f64"};
    return (unsigned)t < 12u ? names[t] : "?";
}

static inline size_t dtype_size(pcclDataType_t t) {
    switch (t) {
    case pcclUint8:
    case pcclInt8:
        return 1;
    case pcclInt16:
    case pcclUint16:
    case pcclFloat16:
    case pcclBFloat16:
        return 2;
    case pcclUint32:
    case pcclInt32:
    case pcclFloat:
        return 4;
    default:
        return 8;
    }
}

static inline int dtype_is_signed(pcclDataType_t t) {
    return t == pcclInt8 || t == pcclInt16 || t == pcclInt32 || t == pcclInt64 ||
           t == pcclFloat16 || t == pcclBFloat16 || t == pcclFloat || t == pcclDouble;
}

/* IEEE binary16 <-> binary32 for values exactly representable in both
 * (the tests use small integers), so no rounding is needed. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x, sign, mant;
    int32_t exp;
    memcpy(&x, &f, sizeof x);
    sign = (x >> 16) & 0x8000u;
    if ((x & 0x7fffffffu) == 0) {
        return (uint16_t)sign;
    }
    exp = (int32_t)((x >> 23) & 0xffu) - 127 + 15;
    mant = x & 0x7fffffu;
    return (uint16_t)(sign | ((uint32_t)exp << 10) | (mant >> 13));
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exp = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t mant = (uint32_t)h & 0x3ffu;
    uint32_t x;
    float f;
    if (exp == 0 && mant == 0) {
        x = sign;
    } else {
        x = sign | ((exp - 15u + 127u) << 23) | (mant << 13);
    }
    memcpy(&f, &x, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    return (uint16_t)(x >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* Stores v (an integer value representable in the type) at element j. */
static inline void put_value(void *buf, pcclDataType_t t, size_t j, double v) {
    switch (t) {
    case pcclUint8: ((uint8_t *)buf)[j] = (uint8_t)v; break;
    case pcclInt8: ((int8_t *)buf)[j] = (int8_t)v; break;
    case pcclInt16: ((int16_t *)buf)[j] = (int16_t)v; break;
    case pcclUint16: ((uint16_t *)buf)[j] = (uint16_t)v; break;
    case pcclUint32: ((uint32_t *)buf)[j] = (uint32_t)v; break;
    case pcclInt32: ((int32_t *)buf)[j] = (int32_t)v; break;
    case pcclUint64: ((uint64_t *)buf)[j] = (uint64_t)v; break;
    case pcclInt64: ((int64_t *)buf)[j] = (int64_t)v; break;
    case pcclFloat16: ((uint16_t *)buf)[j] = f32_to_f16((float)v); break;
    case pcclBFloat16: ((uint16_t *)buf)[j] = f32_to_bf16((float)v); break;
    case pcclFloat: ((float *)buf)[j] = (float)v; break;
    case pcclDouble: ((double *)buf)[j] = v; break;
    default: break;
    }
}

static inline double get_value(const void *buf, pcclDataType_t t, size_t j) {
    switch (t) {
    case pcclUint8: return (double)((const uint8_t *)buf)[j];
    case pcclInt8: return (double)((const int8_t *)buf)[j];
    case pcclInt16: return (double)((const int16_t *)buf)[j];
    case pcclUint16: return (double)((const uint16_t *)buf)[j];
    case pcclUint32: return (double)((const uint32_t *)buf)[j];
    case pcclInt32: return (double)((const int32_t *)buf)[j];
    case pcclUint64: return (double)((const uint64_t *)buf)[j];
    case pcclInt64: return (double)((const int64_t *)buf)[j];
    case pcclFloat16: return (double)f16_to_f32(((const uint16_t *)buf)[j]);
    case pcclBFloat16: return (double)bf16_to_f32(((const uint16_t *)buf)[j]);
    case pcclFloat: return (double)((const float *)buf)[j];
    case pcclDouble: return ((const double *)buf)[j];
    default: return 0.0;
    }
}

/* FNV-1a over bytes, chained through `h` (start with FNV_OFFSET). */
#define FNV_OFFSET 1469598103934665603ULL
static inline uint64_t fnv1a(uint64_t h, const void *data, size_t len) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static inline pcclReduceDescriptor_t reduce_descriptor(size_t count, pcclRedOp_t op, uint64_t tag,
                                                pcclDataType_t dtype) {
    pcclReduceDescriptor_t d;
    memset(&d, 0, sizeof d);
    d.count = count;
    d.op = op;
    d.tag = tag;
    d.src_descriptor.datatype = dtype;
    d.src_descriptor.distribution_hint = pcclDistributionNone;
    d.quantization_options.quantized_datatype = dtype;
    d.quantization_options.algorithm = pcclQuantNone;
    return d;
}

#endif /* PCCL_TEST_UTIL_H */
