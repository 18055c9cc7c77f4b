//! Plain value types shared by every layer: data types, reduce operations,
//! descriptors and the small result records returned to callers.
//!
//! Enumerator values match PCCL 1.0's C header (`pccl.h`), so the FFI layer
//! converts with `from_raw`/`as_raw` and nothing else.

use crate::error::{Error, Result};

/// Element type of a buffer. Values equal `pcclDataType_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DataType {
    U8 = 0,
    I8 = 1,
    I16 = 2,
    U16 = 3,
    U32 = 4,
    I32 = 5,
    U64 = 6,
    I64 = 7,
    F16 = 8,
    BF16 = 9,
    F32 = 10,
    F64 = 11,
}

impl DataType {
    pub const ALL: [DataType; 12] = [
        DataType::U8,
        DataType::I8,
        DataType::I16,
        DataType::U16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F16,
        DataType::BF16,
        DataType::F32,
        DataType::F64,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DataType::U8 | DataType::I8 => 1,
            DataType::I16 | DataType::U16 | DataType::F16 | DataType::BF16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
        }
    }

    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DataType::F16 | DataType::BF16 | DataType::F32 | DataType::F64
        )
    }

    pub fn from_raw(raw: u32) -> Result<Self> {
        DataType::ALL
            .into_iter()
            .find(|d| *d as u32 == raw)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown data type {raw}")))
    }

    pub const fn as_raw(self) -> u32 {
        self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            DataType::U8 => "u8",
            DataType::I8 => "i8",
            DataType::I16 => "i16",
            DataType::U16 => "u16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F16 => "f16",
            DataType::BF16 => "bf16",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
        }
    }
}

/// Reduction operation. Values equal `pcclRedOp_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    Sum = 0,
    Avg = 1,
    Prod = 2,
    Max = 3,
    Min = 4,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Avg,
        ReduceOp::Prod,
        ReduceOp::Max,
        ReduceOp::Min,
    ];

    pub fn from_raw(raw: u32) -> Result<Self> {
        ReduceOp::ALL
            .into_iter()
            .find(|o| *o as u32 == raw)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown reduce op {raw}")))
    }

    pub const fn as_raw(self) -> u32 {
        self as u32
    }
}

/// Where a buffer lives. Values equal `pcclDeviceType_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum DeviceType {
    #[default]
    Cpu = 0,
    Cuda = 1,
}

impl DeviceType {
    pub fn from_raw(raw: u32) -> Result<Self> {
        match raw {
            0 => Ok(DeviceType::Cpu),
            1 => Ok(DeviceType::Cuda),
            _ => Err(Error::InvalidArgument(format!("unknown device type {raw}"))),
        }
    }
}

/// Hint about the value distribution of an operand. Values equal `pcclDistributionHint_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum DistributionHint {
    #[default]
    None = 0,
    Normal = 1,
    Uniform = 2,
}

impl DistributionHint {
    pub fn from_raw(raw: u32) -> Result<Self> {
        match raw {
            0 => Ok(DistributionHint::None),
            1 => Ok(DistributionHint::Normal),
            2 => Ok(DistributionHint::Uniform),
            _ => Err(Error::InvalidArgument(format!(
                "unknown distribution hint {raw}"
            ))),
        }
    }
}

/// Quantization algorithm. Values equal `pcclQuantizationAlgorithm_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum QuantizationAlgorithm {
    #[default]
    None = 0,
    MinMax = 1,
    ZeroPointScale = 2,
}

impl QuantizationAlgorithm {
    pub fn from_raw(raw: u32) -> Result<Self> {
        match raw {
            0 => Ok(QuantizationAlgorithm::None),
            1 => Ok(QuantizationAlgorithm::MinMax),
            2 => Ok(QuantizationAlgorithm::ZeroPointScale),
            _ => Err(Error::InvalidArgument(format!(
                "unknown quantization algorithm {raw}"
            ))),
        }
    }
}

