// Compile-only check of the public headers as C++17:
//   g++ -std=c++17 -Wall -Wextra -Werror ... -fsyntax-only
// (run by tests/headers.rs). Checks that the headers are usable from C++,
// that every function has exactly the PCCL 1.0 signature (std::is_same on the
// function type), and that every enumerator and port macro has the value
// listed in SPEC.md section 3, independently of src/types.rs.
#include "pccl.h"
#include "ccoip.h"
#include "ccoip_inet.h"
#include "pccl.h"

#include <cstddef>
#include <cstdint>
#include <type_traits>

#define SAME_TYPE(fn, type) static_assert(std::is_same<decltype(fn), type>::value, #fn " has the wrong signature")

SAME_TYPE(pcclInit, pcclResult_t(void));
SAME_TYPE(pcclCreateCommunicator, pcclResult_t(const pcclCommCreateParams_t *, pcclComm_t **));
SAME_TYPE(pcclGetAttribute, pcclResult_t(const pcclComm_t *, pcclAttribute_t, int *));
SAME_TYPE(pcclDestroyCommunicator, pcclResult_t(pcclComm_t *));
SAME_TYPE(pcclConnect, pcclResult_t(pcclComm_t *));
SAME_TYPE(pcclUpdateTopology, pcclResult_t(pcclComm_t *));
SAME_TYPE(pcclArePeersPending, pcclResult_t(const pcclComm_t *, bool *));
SAME_TYPE(pcclOptimizeTopology, pcclResult_t(const pcclComm_t *));
SAME_TYPE(pcclAllReduce, pcclResult_t(const void *, void *, const pcclReduceDescriptor_t *, const pcclComm_t *,
                                      pcclReduceInfo_t *));
SAME_TYPE(pcclAllReduceAsync, pcclResult_t(const void *, void *, const pcclReduceDescriptor_t *,
                                           const pcclComm_t *, pcclAsyncReduceOp_t *));
SAME_TYPE(pcclAllReduceMultipleWithRetry,
          pcclResult_t(const pcclReduceOpDescriptor_t *, size_t, const pcclComm_t *, pcclReduceInfo_t *, int));
SAME_TYPE(pcclAwaitAsyncReduce, pcclResult_t(const pcclAsyncReduceOp_t *, pcclReduceInfo_t *));
SAME_TYPE(pcclSynchronizeSharedState, pcclResult_t(const pcclComm_t *, pcclSharedState_t *,
                                                   pcclSharedStateSyncStrategy_t, pcclSharedStateSyncInfo_t *));
SAME_TYPE(pcclCreateMaster, pcclResult_t(ccoip_socket_address_t, pcclMasterInstance_t **));
SAME_TYPE(pcclRunMaster, pcclResult_t(pcclMasterInstance_t *));
SAME_TYPE(pcclInterruptMaster, pcclResult_t(pcclMasterInstance_t *));
SAME_TYPE(pcclMasterAwaitTermination, pcclResult_t(pcclMasterInstance_t *));
SAME_TYPE(pcclDestroyMaster, pcclResult_t(pcclMasterInstance_t *));
SAME_TYPE(pcclGetBuildInfo, pcclResult_t(pcclBuildInfo_t *));
// Extensions.
SAME_TYPE(pcclGetLastErrorString, const char *(void));
SAME_TYPE(pcclSetLogLevel, pcclResult_t(pcclLogLevel_t));
SAME_TYPE(pcclSetCommunicatorTimeouts, pcclResult_t(pcclComm_t *, uint32_t, uint32_t));
SAME_TYPE(pcclSetMasterPeerTimeout, pcclResult_t(pcclMasterInstance_t *, uint32_t));
SAME_TYPE(pcclGetResultString, pcclResult_t(pcclResult_t, const char **));
SAME_TYPE(pcclSetCommunicatorPorts, pcclResult_t(pcclComm_t *, uint16_t, uint16_t, uint16_t));
SAME_TYPE(pcclGetMasterListenAddress, pcclResult_t(const pcclMasterInstance_t *, ccoip_socket_address_t *));
SAME_TYPE(pcclSetAllReduceAlgorithm, pcclResult_t(pcclComm_t *, pcclAlgorithm_t));
SAME_TYPE(pcclBroadcast, pcclResult_t(void *, size_t, pcclDataType_t, uint32_t, uint64_t, const pcclComm_t *,
                                      pcclCollectiveInfo_t *));
