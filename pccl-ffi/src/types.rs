//! `#[repr(C)]` mirrors of every type declared in `include/ccoip_inet.h`,
//! `include/ccoip.h` and `include/pccl.h`, plus checked conversions between
//! these raw C values and `pccl_core`'s types.
//!
//! C enums are mirrored as integer typedefs plus one `const` per enumerator
//! (`pub type pcclDataType_t = u32; pub const pcclUint8: pcclDataType_t = 0;`)
//! rather than Rust enums: a C caller can pass any integer in an enum-typed
//! argument or field, and reading an out-of-range value into a Rust enum is
//! undefined behaviour. Every raw value is validated by a `*_from_raw`
//! function that returns `pccl_core::Error::InvalidArgument` for unknown
//! values. (GCC and Clang give these enums the size and alignment of `int`;
//! `tests/layout.rs` checks that, and every size, offset and enumerator
//! value, against the C compiler's view of the headers.)
//!
//! The opaque handles (`pcclComm_t`, `pcclRankInfo_t`,
//! `pcclMasterInstanceState_t`) are zero-sized, unconstructible marker types:
//! the implementation allocates its own state and casts pointers to and from
//! `*mut pcclComm_t` etc.
//!
//! This module depends on `pccl_core`'s `error` and `types` modules only.

#![allow(non_camel_case_types, non_upper_case_globals)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::marker::{PhantomData, PhantomPinned};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use pccl_core::{
    Algorithm, Attribute, CollectiveInfo, DataType, DeviceType, DistributionHint, Error,
    QuantizationAlgorithm, QuantizationOptions, ReduceDescriptor, ReduceInfo, ReduceOp, Result,
    SyncInfo, SyncStrategy,
};

// ---------------------------------------------------------------------------
// ccoip.h
// ---------------------------------------------------------------------------

/// `CCOIP_PROTOCOL_PORT_MASTER`: port the master listens on by convention.
pub const CCOIP_PROTOCOL_PORT_MASTER: u16 = 48148;
/// `CCOIP_PROTOCOL_PORT_SHARED_STATE`: first port tried for a peer's shared-state listener.
pub const CCOIP_PROTOCOL_PORT_SHARED_STATE: u16 = 48149;
/// `CCOIP_PROTOCOL_PORT_P2P`: first port tried for a peer's p2p listener.
pub const CCOIP_PROTOCOL_PORT_P2P: u16 = 48150;
/// `CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK`: first port tried for a peer's benchmark listener.
pub const CCOIP_PROTOCOL_PORT_BANDWIDTH_BENCHMARK: u16 = 48151;

// ---------------------------------------------------------------------------
// ccoip_inet.h
// ---------------------------------------------------------------------------

/// `ccoip_inet_protocol_t`.
pub type ccoip_inet_protocol_t = u32;
pub const inetIPv4: ccoip_inet_protocol_t = 0;
pub const inetIPv6: ccoip_inet_protocol_t = 1;

/// `ccoip_ipv4_address_t`: four bytes in network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ccoip_ipv4_address_t {
    pub data: [u8; 4],
}

/// `ccoip_ipv6_address_t`: sixteen bytes in network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ccoip_ipv6_address_t {
    pub data: [u8; 16],
}

/// `ccoip_inet_address_t`: `protocol` selects which of `ipv4` / `ipv6` is read.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ccoip_inet_address_t {
    pub protocol: ccoip_inet_protocol_t,
    pub ipv4: ccoip_ipv4_address_t,
    pub ipv6: ccoip_ipv6_address_t,
}

/// `ccoip_socket_address_t`: address plus port in host byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ccoip_socket_address_t {
    pub inet: ccoip_inet_address_t,
    pub port: u16,
}

// ---------------------------------------------------------------------------
// pccl.h: enumerations
// ---------------------------------------------------------------------------

/// `pcclResult_t`. Signed so that it equals [`Error::code`] directly.
pub type pcclResult_t = c_int;
pub const pcclSuccess: pcclResult_t = 0;
pub const pcclNotInitialized: pcclResult_t = 1;
pub const pcclInternalError: pcclResult_t = 2;
pub const pcclInvalidArgument: pcclResult_t = 3;
pub const pcclInvalidUsage: pcclResult_t = 4;
pub const pcclTooFewPeers: pcclResult_t = 5;
pub const pcclMasterConnectionFailed: pcclResult_t = 6;
pub const pcclRankConnectionFailed: pcclResult_t = 7;
pub const pcclRankConnectionLost: pcclResult_t = 8;
pub const pcclNoSharedStateAvailable: pcclResult_t = 9;
pub const pcclPendingAsyncOps: pcclResult_t = 10;
pub const pcclUpdateTopologyFailed: pcclResult_t = 11;
pub const pcclTopologyOptimizationFailed: pcclResult_t = 12;

/// `pcclDataType_t`.
pub type pcclDataType_t = u32;
pub const pcclUint8: pcclDataType_t = 0;
pub const pcclInt8: pcclDataType_t = 1;
pub const pcclInt16: pcclDataType_t = 2;
pub const pcclUint16: pcclDataType_t = 3;
pub const pcclUint32: pcclDataType_t = 4;
pub const pcclInt32: pcclDataType_t = 5;
pub const pcclUint64: pcclDataType_t = 6;
pub const pcclInt64: pcclDataType_t = 7;
pub const pcclFloat16: pcclDataType_t = 8;
pub const pcclBFloat16: pcclDataType_t = 9;
pub const pcclFloat: pcclDataType_t = 10;
pub const pcclDouble: pcclDataType_t = 11;