/// How a peer takes part in a shared-state sync. Values equal `pcclSharedStateSyncStrategy_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum SyncStrategy {
    /// Vote, send if asked, receive if out of date (default).
    #[default]
    EnforcePopular = 0,
    /// Never vote, never send; receive the popular content.
    ReceiveOnly = 1,
    /// Vote and send; error if this peer's content is not the popular one.
    SendOnly = 2,
}

impl SyncStrategy {
    pub fn from_raw(raw: u32) -> Result<Self> {
        match raw {
            0 => Ok(SyncStrategy::EnforcePopular),
            1 => Ok(SyncStrategy::ReceiveOnly),
            2 => Ok(SyncStrategy::SendOnly),
            _ => Err(Error::InvalidArgument(format!(
                "unknown shared-state sync strategy {raw}"
            ))),
        }
    }
}

/// Communicator attributes. Values equal `pcclAttribute_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Attribute {
    GlobalWorldSize = 1,
    PeerGroupWorldSize = 2,
    NumDistinctPeerGroups = 3,
    LargestPeerGroupWorldSize = 4,
}

impl Attribute {
    pub fn from_raw(raw: u32) -> Result<Self> {
        match raw {
            1 => Ok(Attribute::GlobalWorldSize),
            2 => Ok(Attribute::PeerGroupWorldSize),
            3 => Ok(Attribute::NumDistinctPeerGroups),
            4 => Ok(Attribute::LargestPeerGroupWorldSize),
            _ => Err(Error::InvalidArgument(format!("unknown attribute {raw}"))),
        }
    }
}

/// Quantization requested for an all-reduce (`pcclQuantizationOptions_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantizationOptions {
    pub quantized_datatype: DataType,
    pub algorithm: QuantizationAlgorithm,
}

impl Default for QuantizationOptions {
    fn default() -> Self {
        QuantizationOptions {
            quantized_datatype: DataType::U8,
            algorithm: QuantizationAlgorithm::None,
        }
    }
}

/// What to reduce (`pcclReduceDescriptor_t`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReduceDescriptor {
    /// Number of elements (not bytes).
    pub count: usize,
    pub op: ReduceOp,
    /// Distinguishes concurrent operations; every peer uses the same tag for the same op.
    pub tag: u64,
    pub datatype: DataType,
    pub distribution_hint: DistributionHint,
    pub quantization: QuantizationOptions,
}

impl ReduceDescriptor {
    pub fn new(count: usize, datatype: DataType, op: ReduceOp) -> Self {
        ReduceDescriptor {
            count,
            op,
            tag: 0,
            datatype,
            distribution_hint: DistributionHint::None,
            quantization: QuantizationOptions::default(),
        }
    }

    pub fn with_tag(mut self, tag: u64) -> Self {
        self.tag = tag;
        self
    }

    pub fn with_quantization(mut self, q: QuantizationOptions) -> Self {
        self.quantization = q;
        self
    }

    pub fn byte_len(&self) -> Result<usize> {
        self.count
            .checked_mul(self.datatype.size())
            .ok_or_else(|| Error::InvalidArgument("element count overflows usize".into()))
    }
}

/// Which collective an op is. Values are the wire's `CollectiveSpec::kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CollectiveKind {
    AllReduce = 0,
    /// Every peer ends with the root rank's buffer.
    Broadcast = 1,
    /// Every peer ends with all peers' inputs, concatenated in rank order.
    AllGather = 2,
    /// Every peer ends with its rank's segment of the reduction.
    ReduceScatter = 3,
}

impl CollectiveKind {
    pub fn from_raw(raw: u8) -> Result<Self> {
        match raw {
            0 => Ok(CollectiveKind::AllReduce),
            1 => Ok(CollectiveKind::Broadcast),
            2 => Ok(CollectiveKind::AllGather),
            3 => Ok(CollectiveKind::ReduceScatter),
            _ => Err(Error::InvalidArgument(format!("unknown collective {raw}"))),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all-reduce",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::AllGather => "all-gather",
            CollectiveKind::ReduceScatter => "reduce-scatter",
        }
    }
}

