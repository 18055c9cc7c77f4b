//! Wire protocol: connection greeting, control messages between peers and the
//! master, and the fixed header of p2p data frames.
//!
//! Every TCP connection starts with a [`Hello`] (magic + version + kind) sent by
//! the dialing side and echoed by the accepting side. Control frames are
//! `[u32 LE length][u16 LE type][payload]`; lengths are bounded before any
//! allocation. Decoders are total: any byte string yields a message or a
//! [`WireError`], never a panic.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First four bytes of every connection.
pub const MAGIC: [u8; 4] = *b"PCRS";
/// Protocol version; both sides must match exactly.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest control frame accepted (type + payload).
pub const MAX_CONTROL_FRAME: usize = 16 << 20;
/// Largest p2p data payload accepted in one frame.
pub const MAX_DATA_PAYLOAD: usize = 64 << 20;
/// Largest tensor name in a shared state.
pub const MAX_NAME_LEN: usize = 1024;
/// Largest number of entries in any list inside a control message.
pub const MAX_LIST_LEN: usize = 1 << 16;

/// Why a byte string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated message: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("bad magic {0:02x?}: not a PCCL-rs connection")]
    BadMagic([u8; 4]),
    #[error("protocol version {theirs} does not match ours ({ours})")]
    VersionMismatch { theirs: u16, ours: u16 },
    #[error("unknown {what} {value}")]
    Unknown { what: &'static str, value: u64 },
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    #[error("invalid utf-8 in {0}")]
    Utf8(&'static str),
}

/// Identity of a peer, chosen at random by the master at registration.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PeerId(pub [u8; 16]);

impl PeerId {
    pub fn random() -> Self {
        PeerId(rand::random())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for PeerId {
    /// First 8 hex digits: enough to tell peers apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a connection is for, declared in its greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnKind {
    /// Peer to master control channel.
    Control = 1,
    /// Ring data, dialer sends and acceptor receives.
    P2pData = 2,
    /// Shared-state transfer: acceptor serves tensors to the dialer.
    SharedState = 3,
    /// Bandwidth probe.
    Benchmark = 4,
}

impl ConnKind {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => ConnKind::Control,
            2 => ConnKind::P2pData,
            3 => ConnKind::SharedState,
            4 => ConnKind::Benchmark,
            _ => {
                return Err(WireError::Unknown {
                    what: "connection kind",
                    value: v as u64,
                })
            }
        })
    }
}

/// Connection greeting: 40 bytes, sent by the dialer and echoed by the acceptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub kind: ConnKind,
    /// Who dials (zero for control connections before registration).
    pub from: PeerId,
    /// Whom the dialer expects to reach (zero when it does not matter).
    pub to: PeerId,
}

impl Hello {
    pub const LEN: usize = 40;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let layout = HelloLayout {
            magic: MAGIC,
            version: U16::new(PROTOCOL_VERSION),
            kind: self.kind as u8,
            _pad: 0,
            from: self.from.0,
            to: self.to.0,
        };
        zerocopy::transmute!(layout)
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let h: HelloLayout = zerocopy::transmute!(*b);
        if h.magic != MAGIC {
            return Err(WireError::BadMagic(h.magic));
        }
        let version = h.version.get();
        if version != PROTOCOL_VERSION {
            return Err(WireError::VersionMismatch {
                theirs: version,
                ours: PROTOCOL_VERSION,
            });
        }
        Ok(Hello {
            kind: ConnKind::from_u8(h.kind)?,
            from: PeerId(h.from),
            to: PeerId(h.to),
        })
    }
}

/// The greeting's bytes, little-endian, no padding: what [`Hello`] encodes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloLayout {
    magic: [u8; 4],
    version: U16,
    kind: u8,
    _pad: u8,
    from: [u8; 16],
    to: [u8; 16],
}

// ---------------------------------------------------------------------------
// Byte cursor helpers

/// Append-only little-endian writer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn peer(&mut self, p: &PeerId) -> &mut Self {
        self.0.extend_from_slice(&p.0);
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    pub fn ip(&mut self, ip: &IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.0.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.0.extend_from_slice(&v6.octets());
            }
        }
        self
    }
    pub fn opt_ip(&mut self, ip: &Option<IpAddr>) -> &mut Self {
        match ip {
            None => self.u8(0),
            Some(ip) => self.ip(ip),
        }
    }
    pub fn len_prefix(&mut self, n: usize) -> &mut Self {
        self.u32(n as u32)
    }
}

/// Bounds-checked little-endian reader.
pub struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    pub fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::Unknown {
                what: "boolean",
                value: v as u64,
            }),
        }
    }
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    pub fn peer(&mut self) -> Result<PeerId, WireError> {
        Ok(PeerId(self.arr()?))
    }
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::TooLong { what, len: n, max });
        }
        self.take(n)
    }
    pub fn string(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let b = self.bytes(what, max)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| WireError::Utf8(what))
    }
    pub fn ip(&mut self) -> Result<IpAddr, WireError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.arr::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.arr::<16>()?))),
            v => Err(WireError::Unknown {
                what: "address family",
                value: v as u64,
            }),
        }
    }
    pub fn opt_ip(&mut self) -> Result<Option<IpAddr>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            4 => Ok(Some(IpAddr::V4(Ipv4Addr::from(self.arr::<4>()?)))),
            6 => Ok(Some(IpAddr::V6(Ipv6Addr::from(self.arr::<16>()?)))),
            v => Err(WireError::Unknown {
                what: "address family",
                value: v as u64,
            }),
        }
    }
    /// A list length, bounded so a hostile count cannot make us allocate.
    pub fn list_len(&mut self, what: &'static str) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_LIST_LEN {
            return Err(WireError::TooLong {
                what,
                len: n,
                max: MAX_LIST_LEN,
            });
        }
        Ok(n)
    }
    pub fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.buf.len()))
        }
    }
}

