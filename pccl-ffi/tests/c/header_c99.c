/*
 * Compile-only check of the public headers as strict C99:
 *   gcc -std=c99 -pedantic -Wall -Wextra -Werror ... -fsyntax-only
 * (run by tests/headers.rs). Includes every header (twice, to exercise the
 * include guards), uses every type, struct member and enumerator, and restates
 * every function signature as an explicitly typed function pointer, so a
 * signature that drifts from PCCL 1.0's fails to compile (C compilers reject
 * incompatible pointer assignments under -Werror).
 */
#include "ccoip.h"
#include "ccoip_inet.h"
#include "pccl.h"
#include "pccl.h"
#include "ccoip_inet.h"
#include "ccoip.h"

int pccl_header_c99_check(void);

typedef pcclResult_t (*init_fn)(void);
typedef pcclResult_t (*create_comm_fn)(const pcclCommCreateParams_t *, pcclComm_t **);
typedef pcclResult_t (*get_attribute_fn)(const pcclComm_t *, pcclAttribute_t, int *);
typedef pcclResult_t (*destroy_comm_fn)(pcclComm_t *);
typedef pcclResult_t (*connect_fn)(pcclComm_t *);
typedef pcclResult_t (*update_topology_fn)(pcclComm_t *);
typedef pcclResult_t (*are_peers_pending_fn)(const pcclComm_t *, bool *);
typedef pcclResult_t (*optimize_topology_fn)(const pcclComm_t *);
typedef pcclResult_t (*all_reduce_fn)(const void *, void *, const pcclReduceDescriptor_t *,
                                      const pcclComm_t *, pcclReduceInfo_t *);
typedef pcclResult_t (*all_reduce_async_fn)(const void *, void *, const pcclReduceDescriptor_t *,
                                            const pcclComm_t *, pcclAsyncReduceOp_t *);
typedef pcclResult_t (*all_reduce_multiple_fn)(const pcclReduceOpDescriptor_t *, size_t,
                                               const pcclComm_t *, pcclReduceInfo_t *, int);
typedef pcclResult_t (*await_async_reduce_fn)(const pcclAsyncReduceOp_t *, pcclReduceInfo_t *);
typedef pcclResult_t (*sync_shared_state_fn)(const pcclComm_t *, pcclSharedState_t *,
                                             pcclSharedStateSyncStrategy_t,
                                             pcclSharedStateSyncInfo_t *);
typedef pcclResult_t (*create_master_fn)(ccoip_socket_address_t, pcclMasterInstance_t **);
typedef pcclResult_t (*master_fn)(pcclMasterInstance_t *);
typedef pcclResult_t (*build_info_fn)(pcclBuildInfo_t *);
typedef const char *(*last_error_fn)(void);
typedef pcclResult_t (*set_log_level_fn)(pcclLogLevel_t);
typedef pcclResult_t (*set_comm_timeouts_fn)(pcclComm_t *, uint32_t, uint32_t);
typedef pcclResult_t (*set_master_timeout_fn)(pcclMasterInstance_t *, uint32_t);
typedef pcclResult_t (*result_string_fn)(pcclResult_t, const char **);
typedef pcclResult_t (*set_comm_ports_fn)(pcclComm_t *, uint16_t, uint16_t, uint16_t);
typedef pcclResult_t (*master_address_fn)(const pcclMasterInstance_t *, ccoip_socket_address_t *);
typedef pcclResult_t (*set_algorithm_fn)(pcclComm_t *, pcclAlgorithm_t);
typedef pcclResult_t (*broadcast_fn)(void *, size_t, pcclDataType_t, uint32_t, uint64_t, const pcclComm_t *,
                                     pcclCollectiveInfo_t *);
typedef pcclResult_t (*broadcast_async_fn)(void *, size_t, pcclDataType_t, uint32_t, uint64_t,
                                           const pcclComm_t *, pcclAsyncReduceOp_t *);
typedef pcclResult_t (*all_gather_fn)(const void *, void *, size_t, pcclDataType_t, uint64_t, const pcclComm_t *,
                                      pcclCollectiveInfo_t *);
typedef pcclResult_t (*all_gather_async_fn)(const void *, void *, size_t, pcclDataType_t, uint64_t,
                                            const pcclComm_t *, pcclAsyncReduceOp_t *);