/// How a collective moves its data. The master fixes it per op (from the
/// peers' common request and the op's size), so every peer runs the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Algorithm {
    /// Let the master choose: [`Algorithm::Relay`] for tiny all-reduces,
    /// the one-hop [`Algorithm::Direct`] up to its small-op threshold, the
    /// ring otherwise.
    #[default]
    Auto = 0,
    /// Reduce-scatter then all-gather around the ring (pipelined, striped
    /// over the pool): bandwidth-optimal, 2(w-1) hops of latency.
    Ring = 1,
    /// Every peer sends its whole buffer to every other peer and reduces
    /// all contributions in rank order: one hop of latency, (w-1) times
    /// the bytes. All-reduce only.
    Direct = 2,
    /// Every peer's buffer rides in its init to the master, which hands
    /// all of them back in the commence; every peer reduces them in rank
    /// order. One round trip to the master and nothing else: for tiny
    /// all-reduces (at most [`RELAY_MAX_BYTES`] per peer), unquantized.
    Relay = 3,
}

impl Algorithm {
    pub fn from_raw(raw: u8) -> Result<Self> {
        match raw {
            0 => Ok(Algorithm::Auto),
            1 => Ok(Algorithm::Ring),
            2 => Ok(Algorithm::Direct),
            3 => Ok(Algorithm::Relay),
            _ => Err(Error::InvalidArgument(format!("unknown algorithm {raw}"))),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Auto => "auto",
            Algorithm::Ring => "ring",
            Algorithm::Direct => "direct",
            Algorithm::Relay => "relay",
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Algorithm::Auto),
            "ring" => Ok(Algorithm::Ring),
            "direct" => Ok(Algorithm::Direct),
            "relay" => Ok(Algorithm::Relay),
            _ => Err(Error::InvalidArgument(format!(
                "unknown algorithm '{s}' (auto, ring, direct or relay)"
            ))),
        }
    }
}

/// Largest world in which the direct algorithm runs: each peer holds a
/// connection to, and sends its buffer to, every other peer.
pub const DIRECT_MAX_WORLD: usize = 16;

/// Largest all-reduce (bytes per peer) whose buffer rides in its init to
/// the master for [`Algorithm::Relay`].
pub const RELAY_MAX_BYTES: usize = 4096;
/// Largest relayed answer: the master sends world × bytes to every peer.
pub const RELAY_MAX_TOTAL: usize = 64 << 10;

/// Outcome of one broadcast, all-gather or reduce-scatter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CollectiveInfo {
    /// Number of peers that took part.
    pub world_size: u32,
    /// This peer's rank in the op: its position in the ring, which orders
    /// all-gather results and reduce-scatter segments.
    pub rank: u32,
    /// The algorithm the master chose.
    pub algorithm: Algorithm,
    /// Bytes this peer wrote to the network for the op (headers included).
    pub tx_bytes: u64,
    /// Bytes this peer read from the network for the op (headers included).
    pub rx_bytes: u64,
}

impl From<CollectiveInfo> for ReduceInfo {
    fn from(i: CollectiveInfo) -> Self {
        ReduceInfo {
            local_world_size: i.world_size,
            tx_bytes: i.tx_bytes,
            rx_bytes: i.rx_bytes,
        }
    }
}

/// Outcome of one all-reduce (`pcclReduceInfo_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReduceInfo {
    /// Number of peers that took part.
    pub local_world_size: u32,
    /// Bytes this peer wrote to the network for the op (headers included).
    pub tx_bytes: u64,
    /// Bytes this peer read from the network for the op (headers included).
    pub rx_bytes: u64,
}

/// Outcome of one shared-state sync (`pcclSharedStateSyncInfo_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncInfo {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}