/// `pcclDeviceType_t`.
pub type pcclDeviceType_t = u32;
pub const pcclDeviceCpu: pcclDeviceType_t = 0;
pub const pcclDeviceCuda: pcclDeviceType_t = 1;

/// `pcclRedOp_t`.
pub type pcclRedOp_t = u32;
pub const pcclSum: pcclRedOp_t = 0;
pub const pcclAvg: pcclRedOp_t = 1;
pub const pcclProd: pcclRedOp_t = 2;
pub const pcclMax: pcclRedOp_t = 3;
pub const pcclMin: pcclRedOp_t = 4;

/// `pcclAttribute_t`.
pub type pcclAttribute_t = u32;
pub const PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE: pcclAttribute_t = 1;
pub const PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE: pcclAttribute_t = 2;
pub const PCCL_ATTRIBUTE_NUM_DISTINCT_PEER_GROUPS: pcclAttribute_t = 3;
pub const PCCL_ATTRIBUTE_LARGEST_PEER_GROUP_WORLD_SIZE: pcclAttribute_t = 4;

/// `pcclSharedStateSyncStrategy_t`.
pub type pcclSharedStateSyncStrategy_t = u32;
pub const PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR: pcclSharedStateSyncStrategy_t = 0;
pub const PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY: pcclSharedStateSyncStrategy_t = 1;
pub const PCCL_SHARED_STATE_SYNC_STRATEGY_SEND_ONLY: pcclSharedStateSyncStrategy_t = 2;

/// `pcclDistributionHint_t`.
pub type pcclDistributionHint_t = u32;
pub const pcclDistributionNone: pcclDistributionHint_t = 0;
pub const pcclDistributionNormal: pcclDistributionHint_t = 1;
pub const pcclDistributionUniform: pcclDistributionHint_t = 2;

/// `pcclQuantizationAlgorithm_t`.
pub type pcclQuantizationAlgorithm_t = u32;
pub const pcclQuantNone: pcclQuantizationAlgorithm_t = 0;
pub const pcclQuantMinMax: pcclQuantizationAlgorithm_t = 1;
pub const pcclQuantZeroPointScale: pcclQuantizationAlgorithm_t = 2;

/// `pcclLogLevel_t` (extension).
pub type pcclLogLevel_t = u32;
pub const pcclLogOff: pcclLogLevel_t = 0;
pub const pcclLogError: pcclLogLevel_t = 1;
pub const pcclLogWarn: pcclLogLevel_t = 2;
pub const pcclLogInfo: pcclLogLevel_t = 3;
pub const pcclLogDebug: pcclLogLevel_t = 4;
pub const pcclLogTrace: pcclLogLevel_t = 5;

// ---------------------------------------------------------------------------
// pccl.h: opaque handles
// ---------------------------------------------------------------------------

/// `pcclComm_t`: opaque; only ever used behind a pointer.
#[repr(C)]
pub struct pcclComm_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `pcclRankInfo_t`: opaque; reserved by PCCL 1.0, used by no function.
#[repr(C)]
pub struct pcclRankInfo_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `struct pcclMasterInstanceState_t`: opaque; only ever used behind a pointer.
#[repr(C)]
pub struct pcclMasterInstanceState_t {
    _private: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `pcclMasterInstance_t` (a typedef of `struct pcclMasterInstanceState_t`).
pub type pcclMasterInstance_t = pcclMasterInstanceState_t;

// ---------------------------------------------------------------------------
// pccl.h: structures (members in header order)
// ---------------------------------------------------------------------------

/// `pcclCommCreateParams_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclCommCreateParams_t {
    pub master_address: ccoip_socket_address_t,
    pub peer_group: u32,
    /// 0 means 1; see [`pcclCommCreateParams_t::effective_pool_size`].
    pub p2p_connection_pool_size: u32,
}

impl pcclCommCreateParams_t {
    /// Connections per neighbour actually used: `p2p_connection_pool_size`, with 0 meaning 1.
    pub const fn effective_pool_size(&self) -> u32 {
        if self.p2p_connection_pool_size == 0 {
            1
        } else {
            self.p2p_connection_pool_size
        }
    }
}

/// `pcclReduceInfo_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclReduceInfo_t {
    pub local_world_size: u32,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// `pcclAlgorithm_t` (extension): the all-reduce algorithm a peer asks for.
pub type pcclAlgorithm_t = u32;
pub const pcclAlgorithmAuto: pcclAlgorithm_t = 0;
pub const pcclAlgorithmRing: pcclAlgorithm_t = 1;
pub const pcclAlgorithmDirect: pcclAlgorithm_t = 2;
pub const pcclAlgorithmRelay: pcclAlgorithm_t = 3;

/// `pcclCollectiveInfo_t` (extension): outcome of a broadcast, all-gather
/// or reduce-scatter.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclCollectiveInfo_t {
    pub world_size: u32,
    pub rank: u32,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub algorithm: pcclAlgorithm_t,
}

/// `pcclReduceOperandDescriptor_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclReduceOperandDescriptor_t {
    pub datatype: pcclDataType_t,
    pub distribution_hint: pcclDistributionHint_t,
}

/// `pcclQuantizationOptions_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclQuantizationOptions_t {
    pub quantized_datatype: pcclDataType_t,
    pub algorithm: pcclQuantizationAlgorithm_t,
}

/// `pcclReduceDescriptor_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclReduceDescriptor_t {
    pub count: usize,
    pub op: pcclRedOp_t,
    pub tag: u64,
    pub src_descriptor: pcclReduceOperandDescriptor_t,
    pub quantization_options: pcclQuantizationOptions_t,
}