// ---------------------------------------------------------------------------
// Control messages

/// Operation fields that every participant of a collective must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectiveSpec {
    /// [`crate::CollectiveKind`].
    pub kind: u8,
    /// The algorithm the peers ask for ([`crate::Algorithm`]; 0 = let the master choose).
    pub algorithm: u8,
    /// Root rank of a broadcast (0 otherwise).
    pub root: u32,
    /// Elements of the op: the whole buffer of an all-reduce or broadcast,
    /// each rank's share of an all-gather or reduce-scatter.
    pub count: u64,
    pub datatype: u8,
    pub op: u8,
    pub quant_datatype: u8,
    pub quant_algorithm: u8,
    /// The peer's `chunk_bytes` and `pipeline_chunks`: they fix the frame
    /// geometry of pipelined ops, so peers that differ are refused up front
    /// instead of failing mid-op on a frame they cannot place.
    pub chunk_bytes: u32,
    pub pipeline_chunks: u16,
}

impl CollectiveSpec {
    /// The fields in which `self` and `other` differ, as `name a vs b`.
    pub fn differences(&self, other: &CollectiveSpec) -> String {
        let mut out = Vec::new();
        let mut field = |name: &str, a: u64, b: u64| {
            if a != b {
                out.push(format!("{name} {a} vs {b}"));
            }
        };
        field("kind", self.kind.into(), other.kind.into());
        field("algorithm", self.algorithm.into(), other.algorithm.into());
        field("root", self.root.into(), other.root.into());
        field("count", self.count, other.count);
        field("datatype", self.datatype.into(), other.datatype.into());
        field("op", self.op.into(), other.op.into());
        field(
            "quantized datatype",
            self.quant_datatype.into(),
            other.quant_datatype.into(),
        );
        field(
            "quantization",
            self.quant_algorithm.into(),
            other.quant_algorithm.into(),
        );
        field(
            "chunk_bytes",
            self.chunk_bytes.into(),
            other.chunk_bytes.into(),
        );
        field(
            "pipeline_chunks",
            self.pipeline_chunks.into(),
            other.pipeline_chunks.into(),
        );
        out.join(", ")
    }
}

/// A tensor's entry in a shared-state vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub datatype: u8,
    pub count: u64,
    pub hash: u64,
    pub allow_content_inequality: bool,
}

/// A peer as another peer should reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub id: PeerId,
    pub group: u32,
    pub ip: IpAddr,
    pub p2p_port: u16,
    pub ss_port: u16,
    pub bench_port: u16,
}

/// Membership numbers a peer reports as attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorldInfo {
    pub global_world: u32,
    pub group_world: u32,
    pub num_groups: u32,
    pub largest_group: u32,
}

/// Why the master failed a collective, as a result code of [`crate::Error`].
pub type FailCode = u8;

/// A tensor a peer must fetch during a shared-state sync, and from whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchItem {
    pub name: String,
    pub expected_hash: u64,
}

/// Peer to master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMsg {
    Register {
        group: u32,
        p2p_port: u16,
        ss_port: u16,
        bench_port: u16,
        advertised_ip: Option<IpAddr>,
    },
    Heartbeat,
    Leave,
    VoteUpdateTopology,
    ConnectionsEstablished {
        round: u64,
        ok: bool,
    },
    VoteArePeersPending,
    VoteOptimizeTopology,
    CollectiveInit {
        tag: u64,
        spec: CollectiveSpec,
        /// This peer's whole buffer, for a relayed all-reduce (empty otherwise).
        payload: Vec<u8>,
    },
    CollectiveDone {
        tag: u64,
        op_id: u64,
        ok: bool,
    },
    SyncVote {
        revision: u64,
        strategy: u8,
        tensors: Vec<TensorMeta>,
    },
    SyncTransferDone {
        sync_id: u64,
        ok: bool,
        /// The distributor that failed us, if the transfer broke.
        failed_source: Option<PeerId>,
    },
    /// A heartbeat that also reports data-plane progress: bytes received
    /// from each ring peer since the previous report (only peers with
    /// progress are listed). The master counts it as a sign of life of the
    /// sender and of every listed peer with bytes > 0 (`docs/reliability.md`).
    DataProgress {
        from: Vec<(PeerId, u64)>,
    },
}