SAME_TYPE(pcclBroadcastAsync, pcclResult_t(void *, size_t, pcclDataType_t, uint32_t, uint64_t, const pcclComm_t *,
                                           pcclAsyncReduceOp_t *));
SAME_TYPE(pcclAllGather, pcclResult_t(const void *, void *, size_t, pcclDataType_t, uint64_t, const pcclComm_t *,
                                      pcclCollectiveInfo_t *));
SAME_TYPE(pcclAllGatherAsync, pcclResult_t(const void *, void *, size_t, pcclDataType_t, uint64_t,
                                           const pcclComm_t *, pcclAsyncReduceOp_t *));
SAME_TYPE(pcclReduceScatter, pcclResult_t(const void *, void *, const pcclReduceDescriptor_t *, const pcclComm_t *,
                                          pcclCollectiveInfo_t *));
SAME_TYPE(pcclReduceScatterAsync, pcclResult_t(const void *, void *, const pcclReduceDescriptor_t *,
                                               const pcclComm_t *, pcclAsyncReduceOp_t *));
SAME_TYPE(pcclAwaitAsyncCollective, pcclResult_t(const pcclAsyncReduceOp_t *, pcclCollectiveInfo_t *));

// Type names and typedef relations.
static_assert(std::is_same<pcclReduceOpDescriptor_t, struct pcclReduceSingleDescriptor_t>::value, "");
static_assert(std::is_same<pcclMasterInstance_t, struct pcclMasterInstanceState_t>::value, "");
static_assert(std::is_enum<pcclResult_t>::value && std::is_enum<pcclDataType_t>::value, "");
static_assert(std::is_same<decltype(pcclTensorInfo_t::allow_content_inequality), bool>::value, "");
static_assert(std::is_same<decltype(pcclReduceDescriptor_t::count), size_t>::value, "");
static_assert(std::is_same<decltype(ccoip_socket_address_t::port), uint16_t>::value, "");

// Member order (offsets strictly increase in declaration order).
#define ORDERED(T, a, b) static_assert(offsetof(T, a) < offsetof(T, b), #T ": " #a " must precede " #b)
ORDERED(ccoip_inet_address_t, protocol, ipv4);
ORDERED(ccoip_inet_address_t, ipv4, ipv6);
ORDERED(ccoip_socket_address_t, inet, port);
ORDERED(pcclCommCreateParams_t, master_address, peer_group);
ORDERED(pcclCommCreateParams_t, peer_group, p2p_connection_pool_size);
ORDERED(pcclReduceInfo_t, local_world_size, tx_bytes);
ORDERED(pcclReduceInfo_t, tx_bytes, rx_bytes);
ORDERED(pcclReduceOperandDescriptor_t, datatype, distribution_hint);
ORDERED(pcclQuantizationOptions_t, quantized_datatype, algorithm);
ORDERED(pcclReduceDescriptor_t, count, op);
ORDERED(pcclReduceDescriptor_t, op, tag);
ORDERED(pcclReduceDescriptor_t, tag, src_descriptor);
ORDERED(pcclReduceDescriptor_t, src_descriptor, quantization_options);
ORDERED(pcclReduceOpDescriptor_t, sendbuf, recvbuf);
ORDERED(pcclReduceOpDescriptor_t, recvbuf, descriptor);
ORDERED(pcclAsyncReduceOp_t, comm, tag);
ORDERED(pcclCollectiveInfo_t, world_size, rank);
ORDERED(pcclCollectiveInfo_t, rank, tx_bytes);
ORDERED(pcclCollectiveInfo_t, tx_bytes, rx_bytes);
ORDERED(pcclCollectiveInfo_t, rx_bytes, algorithm);
ORDERED(pcclTensorInfo_t, name, data);
ORDERED(pcclTensorInfo_t, data, count);
ORDERED(pcclTensorInfo_t, count, datatype);
ORDERED(pcclTensorInfo_t, datatype, device_type);
ORDERED(pcclTensorInfo_t, device_type, allow_content_inequality);
ORDERED(pcclSharedState_t, revision, count);
ORDERED(pcclSharedState_t, count, infos);
ORDERED(pcclSharedStateSyncInfo_t, tx_bytes, rx_bytes);
static_assert(sizeof(ccoip_ipv4_address_t::data) == 4 && sizeof(ccoip_ipv6_address_t::data) == 16, "");
static_assert(sizeof(pcclRankUuid_t::data) == 16, "");