/// `struct pcclReduceSingleDescriptor_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pcclReduceSingleDescriptor_t {
    pub sendbuf: *mut c_void,
    pub recvbuf: *mut c_void,
    pub descriptor: pcclReduceDescriptor_t,
}

/// `pcclReduceOpDescriptor_t` (a typedef of `struct pcclReduceSingleDescriptor_t`).
pub type pcclReduceOpDescriptor_t = pcclReduceSingleDescriptor_t;

/// `pcclAsyncReduceOp_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pcclAsyncReduceOp_t {
    pub comm: *mut pcclComm_t,
    pub tag: u64,
}

/// `pcclRankUuid_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct pcclRankUuid_t {
    pub data: [u8; 16],
}

/// `pcclTensorInfo_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pcclTensorInfo_t {
    pub name: *const c_char,
    pub data: *mut c_void,
    pub count: usize,
    pub datatype: pcclDataType_t,
    pub device_type: pcclDeviceType_t,
    pub allow_content_inequality: bool,
}

/// `pcclSharedState_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct pcclSharedState_t {
    pub revision: u64,
    pub count: usize,
    pub infos: *mut pcclTensorInfo_t,
}

/// `pcclSharedStateSyncInfo_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclSharedStateSyncInfo_t {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// `pcclBuildInfo_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct pcclBuildInfo_t {
    pub has_cuda_support: bool,
}

// ---------------------------------------------------------------------------
// Result codes
// ---------------------------------------------------------------------------

/// The `pcclResult_t` for an error.
pub const fn result_code(e: &Error) -> pcclResult_t {
    e.code()
}

/// The result code of a `pccl_core::Result`: `pcclSuccess` or the error's code.
pub fn result_of<T>(r: &Result<T>) -> pcclResult_t {
    match r {
        Ok(_) => pcclSuccess,
        Err(e) => result_code(e),
    }
}