/// Master to peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterMsg {
    RegisterAck {
        id: PeerId,
        heartbeat_interval_ms: u32,
    },
    Establish {
        round: u64,
        /// Ring order of the receiver's group.
        ring: Vec<PeerId>,
        /// Everyone in the receiver's group, with addresses the receiver can dial.
        peers: Vec<PeerEntry>,
    },
    TopologyUpdated {
        world: WorldInfo,
    },
    TopologyFailed {
        reason: String,
    },
    World {
        world: WorldInfo,
    },
    PendingAnswer {
        pending: bool,
    },
    OptimizeDone {
        ok: bool,
    },
    CollectiveCommence {
        tag: u64,
        op_id: u64,
        ring: Vec<PeerId>,
        /// The algorithm every participant runs ([`crate::Algorithm`], never auto).
        algorithm: u8,
        /// Every participant's buffer in ring order, for a relayed
        /// all-reduce (empty otherwise).
        contributions: Vec<Vec<u8>>,
    },
    CollectiveResult {
        tag: u64,
        op_id: u64,
        ok: bool,
        code: FailCode,
        reason: String,
    },
    SyncPlan {
        sync_id: u64,
        revision: u64,
        /// Empty when this peer is up to date.
        fetch: Vec<FetchItem>,
        /// Holders of the popular content, in preference order.
        sources: Vec<PeerEntry>,
    },
    SyncResult {
        sync_id: u64,
        ok: bool,
        code: FailCode,
        reason: String,
    },
    Kick {
        reason: String,
    },
}

fn enc_world(e: &mut Enc, w: &WorldInfo) {
    e.u32(w.global_world)
        .u32(w.group_world)
        .u32(w.num_groups)
        .u32(w.largest_group);
}

fn dec_world(d: &mut Dec) -> Result<WorldInfo, WireError> {
    Ok(WorldInfo {
        global_world: d.u32()?,
        group_world: d.u32()?,
        num_groups: d.u32()?,
        largest_group: d.u32()?,
    })
}

fn enc_entry(e: &mut Enc, p: &PeerEntry) {
    e.peer(&p.id)
        .u32(p.group)
        .ip(&p.ip)
        .u16(p.p2p_port)
        .u16(p.ss_port)
        .u16(p.bench_port);
}

fn dec_entry(d: &mut Dec) -> Result<PeerEntry, WireError> {
    Ok(PeerEntry {
        id: d.peer()?,
        group: d.u32()?,
        ip: d.ip()?,
        p2p_port: d.u16()?,
        ss_port: d.u16()?,
        bench_port: d.u16()?,
    })
}

fn enc_peers(e: &mut Enc, ps: &[PeerId]) {
    e.len_prefix(ps.len());
    for p in ps {
        e.peer(p);
    }
}

fn dec_peers(d: &mut Dec) -> Result<Vec<PeerId>, WireError> {
    let n = d.list_len("peer list")?;
    (0..n).map(|_| d.peer()).collect()
}

fn enc_entries(e: &mut Enc, ps: &[PeerEntry]) {
    e.len_prefix(ps.len());
    for p in ps {
        enc_entry(e, p);
    }
}

fn dec_entries(d: &mut Dec) -> Result<Vec<PeerEntry>, WireError> {
    let n = d.list_len("peer entries")?;
    (0..n).map(|_| dec_entry(d)).collect()
}

impl PeerMsg {
    pub fn type_id(&self) -> u16 {
        match self {
            PeerMsg::Register { .. } => 1,
            PeerMsg::Heartbeat => 2,
            PeerMsg::Leave => 3,
            PeerMsg::VoteUpdateTopology => 4,
            PeerMsg::ConnectionsEstablished { .. } => 5,
            PeerMsg::VoteArePeersPending => 6,
            PeerMsg::VoteOptimizeTopology => 7,
            PeerMsg::CollectiveInit { .. } => 8,
            PeerMsg::CollectiveDone { .. } => 9,
            PeerMsg::SyncVote { .. } => 10,
            PeerMsg::SyncTransferDone { .. } => 11,
            PeerMsg::DataProgress { .. } => 12,
        }
    }

