/*
 * Prints the C compiler's view of every type in the PCCL headers, one fact
 * per line as "<kind> <name> <number>":
 *   size T / align T           sizeof / _Alignof of a type
 *   offset T.m / fieldsize T.m offsetof / sizeof of a struct member
 *   value NAME                 an enumerator or numeric macro
 * tests/layout.rs computes the same facts from src/types.rs and compares.
 * It also parses the headers and fails if a struct member, enumerator or
 * numeric macro declared there is missing here, so extend this file whenever
 * the headers grow.
 *
 * Compiled as C11 (for _Alignof); the headers themselves are checked for C99
 * by header_c99.c.
 */
#include <stddef.h>
#include <stdio.h>

#include "ccoip.h"
#include "ccoip_inet.h"
#include "pccl.h"

#define TYPE(T)                                                   \
    do {                                                          \
        printf("size %s %zu\n", #T, sizeof(T));                   \
        printf("align %s %zu\n", #T, (size_t)_Alignof(T));        \
    } while (0)

#define FIELD(T, m)                                               \
    do {                                                          \
        printf("offset %s.%s %zu\n", #T, #m, offsetof(T, m));     \
        printf("fieldsize %s.%s %zu\n", #T, #m, sizeof(((T *)0)->m)); \
    } while (0)

#define VALUE(V) printf("value %s %lld\n", #V, (long long)(V))

int main(void) {
    /* ccoip.h */
    VALUE(CCOIP_PROTOCOL_PORT_MASTER);
    VALUE(CCOIP_PROTOCOL_PORT_SHARED_STATE);
    VALUE(CCOIP_PROTOCOL_PORT_P2P);
    VALUE(CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK);

    /* ccoip_inet.h */
    TYPE(ccoip_inet_protocol_t);
    VALUE(inetIPv4);
    VALUE(inetIPv6);

    TYPE(ccoip_ipv4_address_t);
    FIELD(ccoip_ipv4_address_t, data);

    TYPE(ccoip_ipv6_address_t);
    FIELD(ccoip_ipv6_address_t, data);

    TYPE(ccoip_inet_address_t);
    FIELD(ccoip_inet_address_t, protocol);
    FIELD(ccoip_inet_address_t, ipv4);
    FIELD(ccoip_inet_address_t, ipv6);

    TYPE(ccoip_socket_address_t);
    FIELD(ccoip_socket_address_t, inet);
    FIELD(ccoip_socket_address_t, port);

    /* pccl.h: enumerations */
    TYPE(pcclResult_t);
    VALUE(pcclSuccess);
    VALUE(pcclNotInitialized);
    VALUE(pcclInternalError);
    VALUE(pcclInvalidArgument);
    VALUE(pcclInvalidUsage);
    VALUE(pcclTooFewPeers);
    VALUE(pcclMasterConnectionFailed);
    VALUE(pcclRankConnectionFailed);
    VALUE(pcclRankConnectionLost);
    VALUE(pcclNoSharedStateAvailable);
    VALUE(pcclPendingAsyncOps);
    VALUE(pcclUpdateTopologyFailed);
    VALUE(pcclTopologyOptimizationFailed);

    TYPE(pcclDataType_t);
    VALUE(pcclUint8);
    VALUE(pcclInt8);
    VALUE(pcclInt16);
    VALUE(pcclUint16);
    VALUE(pcclUint32);
    VALUE(pcclInt32);
    VALUE(pcclUint64);
    VALUE(pcclInt64);
    VALUE(pcclFloat16);
    VALUE(pcclBFloat16);
    VALUE(pcclFloat);
    VALUE(pcclDouble);

    TYPE(pcclDeviceType_t);
    VALUE(pcclDeviceCpu);
    VALUE(pcclDeviceCuda);

    TYPE(pcclRedOp_t);
    VALUE(pcclSum);
    VALUE(pcclAvg);
    VALUE(pcclProd);
    VALUE(pcclMax);
    VALUE(pcclMin);

    TYPE(pcclAttribute_t);
    VALUE(PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE);
    VALUE(PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE);
    VALUE(PCCL_ATTRIBUTE_NUM_DISTINCT_PEER_GROUPS);
    VALUE(PCCL_ATTRIBUTE_LARGEST_PEER_GROUP_WORLD_SIZE);

    TYPE(pcclSharedStateSyncStrategy_t);
    VALUE(PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR);
    VALUE(PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY);
    VALUE(PCCL_SHARED_STATE_SYNC_STRATEGY_SEND_ONLY);

    TYPE(pcclDistributionHint_t);
    VALUE(pcclDistributionNone);
    VALUE(pcclDistributionNormal);
    VALUE(pcclDistributionUniform);

    TYPE(pcclQuantizationAlgorithm_t);
    VALUE(pcclQuantNone);
    VALUE(pcclQuantMinMax);
    VALUE(pcclQuantZeroPointScale);

    TYPE(pcclLogLevel_t);
    VALUE(pcclLogOff);
    VALUE(pcclLogError);
    VALUE(pcclLogWarn);
    VALUE(pcclLogInfo);
    VALUE(pcclLogDebug);
    VALUE(pcclLogTrace);

    TYPE(pcclAlgorithm_t);
    VALUE(pcclAlgorithmAuto);
    VALUE(pcclAlgorithmRing);
    VALUE(pcclAlgorithmDirect);
    VALUE(pcclAlgorithmRelay);

    /* pccl.h: structures */
    TYPE(pcclCommCreateParams_t);
    FIELD(pcclCommCreateParams_t, master_address);
    FIELD(pcclCommCreateParams_t, peer_group);
    FIELD(pcclCommCreateParams_t, p2p_connection_pool_size);

    TYPE(pcclReduceInfo_t);
    FIELD(pcclReduceInfo_t, local_world_size);
    FIELD(pcclReduceInfo_t, tx_bytes);
    FIELD(pcclReduceInfo_t, rx_bytes);

    TYPE(pcclReduceOperandDescriptor_t);
    FIELD(pcclReduceOperandDescriptor_t, datatype);
    FIELD(pcclReduceOperandDescriptor_t, distribution_hint);

    TYPE(pcclQuantizationOptions_t);
    FIELD(pcclQuantizationOptions_t, quantized_datatype);
    FIELD(pcclQuantizationOptions_t, algorithm);

    TYPE(pcclReduceDescriptor_t);
    FIELD(pcclReduceDescriptor_t, count);
    FIELD(pcclReduceDescriptor_t, op);
    FIELD(pcclReduceDescriptor_t, tag);
    FIELD(pcclReduceDescriptor_t, src_descriptor);
    FIELD(pcclReduceDescriptor_t, quantization_options);

    /* struct pcclReduceSingleDescriptor_t, typedef'd pcclReduceOpDescriptor_t */
    TYPE(pcclReduceOpDescriptor_t);
    printf("size pcclReduceSingleDescriptor_t %zu\n", sizeof(struct pcclReduceSingleDescriptor_t));
    FIELD(pcclReduceOpDescriptor_t, sendbuf);
    FIELD(pcclReduceOpDescriptor_t, recvbuf);
    FIELD(pcclReduceOpDescriptor_t, descriptor);

    TYPE(pcclAsyncReduceOp_t);
    FIELD(pcclAsyncReduceOp_t, comm);
    FIELD(pcclAsyncReduceOp_t, tag);

    TYPE(pcclCollectiveInfo_t);
    FIELD(pcclCollectiveInfo_t, world_size);
    FIELD(pcclCollectiveInfo_t, rank);
    FIELD(pcclCollectiveInfo_t, tx_bytes);
    FIELD(pcclCollectiveInfo_t, rx_bytes);
    FIELD(pcclCollectiveInfo_t, algorithm);

    TYPE(pcclRankUuid_t);
    FIELD(pcclRankUuid_t, data);

    TYPE(pcclTensorInfo_t);
    FIELD(pcclTensorInfo_t, name);
    FIELD(pcclTensorInfo_t, data);
    FIELD(pcclTensorInfo_t, count);
    FIELD(pcclTensorInfo_t, datatype);
    FIELD(pcclTensorInfo_t, device_type);
    FIELD(pcclTensorInfo_t, allow_content_inequality);

    TYPE(pcclSharedState_t);
    FIELD(pcclSharedState_t, revision);
    FIELD(pcclSharedState_t, count);
    FIELD(pcclSharedState_t, infos);

    TYPE(pcclSharedStateSyncInfo_t);
    FIELD(pcclSharedStateSyncInfo_t, tx_bytes);
    FIELD(pcclSharedStateSyncInfo_t, rx_bytes);

    TYPE(pcclBuildInfo_t);
    FIELD(pcclBuildInfo_t, has_cuda_support);

    return 0;
}