/// Static name of a result code (what `pcclGetResultString` returns), or
/// `None` for a value that is not a `pcclResult_t` enumerator.
pub const fn result_name(r: pcclResult_t) -> Option<&'static CStr> {
    Some(match r {
        pcclSuccess => c"pcclSuccess",
        pcclNotInitialized => c"pcclNotInitialized",
        pcclInternalError => c"pcclInternalError",
        pcclInvalidArgument => c"pcclInvalidArgument",
        pcclInvalidUsage => c"pcclInvalidUsage",
        pcclTooFewPeers => c"pcclTooFewPeers",
        pcclMasterConnectionFailed => c"pcclMasterConnectionFailed",
        pcclRankConnectionFailed => c"pcclRankConnectionFailed",
        pcclRankConnectionLost => c"pcclRankConnectionLost",
        pcclNoSharedStateAvailable => c"pcclNoSharedStateAvailable",
        pcclPendingAsyncOps => c"pcclPendingAsyncOps",
        pcclUpdateTopologyFailed => c"pcclUpdateTopologyFailed",
        pcclTopologyOptimizationFailed => c"pcclTopologyOptimizationFailed",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Enumerations: raw <-> pccl_core
// ---------------------------------------------------------------------------

/// Validates a `pcclDataType_t`.
pub fn datatype_from_raw(v: pcclDataType_t) -> Result<DataType> {
    DataType::from_raw(v)
}

/// The `pcclDataType_t` of a [`DataType`].
pub const fn datatype_to_raw(d: DataType) -> pcclDataType_t {
    d.as_raw()
}

/// Validates a `pcclAlgorithm_t`.
pub fn algorithm_from_raw(v: pcclAlgorithm_t) -> Result<Algorithm> {
    u8::try_from(v)
        .map_err(|_| Error::InvalidArgument(format!("unknown algorithm {v}")))
        .and_then(Algorithm::from_raw)
}

/// The `pcclAlgorithm_t` of an [`Algorithm`].
pub const fn algorithm_to_raw(a: Algorithm) -> pcclAlgorithm_t {
    match a {
        Algorithm::Auto => pcclAlgorithmAuto,
        Algorithm::Ring => pcclAlgorithmRing,
        Algorithm::Direct => pcclAlgorithmDirect,
        Algorithm::Relay => pcclAlgorithmRelay,
    }
}

/// Validates a `pcclRedOp_t`.
pub fn redop_from_raw(v: pcclRedOp_t) -> Result<ReduceOp> {
    ReduceOp::from_raw(v)
}

/// Validates a `pcclDeviceType_t`.
pub fn device_type_from_raw(v: pcclDeviceType_t) -> Result<DeviceType> {
    DeviceType::from_raw(v)
}

/// Validates a `pcclDistributionHint_t`.
pub fn distribution_hint_from_raw(v: pcclDistributionHint_t) -> Result<DistributionHint> {
    DistributionHint::from_raw(v)
}

/// Validates a `pcclQuantizationAlgorithm_t`.
pub fn quantization_algorithm_from_raw(
    v: pcclQuantizationAlgorithm_t,
) -> Result<QuantizationAlgorithm> {
    QuantizationAlgorithm::from_raw(v)
}

/// Validates a `pcclSharedStateSyncStrategy_t`.
pub fn sync_strategy_from_raw(v: pcclSharedStateSyncStrategy_t) -> Result<SyncStrategy> {
    SyncStrategy::from_raw(v)
}

/// Validates a `pcclAttribute_t`.
pub fn attribute_from_raw(v: pcclAttribute_t) -> Result<Attribute> {
    Attribute::from_raw(v)
}

/// Log verbosity selected by `pcclSetLogLevel` (extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The level's name as a `tracing` / `EnvFilter` directive ("off", "error", ...).
    pub const fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Validates a `pcclLogLevel_t`.
pub fn log_level_from_raw(v: pcclLogLevel_t) -> Result<LogLevel> {
    Ok(match v {
        pcclLogOff => LogLevel::Off,
        pcclLogError => LogLevel::Error,
        pcclLogWarn => LogLevel::Warn,
        pcclLogInfo => LogLevel::Info,
        pcclLogDebug => LogLevel::Debug,
        pcclLogTrace => LogLevel::Trace,
        _ => {
            return Err(Error::InvalidArgument(format!("unknown log level {v}")));
        }
    })
}

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/// Converts a `ccoip_socket_address_t`; fails on an unknown protocol.
pub fn socket_addr_from_raw(a: &ccoip_socket_address_t) -> Result<SocketAddr> {
    let ip = match a.inet.protocol {
        inetIPv4 => IpAddr::V4(Ipv4Addr::from(a.inet.ipv4.data)),
        inetIPv6 => IpAddr::V6(Ipv6Addr::from(a.inet.ipv6.data)),
        p => {
            return Err(Error::InvalidArgument(format!(
                "unknown address protocol {p} (expected inetIPv4=0 or inetIPv6=1)"
            )));
        }
    };
    Ok(SocketAddr::new(ip, a.port))
}

/// Converts a [`SocketAddr`] (an IPv6 scope id is dropped; the unused address field is zero).
pub fn socket_addr_to_raw(a: &SocketAddr) -> ccoip_socket_address_t {
    let mut inet = ccoip_inet_address_t::default();
    match a.ip() {
        IpAddr::V4(v4) => {
            inet.protocol = inetIPv4;
            inet.ipv4.data = v4.octets();
        }
        IpAddr::V6(v6) => {
            inet.protocol = inetIPv6;
            inet.ipv6.data = v6.octets();
        }
    }
    ccoip_socket_address_t {
        inet,
        port: a.port(),
    }
}

// ---------------------------------------------------------------------------
// Descriptors and results
// ---------------------------------------------------------------------------

/// Validates quantization options for operands of type `source`. When the
/// algorithm is `pcclQuantNone`, `quantized_datatype` is ignored (as in
/// PCCL 1.0) and reported as `source`.
pub fn quantization_from_raw(
    q: &pcclQuantizationOptions_t,
    source: DataType,
) -> Result<QuantizationOptions> {
    let algorithm = quantization_algorithm_from_raw(q.algorithm)?;
    let quantized_datatype = match algorithm {
        QuantizationAlgorithm::None => source,
        _ => datatype_from_raw(q.quantized_datatype)?,
    };
    Ok(QuantizationOptions {
        quantized_datatype,
        algorithm,
    })
}

/// Validates a `pcclReduceDescriptor_t`: known enumerators, `count > 0`, and a
/// byte length that fits in `isize` (so a slice over the buffer is sound).
/// Whether a quantization combination is supported is left to the core.
pub fn reduce_descriptor_from_raw(d: &pcclReduceDescriptor_t) -> Result<ReduceDescriptor> {
    if d.count == 0 {
        return Err(Error::InvalidArgument(
            "reduce descriptor count is 0".into(),
        ));
    }
    let datatype = datatype_from_raw(d.src_descriptor.datatype)?;
    let desc = ReduceDescriptor {
        count: d.count,
        op: redop_from_raw(d.op)?,
        tag: d.tag,
        datatype,
        distribution_hint: distribution_hint_from_raw(d.src_descriptor.distribution_hint)?,
        quantization: quantization_from_raw(&d.quantization_options, datatype)?,
    };
    checked_byte_len(d.count, datatype)?;
    Ok(desc)
}

/// `count * datatype.size()`, failing if it exceeds `isize::MAX`.
pub fn checked_byte_len(count: usize, datatype: DataType) -> Result<usize> {
    count
        .checked_mul(datatype.size())
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{count} elements of {} exceed the addressable size",
                datatype.name()
            ))
        })
}

/// Checks an all-reduce buffer pair of `byte_len` bytes: both non-NULL, and
/// either identical (in place) or not overlapping at all. Reads nothing.
pub fn check_reduce_buffers(
    send: *const c_void,
    recv: *const c_void,
    byte_len: usize,
) -> Result<()> {
    if send.is_null() {
        return Err(Error::InvalidArgument("send buffer is NULL".into()));
    }
    if recv.is_null() {
        return Err(Error::InvalidArgument("receive buffer is NULL".into()));
    }
    let (s, r) = (send as usize, recv as usize);
    if s == r {
        return Ok(());
    }
    let (lo, hi) = if s < r { (s, r) } else { (r, s) };
    if !matches!(lo.checked_add(byte_len), Some(end) if end <= hi) {
        return Err(Error::InvalidArgument(
            "send and receive buffers partially overlap".into(),
        ));
    }
    Ok(())
}

impl From<ReduceInfo> for pcclReduceInfo_t {
    fn from(i: ReduceInfo) -> Self {
        pcclReduceInfo_t {
            local_world_size: i.local_world_size,
            tx_bytes: i.tx_bytes,
            rx_bytes: i.rx_bytes,
        }
    }
}

impl From<CollectiveInfo> for pcclCollectiveInfo_t {
    fn from(i: CollectiveInfo) -> Self {
        pcclCollectiveInfo_t {
            world_size: i.world_size,
            rank: i.rank,
            tx_bytes: i.tx_bytes,
            rx_bytes: i.rx_bytes,
            algorithm: algorithm_to_raw(i.algorithm),
        }
    }
}