    /// Encodes as a complete control frame (length prefix included).
    pub fn to_frame(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(64));
        e.u32(0).u16(self.type_id());
        match self {
            PeerMsg::Register {
                group,
                p2p_port,
                ss_port,
                bench_port,
                advertised_ip,
            } => {
                e.u32(*group)
                    .u16(*p2p_port)
                    .u16(*ss_port)
                    .u16(*bench_port)
                    .opt_ip(advertised_ip);
            }
            PeerMsg::Heartbeat
            | PeerMsg::Leave
            | PeerMsg::VoteUpdateTopology
            | PeerMsg::VoteArePeersPending
            | PeerMsg::VoteOptimizeTopology => {}
            PeerMsg::ConnectionsEstablished { round, ok } => {
                e.u64(*round).bool(*ok);
            }
            PeerMsg::CollectiveInit { tag, spec, payload } => {
                e.u64(*tag)
                    .u8(spec.kind)
                    .u8(spec.algorithm)
                    .u32(spec.root)
                    .u64(spec.count)
                    .u8(spec.datatype)
                    .u8(spec.op)
                    .u8(spec.quant_datatype)
                    .u8(spec.quant_algorithm)
                    .u32(spec.chunk_bytes)
                    .u16(spec.pipeline_chunks)
                    .bytes(payload);
            }
            PeerMsg::CollectiveDone { tag, op_id, ok } => {
                e.u64(*tag).u64(*op_id).bool(*ok);
            }
            PeerMsg::SyncVote {
                revision,
                strategy,
                tensors,
            } => {
                e.u64(*revision).u8(*strategy).len_prefix(tensors.len());
                for t in tensors {
                    e.str(&t.name)
                        .u8(t.datatype)
                        .u64(t.count)
                        .u64(t.hash)
                        .bool(t.allow_content_inequality);
                }
            }
            PeerMsg::SyncTransferDone {
                sync_id,
                ok,
                failed_source,
            } => {
                e.u64(*sync_id).bool(*ok);
                match failed_source {
                    None => e.u8(0),
                    Some(p) => e.u8(1).peer(p),
                };
            }
            PeerMsg::DataProgress { from } => {
                e.len_prefix(from.len());
                for (p, bytes) in from {
                    e.peer(p).u64(*bytes);
                }
            }
        }
        finish_frame(e.0)
    }

    /// Decodes a frame body (type + payload, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut d = Dec::new(body);
        let ty = d.u16()?;
        let msg = match ty {
            1 => PeerMsg::Register {
                group: d.u32()?,
                p2p_port: d.u16()?,
                ss_port: d.u16()?,
                bench_port: d.u16()?,
                advertised_ip: d.opt_ip()?,
            },
            2 => PeerMsg::Heartbeat,
            3 => PeerMsg::Leave,
            4 => PeerMsg::VoteUpdateTopology,
            5 => PeerMsg::ConnectionsEstablished {
                round: d.u64()?,
                ok: d.bool()?,
            },
            6 => PeerMsg::VoteArePeersPending,
            7 => PeerMsg::VoteOptimizeTopology,
            8 => PeerMsg::CollectiveInit {
                tag: d.u64()?,
                spec: CollectiveSpec {
                    kind: d.u8()?,
                    algorithm: d.u8()?,
                    root: d.u32()?,
                    count: d.u64()?,
                    datatype: d.u8()?,
                    op: d.u8()?,
                    quant_datatype: d.u8()?,
                    quant_algorithm: d.u8()?,
                    chunk_bytes: d.u32()?,
                    pipeline_chunks: d.u16()?,
                },
                payload: d
                    .bytes("relayed payload", crate::types::RELAY_MAX_BYTES)?
                    .to_vec(),
            },
            9 => PeerMsg::CollectiveDone {
                tag: d.u64()?,
                op_id: d.u64()?,
                ok: d.bool()?,
            },
            10 => {
                let revision = d.u64()?;
                let strategy = d.u8()?;
                let n = d.list_len("tensor list")?;
                let mut tensors = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    tensors.push(TensorMeta {
                        name: d.string("tensor name", MAX_NAME_LEN)?,
                        datatype: d.u8()?,
                        count: d.u64()?,
                        hash: d.u64()?,
                        allow_content_inequality: d.bool()?,
                    });
                }
                PeerMsg::SyncVote {
                    revision,
                    strategy,
                    tensors,
                }
            }
            11 => PeerMsg::SyncTransferDone {
                sync_id: d.u64()?,
                ok: d.bool()?,
                failed_source: match d.u8()? {
                    0 => None,
                    1 => Some(d.peer()?),
                    v => {
                        return Err(WireError::Unknown {
                            what: "option tag",
                            value: v as u64,
                        })
                    }
                },
            },
            12 => {
                let n = d.list_len("progress list")?;
                let mut from = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    from.push((d.peer()?, d.u64()?));
                }
                PeerMsg::DataProgress { from }
            }
            _ => {
                return Err(WireError::Unknown {
                    what: "peer message type",
                    value: ty as u64,
                })
            }
        };
        d.finish()?;
        Ok(msg)
    }
}

impl MasterMsg {
    pub fn type_id(&self) -> u16 {
        match self {
            MasterMsg::RegisterAck { .. } => 101,
            MasterMsg::Establish { .. } => 102,
            MasterMsg::TopologyUpdated { .. } => 103,
            MasterMsg::TopologyFailed { .. } => 104,
            MasterMsg::World { .. } => 105,
            MasterMsg::PendingAnswer { .. } => 106,
            MasterMsg::OptimizeDone { .. } => 107,
            MasterMsg::CollectiveCommence { .. } => 108,
            MasterMsg::CollectiveResult { .. } => 109,
            MasterMsg::SyncPlan { .. } => 110,
            MasterMsg::SyncResult { .. } => 111,
            MasterMsg::Kick { .. } => 112,
        }
    }