// Values from SPEC.md section 3.
#define VALUE(name, v) static_assert((name) == (v), #name " must be " #v)
VALUE(CCOIP_PROTOCOL_PORT_MASTER, 48148);
VALUE(CCOIP_PROTOCOL_PORT_SHARED_STATE, 48149);
VALUE(CCOIP_PROTOCOL_PORT_P2P, 48150);
VALUE(CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK, 48151);
VALUE(inetIPv4, 0);
VALUE(inetIPv6, 1);
VALUE(pcclSuccess, 0);
VALUE(pcclNotInitialized, 1);
VALUE(pcclInternalError, 2);
VALUE(pcclInvalidArgument, 3);
VALUE(pcclInvalidUsage, 4);
VALUE(pcclTooFewPeers, 5);
VALUE(pcclMasterConnectionFailed, 6);
VALUE(pcclRankConnectionFailed, 7);
VALUE(pcclRankConnectionLost, 8);
VALUE(pcclNoSharedStateAvailable, 9);
VALUE(pcclPendingAsyncOps, 10);
VALUE(pcclUpdateTopologyFailed, 11);
VALUE(pcclTopologyOptimizationFailed, 12);
VALUE(pcclUint8, 0);
VALUE(pcclInt8, 1);
VALUE(pcclInt16, 2);
VALUE(pcclUint16, 3);
VALUE(pcclUint32, 4);
VALUE(pcclInt32, 5);
VALUE(pcclUint64, 6);
VALUE(pcclInt64, 7);
VALUE(pcclFloat16, 8);
VALUE(pcclBFloat16, 9);
VALUE(pcclFloat, 10);
VALUE(pcclDouble, 11);
VALUE(pcclDeviceCpu, 0);
VALUE(pcclDeviceCuda, 1);
VALUE(pcclSum, 0);
VALUE(pcclAvg, 1);
VALUE(pcclProd, 2);
VALUE(pcclMax, 3);
VALUE(pcclMin, 4);
VALUE(PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE, 1);
VALUE(PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE, 2);
VALUE(PCCL_ATTRIBUTE_NUM_DISTINCT_PEER_GROUPS, 3);
VALUE(PCCL_ATTRIBUTE_LARGEST_PEER_GROUP_WORLD_SIZE, 4);
VALUE(PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR, 0);
VALUE(PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY, 1);
VALUE(PCCL_SHARED_STATE_SYNC_STRATEGY_SEND_ONLY, 2);
VALUE(pcclDistributionNone, 0);
VALUE(pcclDistributionNormal, 1);
VALUE(pcclDistributionUniform, 2);
VALUE(pcclQuantNone, 0);
VALUE(pcclQuantMinMax, 1);
VALUE(pcclQuantZeroPointScale, 2);
VALUE(pcclLogOff, 0);
VALUE(pcclLogError, 1);
VALUE(pcclLogWarn, 2);
VALUE(pcclLogInfo, 3);
VALUE(pcclLogDebug, 4);
VALUE(pcclLogTrace, 5);
VALUE(pcclAlgorithmAuto, 0);
VALUE(pcclAlgorithmRing, 1);
VALUE(pcclAlgorithmDirect, 2);

// Typical C++ use: aggregate initialization, nullptr for nullable pointers.
int pccl_header_cxx_check();
int pccl_header_cxx_check() {
    pcclCommCreateParams_t params{};
    params.master_address.inet.protocol = inetIPv4;
    params.master_address.inet.ipv4 = ccoip_ipv4_address_t{{127, 0, 0, 1}};
    params.master_address.port = CCOIP_PROTOCOL_PORT_MASTER;
    pcclReduceDescriptor_t desc{};
    desc.count = 4;
    desc.op = pcclAvg;
    desc.src_descriptor = pcclReduceOperandDescriptor_t{pcclFloat, pcclDistributionNone};
    desc.quantization_options = pcclQuantizationOptions_t{pcclUint8, pcclQuantNone};
    float buf[4] = {};
    pcclTensorInfo_t infos[] = {{"w", buf, 4, pcclFloat, pcclDeviceCpu, false}};
    pcclSharedState_t state{0, 1, infos};
    pcclComm_t *comm = nullptr;
    int rc = 0;
    if (params.peer_group != 0) { // never true; type-checks calls
        rc += pcclCreateCommunicator(&params, &comm);
        rc += pcclAllReduce(buf, buf, &desc, comm, nullptr);
        rc += pcclSynchronizeSharedState(comm, &state, PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY, nullptr);
    }
    return rc + static_cast<int>(state.count);
}