impl From<SyncInfo> for pcclSharedStateSyncInfo_t {
    fn from(i: SyncInfo) -> Self {
        pcclSharedStateSyncInfo_t {
            tx_bytes: i.tx_bytes,
            rx_bytes: i.rx_bytes,
        }
    }
}

/// The validated scalar fields of a `pcclTensorInfo_t` (its name and data
/// pointer are not dereferenced here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSpec {
    pub datatype: DataType,
    pub device_type: DeviceType,
    pub allow_content_inequality: bool,
    pub count: usize,
    pub byte_len: usize,
}

/// Validates a `pcclTensorInfo_t`'s enumerators and size, and that `name` is
/// non-NULL and `data` is non-NULL unless `count` is 0. `pcclDeviceCuda` is
/// `InvalidArgument` in every build: there is no CUDA path yet
/// (`pccl_core::CUDA_SUPPORT`), and device memory must never be read as
/// host memory.
pub fn tensor_spec_from_raw(t: &pcclTensorInfo_t) -> Result<TensorSpec> {
    if t.name.is_null() {
        return Err(Error::InvalidArgument("tensor name is NULL".into()));
    }
    let datatype = datatype_from_raw(t.datatype)?;
    let device_type = device_type_from_raw(t.device_type)?;
    if device_type == DeviceType::Cuda {
        return Err(Error::InvalidArgument(
            "the tensor is on a CUDA device (pcclDeviceCuda), but this build has no CUDA support \
             (pcclGetBuildInfo: has_cuda_support is false); pass host memory (pcclDeviceCpu)"
                .into(),
        ));
    }
    let byte_len = checked_byte_len(t.count, datatype)?;
    if t.data.is_null() && t.count != 0 {
        return Err(Error::InvalidArgument(format!(
            "tensor data is NULL but count is {}",
            t.count
        )));
    }
    Ok(TensorSpec {
        datatype,
        device_type,
        allow_content_inequality: t.allow_content_inequality,
        count: t.count,
        byte_len,
    })
}

// ---------------------------------------------------------------------------
// Pointer arguments
// ---------------------------------------------------------------------------

/// Borrows a required pointer argument; NULL or misaligned gives `InvalidArgument`.
///
/// # Safety
/// If non-NULL and aligned, `p` must point to a valid `T` that outlives `'a`
/// and is not mutated during `'a`.
pub unsafe fn ref_arg<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    if !p.is_aligned() {
        return Err(Error::InvalidArgument(format!("{what} is misaligned")));
    }
    // SAFETY: non-NULL and aligned checked above; validity is the caller's contract.
    Ok(unsafe { &*p })
}

/// Mutably borrows a required output pointer; NULL or misaligned gives `InvalidArgument`.
///
/// # Safety
/// If non-NULL and aligned, `p` must point to memory valid for reads and
/// writes of a `T`, holding a valid `T`, not aliased during `'a`.
pub unsafe fn mut_arg<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    if !p.is_aligned() {
        return Err(Error::InvalidArgument(format!("{what} is misaligned")));
    }
    // SAFETY: non-NULL and aligned checked above; validity is the caller's contract.
    Ok(unsafe { &mut *p })
}

/// Borrows a caller array of `len` elements. `len == 0` gives an empty slice
/// whatever the pointer; otherwise NULL, misalignment or a total size above
/// `isize::MAX` gives `InvalidArgument`.
///
/// # Safety
/// If the checks pass, `p` must point to `len` valid, initialized `T`s that
/// outlive `'a` and are not mutated during `'a`.
pub unsafe fn slice_arg<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::InvalidArgument(format!(
            "{what} is NULL but its length is {len}"
        )));
    }
    if !p.is_aligned() {
        return Err(Error::InvalidArgument(format!("{what} is misaligned")));
    }
    if !matches!(len.checked_mul(std::mem::size_of::<T>()), Some(n) if n <= isize::MAX as usize) {
        return Err(Error::InvalidArgument(format!(
            "{what} length {len} is too large"
        )));
    }
    // SAFETY: non-NULL, aligned, size fits isize (checked above); validity is the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Borrows a required NUL-terminated string argument; NULL gives `InvalidArgument`.