    pub fn to_frame(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(64));
        e.u32(0).u16(self.type_id());
        match self {
            MasterMsg::RegisterAck {
                id,
                heartbeat_interval_ms,
            } => {
                e.peer(id).u32(*heartbeat_interval_ms);
            }
            MasterMsg::Establish { round, ring, peers } => {
                e.u64(*round);
                enc_peers(&mut e, ring);
                enc_entries(&mut e, peers);
            }
            MasterMsg::TopologyUpdated { world } | MasterMsg::World { world } => {
                enc_world(&mut e, world)
            }
            MasterMsg::TopologyFailed { reason } | MasterMsg::Kick { reason } => {
                e.str(reason);
            }
            MasterMsg::PendingAnswer { pending } => {
                e.bool(*pending);
            }
            MasterMsg::OptimizeDone { ok } => {
                e.bool(*ok);
            }
            MasterMsg::CollectiveCommence {
                tag,
                op_id,
                ring,
                algorithm,
                contributions,
            } => {
                e.u64(*tag).u64(*op_id);
                enc_peers(&mut e, ring);
                e.u8(*algorithm).len_prefix(contributions.len());
                for c in contributions {
                    e.bytes(c);
                }
            }
            MasterMsg::CollectiveResult {
                tag,
                op_id,
                ok,
                code,
                reason,
            } => {
                e.u64(*tag).u64(*op_id).bool(*ok).u8(*code).str(reason);
            }
            MasterMsg::SyncPlan {
                sync_id,
                revision,
                fetch,
                sources,
            } => {
                e.u64(*sync_id).u64(*revision).len_prefix(fetch.len());
                for f in fetch {
                    e.str(&f.name).u64(f.expected_hash);
                }
                enc_entries(&mut e, sources);
            }
            MasterMsg::SyncResult {
                sync_id,
                ok,
                code,
                reason,
            } => {
                e.u64(*sync_id).bool(*ok).u8(*code).str(reason);
            }
        }
        finish_frame(e.0)
    }

    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut d = Dec::new(body);
        let ty = d.u16()?;
        let msg = match ty {
            101 => MasterMsg::RegisterAck {
                id: d.peer()?,
                heartbeat_interval_ms: d.u32()?,
            },
            102 => MasterMsg::Establish {
                round: d.u64()?,
                ring: dec_peers(&mut d)?,
                peers: dec_entries(&mut d)?,
            },
            103 => MasterMsg::TopologyUpdated {
                world: dec_world(&mut d)?,
            },
            104 => MasterMsg::TopologyFailed {
                reason: d.string("reason", MAX_CONTROL_FRAME)?,
            },
            105 => MasterMsg::World {
                world: dec_world(&mut d)?,
            },
            106 => MasterMsg::PendingAnswer { pending: d.bool()? },
            107 => MasterMsg::OptimizeDone { ok: d.bool()? },
            108 => MasterMsg::CollectiveCommence {
                tag: d.u64()?,
                op_id: d.u64()?,
                ring: dec_peers(&mut d)?,
                algorithm: d.u8()?,
                contributions: {
                    let n = d.list_len("relayed contributions")?;
                    let mut out = Vec::with_capacity(n.min(64));
                    for _ in 0..n {
                        out.push(
                            d.bytes("relayed contribution", crate::types::RELAY_MAX_BYTES)?
                                .to_vec(),
                        );
                    }
                    out
                },
            },
            109 => MasterMsg::CollectiveResult {
                tag: d.u64()?,
                op_id: d.u64()?,
                ok: d.bool()?,
                code: d.u8()?,
                reason: d.string("reason", MAX_CONTROL_FRAME)?,
            },
            110 => {
                let sync_id = d.u64()?;
                let revision = d.u64()?;
                let n = d.list_len("fetch list")?;
                let mut fetch = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    fetch.push(FetchItem {
                        name: d.string("tensor name", MAX_NAME_LEN)?,
                        expected_hash: d.u64()?,
                    });
                }
                MasterMsg::SyncPlan {
                    sync_id,
                    revision,
                    fetch,
                    sources: dec_entries(&mut d)?,
                }
            }
            111 => MasterMsg::SyncResult {
                sync_id: d.u64()?,
                ok: d.bool()?,
                code: d.u8()?,
                reason: d.string("reason", MAX_CONTROL_FRAME)?,
            },
            112 => MasterMsg::Kick {
                reason: d.string("reason", MAX_CONTROL_FRAME)?,
            },
            _ => {
                return Err(WireError::Unknown {
                    what: "master message type",
                    value: ty as u64,
                })
            }
        };
        d.finish()?;
        Ok(msg)
    }
}

fn finish_frame(mut buf: Vec<u8>) -> Vec<u8> {
    let body = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&body.to_le_bytes());
    buf
}

/// Validates a control frame's length prefix before its body is read.
pub fn check_control_len(len: u32) -> Result<usize, WireError> {
    let len = len as usize;
    if len < 2 {
        return Err(WireError::Truncated { needed: 2 - len });
    }
    if len > MAX_CONTROL_FRAME {
        return Err(WireError::TooLong {
            what: "control frame",
            len,
            max: MAX_CONTROL_FRAME,
        });
    }
    Ok(len)
}

// ---------------------------------------------------------------------------
// P2P data frames

/// How a data frame's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The elements' bytes, little-endian as in memory.
    Raw = 0,
    /// Blocks of quantized values with per-block metadata (see `quant`).
    Quantized = 1,
}

/// Fixed 40-byte header in front of every ring data payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// Master-assigned id of the collective this frame belongs to.
    pub op_id: u64,
    /// Ring step: 0..w-1 reduce-scatter, w-1..2(w-1) all-gather.
    pub step: u16,
    pub encoding: Encoding,
    /// Segment index (0..w).
    pub segment: u32,
    /// Sub-chunk index inside the segment.
    pub chunk: u32,
    /// First element of the sub-chunk in the whole buffer.
    pub elem_offset: u64,
    /// Number of elements in the sub-chunk.
    pub elems: u32,
    /// Payload bytes that follow.
    pub payload_len: u32,
}