typedef pcclResult_t (*reduce_scatter_fn)(const void *, void *, const pcclReduceDescriptor_t *, const pcclComm_t *,
                                          pcclCollectiveInfo_t *);
typedef pcclResult_t (*reduce_scatter_async_fn)(const void *, void *, const pcclReduceDescriptor_t *,
                                                const pcclComm_t *, pcclAsyncReduceOp_t *);
typedef pcclResult_t (*await_collective_fn)(const pcclAsyncReduceOp_t *, pcclCollectiveInfo_t *);

int pccl_header_c99_check(void) {
    init_fn f_init = pcclInit;
    create_comm_fn f_create = pcclCreateCommunicator;
    get_attribute_fn f_attr = pcclGetAttribute;
    destroy_comm_fn f_destroy = pcclDestroyCommunicator;
    connect_fn f_connect = pcclConnect;
    update_topology_fn f_update = pcclUpdateTopology;
    are_peers_pending_fn f_pending = pcclArePeersPending;
    optimize_topology_fn f_optimize = pcclOptimizeTopology;
    all_reduce_fn f_all_reduce = pcclAllReduce;
    all_reduce_async_fn f_all_reduce_async = pcclAllReduceAsync;
    all_reduce_multiple_fn f_multiple = pcclAllReduceMultipleWithRetry;
    await_async_reduce_fn f_await = pcclAwaitAsyncReduce;
    sync_shared_state_fn f_sync = pcclSynchronizeSharedState;
    create_master_fn f_create_master = pcclCreateMaster;
    master_fn f_run_master = pcclRunMaster;
    master_fn f_interrupt_master = pcclInterruptMaster;
    master_fn f_await_master = pcclMasterAwaitTermination;
    master_fn f_destroy_master = pcclDestroyMaster;
    build_info_fn f_build_info = pcclGetBuildInfo;
    last_error_fn f_last_error = pcclGetLastErrorString;
    set_log_level_fn f_log = pcclSetLogLevel;
    set_comm_timeouts_fn f_comm_timeouts = pcclSetCommunicatorTimeouts;
    set_master_timeout_fn f_master_timeout = pcclSetMasterPeerTimeout;
    result_string_fn f_result_string = pcclGetResultString;
    set_comm_ports_fn f_comm_ports = pcclSetCommunicatorPorts;
    master_address_fn f_master_address = pcclGetMasterListenAddress;
    set_algorithm_fn f_set_algorithm = pcclSetAllReduceAlgorithm;
    broadcast_fn f_broadcast = pcclBroadcast;
    broadcast_async_fn f_broadcast_async = pcclBroadcastAsync;
    all_gather_fn f_all_gather = pcclAllGather;
    all_gather_async_fn f_all_gather_async = pcclAllGatherAsync;
    reduce_scatter_fn f_reduce_scatter = pcclReduceScatter;
    reduce_scatter_async_fn f_reduce_scatter_async = pcclReduceScatterAsync;
    await_collective_fn f_await_collective = pcclAwaitAsyncCollective;
    pcclAlgorithm_t ar_algorithms[] = {pcclAlgorithmAuto, pcclAlgorithmRing, pcclAlgorithmDirect};
    pcclCollectiveInfo_t coll_info;

    /* Every enumerator, in a variable of its enum type. */
    ccoip_inet_protocol_t protocols[] = {inetIPv4, inetIPv6};
    pcclResult_t results[] = {
        pcclSuccess, pcclNotInitialized, pcclInternalError, pcclInvalidArgument,
        pcclInvalidUsage, pcclTooFewPeers, pcclMasterConnectionFailed,
        pcclRankConnectionFailed, pcclRankConnectionLost, pcclNoSharedStateAvailable,
        pcclPendingAsyncOps, pcclUpdateTopologyFailed, pcclTopologyOptimizationFailed};
    pcclDataType_t datatypes[] = {pcclUint8, pcclInt8, pcclInt16, pcclUint16,
                                  pcclUint32, pcclInt32, pcclUint64, pcclInt64,
                                  pcclFloat16, pcclBFloat16, pcclFloat, pcclDouble};
    pcclDeviceType_t devices[] = {pcclDeviceCpu, pcclDeviceCuda};
    pcclRedOp_t ops[] = {pcclSum, pcclAvg, pcclProd, pcclMax, pcclMin};
    pcclAttribute_t attributes[] = {
        PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE, PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE,
        PCCL_ATTRIBUTE_NUM_DISTINCT_PEER_GROUPS, PCCL_ATTRIBUTE_LARGEST_PEER_GROUP_WORLD_SIZE};
    pcclSharedStateSyncStrategy_t strategies[] = {
        PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR,
        PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY,
        PCCL_SHARED_STATE_SYNC_STRATEGY_SEND_ONLY};
    pcclDistributionHint_t hints[] = {pcclDistributionNone, pcclDistributionNormal,
                                      pcclDistributionUniform};
    pcclQuantizationAlgorithm_t algorithms[] = {pcclQuantNone, pcclQuantMinMax,
                                                pcclQuantZeroPointScale};
    pcclLogLevel_t levels[] = {pcclLogOff,  pcclLogError, pcclLogWarn,
                               pcclLogInfo, pcclLogDebug, pcclLogTrace};
    int ports[] = {CCOIP_PROTOCOL_PORT_MASTER, CCOIP_PROTOCOL_PORT_SHARED_STATE,
                   CCOIP_PROTOCOL_PORT_P2P, CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK};

    /* Every struct and member. */
    ccoip_ipv4_address_t v4;
    ccoip_ipv6_address_t v6;
    ccoip_inet_address_t inet;
    ccoip_socket_address_t sock;
    pcclCommCreateParams_t params;
    pcclComm_t *comm = NULL;
    pcclRankInfo_t *rank_info = NULL;
    pcclReduceInfo_t reduce_info;
    pcclReduceOperandDescriptor_t operand;
    pcclQuantizationOptions_t quant;
    pcclReduceDescriptor_t desc;
    pcclReduceOpDescriptor_t op_desc;
    struct pcclReduceSingleDescriptor_t *single = &op_desc;
    pcclAsyncReduceOp_t handle;
    pcclRankUuid_t uuid;
    pcclTensorInfo_t tensor;
    pcclSharedState_t state;
    pcclSharedStateSyncInfo_t sync_info;
    pcclMasterInstance_t *master = NULL;
    struct pcclMasterInstanceState_t *master_state = master;
    pcclBuildInfo_t build;
    float buffer[4] = {0};
    int sum = 0;
    size_t i;

    v4.data[0] = 127;
    v6.data[15] = 1;
    inet.protocol = inetIPv4;
    inet.ipv4 = v4;
    inet.ipv6 = v6;
    sock.inet = inet;
    sock.port = CCOIP_PROTOCOL_PORT_MASTER;
    params.master_address = sock;
    params.peer_group = 0;
    params.p2p_connection_pool_size = 0;

    reduce_info.local_world_size = 1;
    reduce_info.tx_bytes = 0;
    reduce_info.rx_bytes = 0;
    operand.datatype = pcclFloat;
    operand.distribution_hint = pcclDistributionNone;
    quant.quantized_datatype = pcclUint8;
    quant.algorithm = pcclQuantNone;
    desc.count = 4;
    desc.op = pcclSum;
    desc.tag = 0;
    desc.src_descriptor = operand;
    desc.quantization_options = quant;
    op_desc.sendbuf = buffer;
    op_desc.recvbuf = buffer;
    op_desc.descriptor = desc;
    handle.comm = comm;
    handle.tag = single->descriptor.tag;
    uuid.data[0] = 0;
    tensor.name = "weights";
    tensor.data = buffer;
    tensor.count = 4;
    tensor.datatype = pcclFloat;
    tensor.device_type = pcclDeviceCpu;
    tensor.allow_content_inequality = false;
    state.revision = 0;
    state.count = 1;
    state.infos = &tensor;
    sync_info.tx_bytes = 0;
    sync_info.rx_bytes = 0;
    build.has_cuda_support = true;
    coll_info.world_size = 1;
    coll_info.rank = 0;
    coll_info.tx_bytes = 0;
    coll_info.rx_bytes = 0;
    coll_info.algorithm = ar_algorithms[2];

    for (i = 0; i < sizeof results / sizeof results[0]; ++i) sum += (int)results[i];
    for (i = 0; i < sizeof datatypes / sizeof datatypes[0]; ++i) sum += (int)datatypes[i];
    sum += (int)protocols[1] + (int)devices[1] + (int)ops[4] + (int)attributes[3] +
           (int)strategies[2] + (int)hints[2] + (int)algorithms[2] + (int)levels[5] + ports[3];
    sum += (int)sock.port + (int)params.peer_group + (int)reduce_info.local_world_size +
           (int)handle.tag + uuid.data[0] + (int)state.count + (int)sync_info.rx_bytes +
           (int)build.has_cuda_support + (rank_info == NULL) + (master_state == NULL);
    sum += (int)coll_info.world_size + (int)coll_info.rank + (int)coll_info.tx_bytes +
           (int)coll_info.rx_bytes + (int)coll_info.algorithm;
    (void)f_set_algorithm;
    (void)f_broadcast;
    (void)f_broadcast_async;
    (void)f_all_gather;
    (void)f_all_gather_async;
    (void)f_reduce_scatter;
    (void)f_reduce_scatter_async;
    (void)f_await_collective;

    (void)f_init;
    (void)f_all_reduce;
    (void)f_create;
    (void)f_attr;
    (void)f_destroy;
    (void)f_connect;
    (void)f_update;
    (void)f_pending;
    (void)f_optimize;
    (void)f_all_reduce_async;
    (void)f_multiple;
    (void)f_await;
    (void)f_sync;
    (void)f_create_master;
    (void)f_run_master;
    (void)f_interrupt_master;
    (void)f_await_master;
    (void)f_destroy_master;
    (void)f_build_info;
    (void)f_last_error;
    (void)f_log;
    (void)f_comm_timeouts;
    (void)f_master_timeout;
    (void)f_result_string;
    (void)f_comm_ports;
    (void)f_master_address;
    if (sum < 0) {
        /* Never executed; type-checks realistic calls, NULL for the nullable
         * parameters included (compile-only test). */
        bool pending = false;
        int attr = 0;
        const char *name = NULL;
        sum += (int)pcclInit();
        sum += (int)pcclCreateCommunicator(&params, &comm);
        sum += (int)pcclGetAttribute(comm, PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE, &attr);
        sum += (int)pcclSetCommunicatorTimeouts(comm, 0, 0);
        sum += (int)pcclSetCommunicatorPorts(comm, 0, 0, 0);
        sum += (int)pcclConnect(comm);
        sum += (int)pcclUpdateTopology(comm);
        sum += (int)pcclArePeersPending(comm, &pending);
        sum += (int)pcclOptimizeTopology(comm);
        sum += (int)pcclAllReduce(buffer, buffer, &desc, comm, NULL);
        sum += (int)pcclAllReduceAsync(buffer, buffer, &desc, comm, &handle);
        sum += (int)pcclAwaitAsyncReduce(&handle, &reduce_info);
        sum += (int)pcclAllReduceMultipleWithRetry(&op_desc, 1, comm, NULL, 1);
        sum += (int)pcclSynchronizeSharedState(comm, &state,
                                               PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR, NULL);
        sum += (int)pcclDestroyCommunicator(comm);
        sum += (int)pcclCreateMaster(sock, &master);
        sum += (int)pcclSetMasterPeerTimeout(master, 0);
        sum += (int)pcclRunMaster(master);
        sum += (int)pcclGetMasterListenAddress(master, &sock);
        sum += (int)pcclInterruptMaster(master);
        sum += (int)pcclMasterAwaitTermination(master);
        sum += (int)pcclDestroyMaster(master);
        sum += (int)pcclGetBuildInfo(&build);
        sum += (int)pcclSetLogLevel(pcclLogInfo);
        sum += (int)pcclGetResultString(pcclSuccess, &name);
        sum += (int)pcclSetAllReduceAlgorithm(comm, pcclAlgorithmRing);
        sum += (int)pcclBroadcast(buffer, 4, pcclFloat, 0, 1, comm, NULL);
        sum += (int)pcclBroadcastAsync(buffer, 4, pcclFloat, 0, 1, comm, &handle);
        sum += (int)pcclAllGather(buffer, buffer + 2, 1, pcclFloat, 2, comm, &coll_info);
        sum += (int)pcclAllGatherAsync(buffer, buffer + 2, 1, pcclFloat, 2, comm, &handle);
        sum += (int)pcclReduceScatter(buffer, buffer + 2, &desc, comm, NULL);
        sum += (int)pcclReduceScatterAsync(buffer, buffer + 2, &desc, comm, &handle);
        sum += (int)pcclAwaitAsyncCollective(&handle, NULL);
        sum += (int)(pcclGetLastErrorString()[0] + pending + attr + (name != NULL));
    }
    return sum;
}