///
/// # Safety
/// If non-NULL, `p` must point to a NUL-terminated string that outlives `'a`
/// and is not mutated during `'a`.
pub unsafe fn cstr_arg<'a>(p: *const c_char, what: &str) -> Result<&'a CStr> {
    if p.is_null() {
        return Err(Error::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL checked above; termination and lifetime are the caller's contract.
    Ok(unsafe { CStr::from_ptr(p) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_RESULTS: [pcclResult_t; 13] = [
        pcclSuccess,
        pcclNotInitialized,
        pcclInternalError,
        pcclInvalidArgument,
        pcclInvalidUsage,
        pcclTooFewPeers,
        pcclMasterConnectionFailed,
        pcclRankConnectionFailed,
        pcclRankConnectionLost,
        pcclNoSharedStateAvailable,
        pcclPendingAsyncOps,
        pcclUpdateTopologyFailed,
        pcclTopologyOptimizationFailed,
    ];

    #[test]
    fn result_codes_match_core_errors() {
        let m = || String::from("x");
        let cases = [
            (Error::NotInitialized(m()), pcclNotInitialized),
            (Error::Internal(m()), pcclInternalError),
            (Error::InvalidArgument(m()), pcclInvalidArgument),
            (Error::InvalidUsage(m()), pcclInvalidUsage),
            (Error::TooFewPeers(m()), pcclTooFewPeers),
            (
                Error::MasterConnectionFailed(m()),
                pcclMasterConnectionFailed,
            ),
            (Error::RankConnectionFailed(m()), pcclRankConnectionFailed),
            (Error::RankConnectionLost(m()), pcclRankConnectionLost),
            (Error::InPlaceInputLost(m()), pcclRankConnectionLost),
            (
                Error::NoSharedStateAvailable(m()),
                pcclNoSharedStateAvailable,
            ),
            (Error::PendingAsyncOps(m()), pcclPendingAsyncOps),
            (Error::UpdateTopologyFailed(m()), pcclUpdateTopologyFailed),
            (
                Error::TopologyOptimizationFailed(m()),
                pcclTopologyOptimizationFailed,
            ),
        ];
        for (e, code) in &cases {
            assert_eq!(result_code(e), *code, "{e:?}");
            assert_eq!(result_of::<()>(&Err(e.clone())), *code);
        }
        assert_eq!(result_of(&Ok(1)), pcclSuccess);
    }

    #[test]
    fn result_names() {
        for r in ALL_RESULTS {
            let name = result_name(r).expect("known code has a name");
            assert!(name.to_str().is_ok_and(|s| s.starts_with("pccl")));
        }
        assert_eq!(
            result_name(pcclRankConnectionLost),
            Some(c"pcclRankConnectionLost")
        );
        assert_eq!(result_name(-1), None);
        assert_eq!(result_name(13), None);
    }

    #[test]
    fn enumerators_match_core() {
        let dts = [
            (pcclUint8, DataType::U8),
            (pcclInt8, DataType::I8),
            (pcclInt16, DataType::I16),
            (pcclUint16, DataType::U16),
            (pcclUint32, DataType::U32),
            (pcclInt32, DataType::I32),
            (pcclUint64, DataType::U64),
            (pcclInt64, DataType::I64),
            (pcclFloat16, DataType::F16),
            (pcclBFloat16, DataType::BF16),
            (pcclFloat, DataType::F32),
            (pcclDouble, DataType::F64),
        ];
        for (raw, d) in dts {
            assert_eq!(datatype_from_raw(raw), Ok(d));
            assert_eq!(datatype_to_raw(d), raw);
        }
        assert!(datatype_from_raw(12).is_err());

        let ops = [
            (pcclSum, ReduceOp::Sum),
            (pcclAvg, ReduceOp::Avg),
            (pcclProd, ReduceOp::Prod),
            (pcclMax, ReduceOp::Max),
            (pcclMin, ReduceOp::Min),
        ];
        for (raw, o) in ops {
            assert_eq!(redop_from_raw(raw), Ok(o));
        }
        assert!(redop_from_raw(5).is_err());

        assert_eq!(device_type_from_raw(pcclDeviceCpu), Ok(DeviceType::Cpu));
        assert_eq!(device_type_from_raw(pcclDeviceCuda), Ok(DeviceType::Cuda));
        assert!(device_type_from_raw(2).is_err());

        assert_eq!(
            distribution_hint_from_raw(pcclDistributionNone),
            Ok(DistributionHint::None)
        );
        assert_eq!(
            distribution_hint_from_raw(pcclDistributionNormal),
            Ok(DistributionHint::Normal)
        );
        assert_eq!(
            distribution_hint_from_raw(pcclDistributionUniform),
            Ok(DistributionHint::Uniform)
        );
        assert!(distribution_hint_from_raw(3).is_err());

        assert_eq!(
            quantization_algorithm_from_raw(pcclQuantNone),
            Ok(QuantizationAlgorithm::None)
        );
        assert_eq!(
            quantization_algorithm_from_raw(pcclQuantMinMax),
            Ok(QuantizationAlgorithm::MinMax)
        );
        assert_eq!(
            quantization_algorithm_from_raw(pcclQuantZeroPointScale),
            Ok(QuantizationAlgorithm::ZeroPointScale)
        );
        assert!(quantization_algorithm_from_raw(3).is_err());

        assert_eq!(
            sync_strategy_from_raw(PCCL_SHARED_STATE_SYNC_STRATEGY_ENFORCE_POPULAR),
            Ok(SyncStrategy::EnforcePopular)
        );
        assert_eq!(
            sync_strategy_from_raw(PCCL_SHARED_STATE_SYNC_STRATEGY_RECEIVE_ONLY),
            Ok(SyncStrategy::ReceiveOnly)
        );
        assert_eq!(
            sync_strategy_from_raw(PCCL_SHARED_STATE_SYNC_STRATEGY_SEND_ONLY),
            Ok(SyncStrategy::SendOnly)
        );
        assert!(sync_strategy_from_raw(3).is_err());

        assert_eq!(
            attribute_from_raw(PCCL_ATTRIBUTE_GLOBAL_WORLD_SIZE),
            Ok(Attribute::GlobalWorldSize)
        );
        assert_eq!(
            attribute_from_raw(PCCL_ATTRIBUTE_PEER_GROUP_WORLD_SIZE),
            Ok(Attribute::PeerGroupWorldSize)
        );
        assert_eq!(
            attribute_from_raw(PCCL_ATTRIBUTE_NUM_DISTINCT_PEER_GROUPS),
            Ok(Attribute::NumDistinctPeerGroups)
        );
        assert_eq!(
            attribute_from_raw(PCCL_ATTRIBUTE_LARGEST_PEER_GROUP_WORLD_SIZE),
            Ok(Attribute::LargestPeerGroupWorldSize)
        );
        assert!(attribute_from_raw(0).is_err());
        assert!(attribute_from_raw(5).is_err());

        let levels = [
            (pcclLogOff, LogLevel::Off),
            (pcclLogError, LogLevel::Error),
            (pcclLogWarn, LogLevel::Warn),
            (pcclLogInfo, LogLevel::Info),
            (pcclLogDebug, LogLevel::Debug),
            (pcclLogTrace, LogLevel::Trace),
        ];
        for (raw, l) in levels {
            assert_eq!(log_level_from_raw(raw), Ok(l));
        }
        assert_eq!(LogLevel::Warn.as_filter(), "warn");
        assert!(log_level_from_raw(6).is_err());
        assert!(log_level_from_raw(u32::MAX).is_err());
    }

    #[test]
    fn socket_addresses() {
        let v4: SocketAddr = "10.1.2.3:48148".parse().expect("literal");
        let raw = socket_addr_to_raw(&v4);
        assert_eq!(raw.inet.protocol, inetIPv4);
        assert_eq!(raw.inet.ipv4.data, [10, 1, 2, 3]);
        assert_eq!(raw.inet.ipv6.data, [0; 16]);
        assert_eq!(raw.port, CCOIP_PROTOCOL_PORT_MASTER);
        assert_eq!(socket_addr_from_raw(&raw), Ok(v4));

        let v6: SocketAddr = "[2001:db8::1]:48150".parse().expect("literal");
        let raw = socket_addr_to_raw(&v6);
        assert_eq!(raw.inet.protocol, inetIPv6);
        assert_eq!(raw.inet.ipv6.data[..2], [0x20, 0x01]);
        assert_eq!(raw.inet.ipv6.data[15], 1);
        assert_eq!(socket_addr_from_raw(&raw), Ok(v6));

        let mut bad = raw;
        bad.inet.protocol = 2;
        assert!(matches!(
            socket_addr_from_raw(&bad),
            Err(Error::InvalidArgument(_))
        ));
    }

    fn descriptor(count: usize) -> pcclReduceDescriptor_t {
        pcclReduceDescriptor_t {
            count,
            op: pcclAvg,
            tag: 7,
            src_descriptor: pcclReduceOperandDescriptor_t {
                datatype: pcclFloat,
                distribution_hint: pcclDistributionNormal,
            },
            quantization_options: pcclQuantizationOptions_t {
                quantized_datatype: pcclUint8,
                algorithm: pcclQuantMinMax,
            },
        }
    }

    #[test]
    fn reduce_descriptors() {
        let d = reduce_descriptor_from_raw(&descriptor(1000)).expect("valid");
        assert_eq!(d.count, 1000);
        assert_eq!(d.op, ReduceOp::Avg);
        assert_eq!(d.tag, 7);
        assert_eq!(d.datatype, DataType::F32);
        assert_eq!(d.distribution_hint, DistributionHint::Normal);
        assert_eq!(d.quantization.algorithm, QuantizationAlgorithm::MinMax);
        assert_eq!(d.quantization.quantized_datatype, DataType::U8);

        // Quantized type is ignored without quantization, even if garbage.
        let mut raw = descriptor(4);
        raw.quantization_options = pcclQuantizationOptions_t {
            quantized_datatype: 999,
            algorithm: pcclQuantNone,
        };
        let d = reduce_descriptor_from_raw(&raw).expect("valid");
        assert_eq!(d.quantization.algorithm, QuantizationAlgorithm::None);
        assert_eq!(d.quantization.quantized_datatype, DataType::F32);

        // A zero-initialized descriptor (C `= {0}` then count set) is valid.
        let z = pcclReduceDescriptor_t {
            count: 3,
            ..Default::default()
        };
        let d = reduce_descriptor_from_raw(&z).expect("valid");
        assert_eq!((d.op, d.datatype), (ReduceOp::Sum, DataType::U8));

        let invalid = [
            pcclReduceDescriptor_t {
                count: 0,
                ..descriptor(0)
            },
            pcclReduceDescriptor_t {
                op: 9,
                ..descriptor(1)
            },
            pcclReduceDescriptor_t {
                src_descriptor: pcclReduceOperandDescriptor_t {
                    datatype: 12,
                    distribution_hint: 0,
                },
                ..descriptor(1)
            },
            pcclReduceDescriptor_t {
                src_descriptor: pcclReduceOperandDescriptor_t {
                    datatype: pcclFloat,
                    distribution_hint: 3,
                },
                ..descriptor(1)
            },
            pcclReduceDescriptor_t {
                quantization_options: pcclQuantizationOptions_t {
                    quantized_datatype: 12,
                    algorithm: pcclQuantZeroPointScale,
                },
                ..descriptor(1)
            },
            pcclReduceDescriptor_t {
                quantization_options: pcclQuantizationOptions_t {
                    quantized_datatype: pcclUint8,
                    algorithm: 3,
                },
                ..descriptor(1)
            },
            descriptor(usize::MAX / 2),
        ];
        for raw in invalid {
            assert!(
                matches!(
                    reduce_descriptor_from_raw(&raw),
                    Err(Error::InvalidArgument(_))
                ),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn buffers() {
        let mut a = [0u8; 64];
        let p = a.as_mut_ptr() as *mut c_void;
        let q = a[32..].as_mut_ptr() as *mut c_void;
        assert!(check_reduce_buffers(p, p, 64).is_ok());
        assert!(check_reduce_buffers(p, q, 32).is_ok());
        assert!(check_reduce_buffers(q, p, 32).is_ok());
        assert!(check_reduce_buffers(p, q, 33).is_err());
        assert!(check_reduce_buffers(q, p, 33).is_err());
        assert!(check_reduce_buffers(std::ptr::null(), p, 1).is_err());
        assert!(check_reduce_buffers(p, std::ptr::null(), 1).is_err());
    }

    #[test]
    fn tensor_specs() {
        let mut data = [0f32; 4];
        let t = pcclTensorInfo_t {
            name: c"weights".as_ptr(),
            data: data.as_mut_ptr() as *mut c_void,
            count: 4,
            datatype: pcclFloat,
            device_type: pcclDeviceCpu,
            allow_content_inequality: true,
        };
        let s = tensor_spec_from_raw(&t).expect("valid");
        assert_eq!(s.byte_len, 16);
        assert!(s.allow_content_inequality);
        assert_eq!(
            unsafe { cstr_arg(t.name, "name") }.expect("non-null"),
            c"weights"
        );

        let empty = pcclTensorInfo_t {
            data: std::ptr::null_mut(),
            count: 0,
            ..t
        };
        assert_eq!(tensor_spec_from_raw(&empty).map(|s| s.byte_len), Ok(0));

        for bad in [
            pcclTensorInfo_t {
                name: std::ptr::null(),
                ..t
            },
            pcclTensorInfo_t {
                data: std::ptr::null_mut(),
                ..t
            },
            pcclTensorInfo_t { datatype: 12, ..t },
            pcclTensorInfo_t {
                device_type: 2,
                ..t
            },
            pcclTensorInfo_t {
                count: usize::MAX,
                ..t
            },
        ] {
            assert!(tensor_spec_from_raw(&bad).is_err(), "{bad:?}");
        }

        // No CUDA path exists, in any build (`--features cuda` included):
        // device memory is refused, never read as host memory.
        let cuda = pcclTensorInfo_t {
            device_type: pcclDeviceCuda,
            ..t
        };
        match tensor_spec_from_raw(&cuda) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("CUDA"), "{m}"),
            other => panic!("a pcclDeviceCuda tensor gave {other:?}"),
        }
        let empty_cuda = pcclTensorInfo_t {
            device_type: pcclDeviceCuda,
            ..empty
        };
        assert!(matches!(
            tensor_spec_from_raw(&empty_cuda),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn pointer_args() {
        let x = 5u64;
        assert_eq!(unsafe { ref_arg(&x as *const u64, "x") }, Ok(&5));
        assert!(unsafe { ref_arg(std::ptr::null::<u64>(), "x") }.is_err());
        let mis = (&x as *const u64 as usize + 1) as *const u64;
        assert!(unsafe { ref_arg(mis, "x") }.is_err());

        let mut y = 1u32;
        if let Ok(r) = unsafe { mut_arg(&mut y as *mut u32, "y") } {
            *r = 2;
        }
        assert_eq!(y, 2);
        assert!(unsafe { mut_arg(std::ptr::null_mut::<u32>(), "y") }.is_err());

        let v = [1u16, 2, 3];
        assert_eq!(unsafe { slice_arg(v.as_ptr(), 3, "v") }, Ok(&v[..]));
        assert_eq!(
            unsafe { slice_arg(std::ptr::null::<u16>(), 0, "v") },
            Ok(&[][..])
        );
        assert!(unsafe { slice_arg(std::ptr::null::<u16>(), 1, "v") }.is_err());
        assert!(unsafe { slice_arg(v.as_ptr(), usize::MAX, "v") }.is_err());
        assert!(unsafe { cstr_arg(std::ptr::null(), "s") }.is_err());
    }

    #[test]
    fn pool_size_zero_means_one() {
        let mut p = pcclCommCreateParams_t::default();
        assert_eq!(p.effective_pool_size(), 1);
        p.p2p_connection_pool_size = 8;
        assert_eq!(p.effective_pool_size(), 8);
    }

    #[test]
    fn output_conversions() {
        let r: pcclReduceInfo_t = ReduceInfo {
            local_world_size: 3,
            tx_bytes: 10,
            rx_bytes: 20,
        }
        .into();
        assert_eq!((r.local_world_size, r.tx_bytes, r.rx_bytes), (3, 10, 20));
        let s: pcclSharedStateSyncInfo_t = SyncInfo {
            tx_bytes: 1,
            rx_bytes: 2,
        }
        .into();
        assert_eq!((s.tx_bytes, s.rx_bytes), (1, 2));
        let c: pcclCollectiveInfo_t = CollectiveInfo {
            world_size: 4,
            rank: 3,
            algorithm: Algorithm::Direct,
            tx_bytes: 5,
            rx_bytes: 6,
        }
        .into();
        assert_eq!(
            c,
            pcclCollectiveInfo_t {
                world_size: 4,
                rank: 3,
                tx_bytes: 5,
                rx_bytes: 6,
                algorithm: pcclAlgorithmDirect,
            }
        );
    }

    #[test]
    fn algorithms() {
        for (raw, a) in [
            (pcclAlgorithmAuto, Algorithm::Auto),
            (pcclAlgorithmRing, Algorithm::Ring),
            (pcclAlgorithmDirect, Algorithm::Direct),
            (pcclAlgorithmRelay, Algorithm::Relay),
        ] {
            assert_eq!(algorithm_from_raw(raw).expect("known"), a);
            assert_eq!(algorithm_to_raw(a), raw);
            assert_eq!(a as u32, raw, "the enumerators are the core's wire values");
        }
        for bad in [4, 255, 256, u32::MAX] {
            assert!(matches!(
                algorithm_from_raw(bad),
                Err(Error::InvalidArgument(_))
            ));
        }
    }
}