impl DataHeader {
    pub const LEN: usize = 40;
    const MARK: u16 = 0xD47A;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let layout = DataHeaderLayout {
            mark: U16::new(Self::MARK),
            step: U16::new(self.step),
            encoding: self.encoding as u8,
            _pad: [0; 3],
            op_id: U64::new(self.op_id),
            segment: U32::new(self.segment),
            chunk: U32::new(self.chunk),
            elem_offset: U64::new(self.elem_offset),
            elems: U32::new(self.elems),
            payload_len: U32::new(self.payload_len),
        };
        zerocopy::transmute!(layout)
    }

    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let h: DataHeaderLayout = zerocopy::transmute!(*b);
        if h.mark.get() != Self::MARK {
            return Err(WireError::Unknown {
                what: "data frame mark",
                value: h.mark.get() as u64,
            });
        }
        let encoding = match h.encoding {
            0 => Encoding::Raw,
            1 => Encoding::Quantized,
            v => {
                return Err(WireError::Unknown {
                    what: "data encoding",
                    value: v as u64,
                })
            }
        };
        let payload_len = h.payload_len.get();
        if payload_len as usize > MAX_DATA_PAYLOAD {
            return Err(WireError::TooLong {
                what: "data payload",
                len: payload_len as usize,
                max: MAX_DATA_PAYLOAD,
            });
        }
        Ok(DataHeader {
            op_id: h.op_id.get(),
            step: h.step.get(),
            encoding,
            segment: h.segment.get(),
            chunk: h.chunk.get(),
            elem_offset: h.elem_offset.get(),
            elems: h.elems.get(),
            payload_len,
        })
    }
}

/// A data frame header's bytes, little-endian, no padding: what
/// [`DataHeader`] encodes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct DataHeaderLayout {
    mark: U16,
    step: U16,
    encoding: u8,
    _pad: [u8; 3],
    op_id: U64,
    segment: U32,
    chunk: U32,
    elem_offset: U64,
    elems: U32,
    payload_len: U32,
}

// ---------------------------------------------------------------------------
// Shared-state requests
//
// On a [`ConnKind::SharedState`] connection the fetching peer sends
// [`TensorRequest`]s (pipelined) and the holder answers each, in order, with a
// [`TensorResponseHead`] followed by `body_len` bytes of the tensor.

/// A fetching peer's request for one range of a shared-state tensor: the
/// fixed [`TensorRequestHead::LEN`]-byte head (`sync_id`, `offset`, `len`,
/// name length, each little-endian) followed by the name's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRequest {
    /// The sync the request belongs to (from the master's plan).
    pub sync_id: u64,
    /// First byte of the range in the tensor.
    pub offset: u64,
    /// Bytes in the range.
    pub len: u64,
    pub name: String,
}

impl TensorRequest {
    /// The request's bytes: head, then the name.
    pub fn encode(&self) -> Vec<u8> {
        let layout = TensorRequestLayout {
            sync_id: U64::new(self.sync_id),
            offset: U64::new(self.offset),
            len: U64::new(self.len),
            name_len: U32::new(self.name.len() as u32),
        };
        let head: [u8; TensorRequestHead::LEN] = zerocopy::transmute!(layout);
        let mut out = Vec::with_capacity(TensorRequestHead::LEN + self.name.len());
        out.extend_from_slice(&head);
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decodes a whole request (head and name, nothing after), as a holder
    /// reads it off the socket in two steps ([`TensorRequestHead::decode`],
    /// [`TensorRequestHead::with_name`]).
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let mut d = Dec::new(b);
        let head = TensorRequestHead::decode(&d.arr()?)?;
        let name = d.take(head.name_len)?;
        d.finish()?;
        Ok(head.with_name(name))
    }
}

/// The fixed part of a [`TensorRequest`], decoded before the name is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRequestHead {
    pub sync_id: u64,
    pub offset: u64,
    pub len: u64,
    /// Bytes of the name that follow; at most [`MAX_NAME_LEN`].
    pub name_len: usize,
}

impl TensorRequestHead {
    pub const LEN: usize = 28;

    /// Decodes the head; refuses a name longer than [`MAX_NAME_LEN`]
    /// (`TooLong`) before the caller allocates for it.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let h: TensorRequestLayout = zerocopy::transmute!(*b);
        let name_len = h.name_len.get() as usize;
        if name_len > MAX_NAME_LEN {
            return Err(WireError::TooLong {
                what: "tensor name",
                len: name_len,
                max: MAX_NAME_LEN,
            });
        }
        Ok(TensorRequestHead {
            sync_id: h.sync_id.get(),
            offset: h.offset.get(),
            len: h.len.get(),
            name_len,
        })
    }

    /// The request, given the `name_len` bytes that followed the head. A
    /// name that is not UTF-8 is taken lossily (it then names no tensor, and
    /// the holder answers [`TensorResponseHead::UNKNOWN_TENSOR`]).
    pub fn with_name(self, name: &[u8]) -> TensorRequest {
        TensorRequest {
            sync_id: self.sync_id,
            offset: self.offset,
            len: self.len,
            name: String::from_utf8_lossy(name).into_owned(),
        }
    }
}

/// A request head's bytes, little-endian, no padding: what
/// [`TensorRequest`] encodes in front of the name.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct TensorRequestLayout {
    sync_id: U64,
    offset: U64,
    len: U64,
    name_len: U32,
}

/// The head of a holder's answer to a [`TensorRequest`]: a status, the
/// holder's hash of the whole tensor and the length of the body that follows
/// (the range's bytes; zero unless the status is [`Self::OK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorResponseHead {
    pub status: u8,
    pub hash: u64,
    pub body_len: u64,
}

impl TensorResponseHead {
    pub const LEN: usize = 17;
    /// The range follows.
    pub const OK: u8 = 0;
    /// The holder is not serving the request's sync.
    pub const NOT_SERVING: u8 = 1;
    /// The holder serves no tensor of that name.
    pub const UNKNOWN_TENSOR: u8 = 2;
    /// The range is not inside the tensor.
    pub const BAD_RANGE: u8 = 3;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let layout = TensorResponseLayout {
            status: self.status,
            hash: U64::new(self.hash),
            body_len: U64::new(self.body_len),
        };
        zerocopy::transmute!(layout)
    }

    /// Every head decodes: statuses other than [`Self::OK`] (known or not)
    /// are refusals, and `body_len` is checked against the requested range by
    /// the caller, never allocated by.
    pub fn decode(b: &[u8; Self::LEN]) -> Self {
        let h: TensorResponseLayout = zerocopy::transmute!(*b);
        TensorResponseHead {
            status: h.status,
            hash: h.hash.get(),
            body_len: h.body_len.get(),
        }
    }
}

/// A response head's bytes, little-endian, no padding: what
/// [`TensorResponseHead`] encodes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct TensorResponseLayout {
    status: u8,
    hash: U64,
    body_len: U64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(frame: &[u8]) -> &[u8] {
        &frame[4..]
    }

    #[test]
    fn peer_messages_round_trip() {
        let msgs = vec![
            PeerMsg::Register {
                group: 7,
                p2p_port: 1,
                ss_port: 2,
                bench_port: 3,
                advertised_ip: Some("10.1.2.3".parse().unwrap()),
            },
            PeerMsg::Heartbeat,
            PeerMsg::DataProgress { from: vec![] },
            PeerMsg::DataProgress {
                from: vec![(PeerId([7; 16]), 1 << 33), (PeerId([9; 16]), 1)],
            },
            PeerMsg::Leave,
            PeerMsg::VoteUpdateTopology,
            PeerMsg::ConnectionsEstablished { round: 9, ok: true },
            PeerMsg::VoteArePeersPending,
            PeerMsg::VoteOptimizeTopology,
            PeerMsg::CollectiveInit {
                tag: 5,
                spec: CollectiveSpec {
                    kind: 3,
                    algorithm: 2,
                    root: 7,
                    count: 1 << 40,
                    datatype: 10,
                    op: 1,
                    quant_datatype: 0,
                    quant_algorithm: 1,
                    chunk_bytes: 512 << 10,
                    pipeline_chunks: 16,
                },
                payload: vec![1, 2, 3],
            },
            PeerMsg::CollectiveDone {
                tag: 5,
                op_id: 77,
                ok: false,
            },
            PeerMsg::SyncVote {
                revision: 3,
                strategy: 2,
                tensors: vec![TensorMeta {
                    name: "w.0".into(),
                    datatype: 10,
                    count: 12,
                    hash: 0xdead,
                    allow_content_inequality: true,
                }],
            },
            PeerMsg::SyncTransferDone {
                sync_id: 4,
                ok: false,
                failed_source: Some(PeerId([9; 16])),
            },
        ];
        for m in msgs {
            let f = m.to_frame();
            assert_eq!(
                u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize,
                f.len() - 4
            );
            assert_eq!(PeerMsg::decode(body(&f)).unwrap(), m);
        }
    }

    #[test]
    fn master_messages_round_trip() {
        let entry = PeerEntry {
            id: PeerId([1; 16]),
            group: 2,
            ip: "::1".parse().unwrap(),
            p2p_port: 4,
            ss_port: 5,
            bench_port: 6,
        };
        let msgs = vec![
            MasterMsg::RegisterAck {
                id: PeerId([3; 16]),
                heartbeat_interval_ms: 250,
            },
            MasterMsg::Establish {
                round: 2,
                ring: vec![PeerId([1; 16]), PeerId([2; 16])],
                peers: vec![entry.clone()],
            },
            MasterMsg::TopologyUpdated {
                world: WorldInfo {
                    global_world: 3,
                    group_world: 2,
                    num_groups: 2,
                    largest_group: 2,
                },
            },
            MasterMsg::TopologyFailed { reason: "x".into() },
            MasterMsg::World {
                world: WorldInfo::default(),
            },
            MasterMsg::PendingAnswer { pending: true },
            MasterMsg::OptimizeDone { ok: true },
            MasterMsg::CollectiveCommence {
                tag: 1,
                op_id: 2,
                ring: vec![PeerId([7; 16])],
                algorithm: 1,
                contributions: vec![vec![9; 4], vec![]],
            },
            MasterMsg::CollectiveResult {
                tag: 1,
                op_id: 2,
                ok: false,
                code: 8,
                reason: "peer died".into(),
            },
            MasterMsg::SyncPlan {
                sync_id: 1,
                revision: 9,
                fetch: vec![FetchItem {
                    name: "a".into(),
                    expected_hash: 4,
                }],
                sources: vec![entry],
            },
            MasterMsg::SyncResult {
                sync_id: 1,
                ok: true,
                code: 0,
                reason: String::new(),
            },
            MasterMsg::Kick {
                reason: "bye".into(),
            },
        ];
        for m in msgs {
            let f = m.to_frame();
            assert_eq!(MasterMsg::decode(body(&f)).unwrap(), m);
        }
    }

    #[test]
    fn hello_checks_magic_and_version() {
        let h = Hello {
            kind: ConnKind::P2pData,
            from: PeerId([1; 16]),
            to: PeerId([2; 16]),
        };
        let mut b = h.encode();
        assert_eq!(Hello::decode(&b).unwrap(), h);
        b[5] = 0x7f;
        assert!(matches!(
            Hello::decode(&b),
            Err(WireError::VersionMismatch { .. })
        ));
        b[0] = b'G';
        assert!(matches!(Hello::decode(&b), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn data_header_round_trip_and_bounds() {
        let h = DataHeader {
            op_id: 1 << 50,
            step: 3,
            encoding: Encoding::Quantized,
            segment: 2,
            chunk: 9,
            elem_offset: 1 << 33,
            elems: 1000,
            payload_len: 4000,
        };
        let mut b = h.encode();
        assert_eq!(DataHeader::decode(&b).unwrap(), h);
        b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            DataHeader::decode(&b),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn hostile_list_length_is_refused_without_allocating() {
        let mut e = Enc::default();
        e.u16(102).u64(1).u32(u32::MAX);
        assert!(matches!(
            MasterMsg::decode(&e.0),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn shared_state_request_and_response_bytes() {
        // The layout fetchers and holders of earlier builds exchange.
        let req = TensorRequest {
            sync_id: 0x0102_0304_0506_0708,
            offset: 0x10,
            len: 0x2000,
            name: "w.b".into(),
        };
        let mut want = Vec::new();
        want.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        want.extend_from_slice(&0x10u64.to_le_bytes());
        want.extend_from_slice(&0x2000u64.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(b"w.b");
        assert_eq!(req.encode(), want);
        let head = TensorResponseHead {
            status: TensorResponseHead::BAD_RANGE,
            hash: 0xfeed_beef,
            body_len: 7,
        };
        let mut want = vec![3u8];
        want.extend_from_slice(&0xfeed_beefu64.to_le_bytes());
        want.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(head.encode().to_vec(), want);
        // Oversized names are refused from the head alone.
        let mut big = [0u8; TensorRequestHead::LEN];
        big[24..].copy_from_slice(&(MAX_NAME_LEN as u32 + 1).to_le_bytes());
        assert!(matches!(
            TensorRequestHead::decode(&big),
            Err(WireError::TooLong { .. })
        ));
        big[24..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            TensorRequest::decode(&big),
            Err(WireError::TooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = PeerMsg::decode(&bytes);
            let _ = MasterMsg::decode(&bytes);
            if bytes.len() >= Hello::LEN {
                let mut a = [0u8; Hello::LEN];
                a.copy_from_slice(&bytes[..Hello::LEN]);
                let _ = Hello::decode(&a);
                let mut d = [0u8; DataHeader::LEN];
                d.copy_from_slice(&bytes[..DataHeader::LEN]);
                let _ = DataHeader::decode(&d);
            }
            let _ = TensorRequest::decode(&bytes);
            if bytes.len() >= TensorRequestHead::LEN {
                let mut h = [0u8; TensorRequestHead::LEN];
                h.copy_from_slice(&bytes[..TensorRequestHead::LEN]);
                if let Ok(head) = TensorRequestHead::decode(&h) {
                    prop_assert!(head.name_len <= MAX_NAME_LEN);
                    let _ = head.with_name(&bytes[TensorRequestHead::LEN..]);
                }
            }
            if bytes.len() >= TensorResponseHead::LEN {
                let mut r = [0u8; TensorResponseHead::LEN];
                r.copy_from_slice(&bytes[..TensorResponseHead::LEN]);
                let head = TensorResponseHead::decode(&r);
                prop_assert_eq!(head.encode(), r);
            }
        }

        #[test]
        fn tensor_requests_round_trip(
            sync_id in any::<u64>(),
            offset in any::<u64>(),
            len in any::<u64>(),
            name in "\\PC{0,64}",
        ) {
            let req = TensorRequest { sync_id, offset, len, name };
            let bytes = req.encode();
            prop_assert_eq!(bytes.len(), TensorRequestHead::LEN + req.name.len());
            prop_assert_eq!(TensorRequest::decode(&bytes), Ok(req.clone()));
            let mut h = [0u8; TensorRequestHead::LEN];
            h.copy_from_slice(&bytes[..TensorRequestHead::LEN]);
            let head = TensorRequestHead::decode(&h).unwrap();
            prop_assert_eq!(head.name_len, req.name.len());
            prop_assert_eq!(head.with_name(&bytes[TensorRequestHead::LEN..]), req.clone());
            // A cut or extended request is refused, never misread.
            prop_assert!(TensorRequest::decode(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert_eq!(TensorRequest::decode(&longer), Err(WireError::Trailing(1)));
        }

        #[test]
        fn tensor_response_heads_round_trip(status in any::<u8>(), hash in any::<u64>(), body_len in any::<u64>()) {
            let head = TensorResponseHead { status, hash, body_len };
            prop_assert_eq!(TensorResponseHead::decode(&head.encode()), head);
        }

        #[test]
        fn typed_prefix_fuzz(ty in prop_oneof![1u16..12, 101u16..113], tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut b = ty.to_le_bytes().to_vec();
            b.extend_from_slice(&tail);
            let _ = PeerMsg::decode(&b);
            let _ = MasterMsg::decode(&b);
        }
    }
}
