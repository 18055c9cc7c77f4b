//! # Tensor hashing
//!
//! Every tensor of the shared state is hashed on each sync: the master elects
//! the most popular content by hash, and a peer that fetched a tensor checks
//! what it received against the elected hash. The hash must therefore be
//! fast, identical on every platform, and reproducible bit for bit by the
//! CUDA port. The algorithm is specified in `docs/hashing.md`; in short:
//!
//! ```text
//! L      = byte length of the tensor, n = ceil(L / LEAF_SIZE), LEAF_SIZE = 65536
//! leaf_i = XXH3_64bits(bytes[i*LEAF_SIZE .. min((i+1)*LEAF_SIZE, L)])   (seed 0, default secret)
//! root   = XXH3_64bits(le64(leaf_0) || ... || le64(leaf_{n-1}) || le64(L))
//! ```
//!
//! The empty tensor has no leaves, so its hash is `XXH3_64bits(le64(0))`.
//! Leaves are independent, so they are hashed on several threads here (and
//! by independent thread groups on a GPU); the value never depends on the
//! number of threads, nor on how a streamed input is cut into pieces.
//!
//! * [`tensor_hash`] / [`tensor_hash_with_threads`]: one tensor, in memory.
//! * [`tensor_hashes`] / [`tensor_hashes_with_threads`]: many tensors with one
//!   set of threads (what a sync does; avoids spawning threads per tensor).
//! * [`StreamingTensorHasher`]: the same value over bytes arriving in pieces,
//!   e.g. while a tensor streams in from the network.
//! * [`leaf_hash`] / [`root_hash`]: the two steps separately, for a device
//!   path that computes the leaves elsewhere and finishes on the host.
//!
//! Threads are used only when an input is large enough to pay for them: a
//! thread is only spawned per [`MIN_BYTES_PER_THREAD`] bytes of input, so
//! anything below `2 * MIN_BYTES_PER_THREAD` is hashed on the calling thread.
//! No function here panics; if the OS refuses to spawn a thread, its share is
//! hashed on the calling thread instead.

use std::sync::OnceLock;
use std::thread;

use xxhash_rust::xxh3::{xxh3_64, Xxh3Default};

/// Size in bytes of one leaf (the last leaf of a tensor may be shorter).
/// Part of the hash definition: changing it changes every hash.
pub const LEAF_SIZE: usize = 64 * 1024;

/// Minimum input per thread. A call uses at most `len / MIN_BYTES_PER_THREAD`
/// threads, so inputs below twice this size are hashed on the calling thread.
/// Splitting a call over threads cost ~90 µs on the 2-vCPU test VM (the time
/// one core needs for ~2 MiB), and two threads beat one from ~8 MiB on (see
/// docs/hashing.md). Not part of the hash definition.
pub const MIN_BYTES_PER_THREAD: usize = 4 * 1024 * 1024;

/// Number of leaves of a tensor of `len` bytes: `ceil(len / LEAF_SIZE)`.
pub const fn leaf_count(len: u64) -> u64 {
    len.div_ceil(LEAF_SIZE as u64)
}

/// Hash of one leaf: XXH3-64 with seed 0 and the default secret.
/// `leaf` should be one leaf as defined in `docs/hashing.md`.
#[inline]
pub fn leaf_hash(leaf: &[u8]) -> u64 {
    xxh3(leaf)
}

/// Root of the tree from the leaf hashes (in leaf order) and the total byte
/// length of the tensor. `tensor_hash(b) == root_hash(&leaves(b), b.len())`.
pub fn root_hash(leaf_hashes: &[u64], total_len: u64) -> u64 {
    match leaf_hashes {
        [] => xxh3_64(&total_len.to_le_bytes()),
        [leaf] => root_of_one(*leaf, total_len),
        _ => {
            let mut buf = Vec::with_capacity(leaf_hashes.len().saturating_add(1).saturating_mul(8));
            for leaf in leaf_hashes {
                buf.extend_from_slice(&leaf.to_le_bytes());
            }
            buf.extend_from_slice(&total_len.to_le_bytes());
            xxh3(&buf)
        }
    }
}

/// Hash of a tensor's bytes as specified in `docs/hashing.md`. Uses up to
/// `available_parallelism()` threads for large inputs (one thread per
/// [`MIN_BYTES_PER_THREAD`] bytes at most).
pub fn tensor_hash(bytes: &[u8]) -> u64 {
    if bytes.len() < 2 * MIN_BYTES_PER_THREAD {
        return hash_impl(bytes, 1, MIN_BYTES_PER_THREAD);
    }
    hash_impl(bytes, default_threads(), MIN_BYTES_PER_THREAD)
}

/// Same value as [`tensor_hash`], using at most `threads` threads (0 and 1
/// both mean the calling thread only). The result is independent of `threads`.
pub fn tensor_hash_with_threads(bytes: &[u8], threads: usize) -> u64 {
    hash_impl(bytes, threads, MIN_BYTES_PER_THREAD)
}

/// Hashes of many tensors, `out[i] == tensor_hash(tensors[i])`, sharing one
/// set of up to `available_parallelism()` threads across all of them.
pub fn tensor_hashes(tensors: &[&[u8]]) -> Vec<u64> {
    if total_len(tensors) < 2 * MIN_BYTES_PER_THREAD {
        return hashes_impl(tensors, 1, MIN_BYTES_PER_THREAD);
    }
    hashes_impl(tensors, default_threads(), MIN_BYTES_PER_THREAD)
}

/// [`tensor_hashes`] with an explicit thread count; independent of `threads`.
pub fn tensor_hashes_with_threads(tensors: &[&[u8]], threads: usize) -> Vec<u64> {
    hashes_impl(tensors, threads, MIN_BYTES_PER_THREAD)
}

/// Computes [`tensor_hash`] over bytes fed in arbitrary pieces, in order,
/// without keeping them: the value at [`finish`](Self::finish) equals
/// `tensor_hash` of the concatenation of all pieces. Single-threaded.
#[derive(Clone)]
pub struct StreamingTensorHasher {
    /// XXH3 state of the current, incomplete leaf.
    leaf: Xxh3Default,
    /// Bytes already in the current leaf, `< LEAF_SIZE`.
    leaf_len: usize,
    /// XXH3 state of the root input (leaf hashes so far).
    root: Xxh3Default,
    /// Bytes fed so far.
    total_len: u64,
}

impl StreamingTensorHasher {
    /// A hasher that has seen no bytes yet.
    pub fn new() -> Self {
        Self {
            leaf: Xxh3Default::new(),
            leaf_len: 0,
            root: Xxh3Default::new(),
            total_len: 0,
        }
    }

    /// Feeds the next piece of the tensor.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total_len = self.total_len.wrapping_add(data.len() as u64);
        while !data.is_empty() {
            if self.leaf_len == 0 && data.len() >= LEAF_SIZE {
                // At a leaf boundary: hash whole leaves straight from `data`.
                let whole = data.len() - data.len() % LEAF_SIZE;
                let (leaves, rest) = data.split_at(whole);
                for leaf in leaves.chunks_exact(LEAF_SIZE) {
                    self.root.update(&xxh3(leaf).to_le_bytes());
                }
                data = rest;
                continue;
            }
            let take = (LEAF_SIZE - self.leaf_len).min(data.len());
            let (head, rest) = data.split_at(take);
            self.leaf.update(head);
            self.leaf_len += take;
            data = rest;
            if self.leaf_len == LEAF_SIZE {
                self.root.update(&self.leaf.digest().to_le_bytes());
                self.leaf.reset();
                self.leaf_len = 0;
            }
        }
    }

    /// Number of bytes fed so far.
    pub fn bytes_hashed(&self) -> u64 {
        self.total_len
    }

    /// The hash of everything fed, equal to `tensor_hash` of it.
    pub fn finish(mut self) -> u64 {
        if self.leaf_len > 0 {
            self.root.update(&self.leaf.digest().to_le_bytes());
        }
        self.root.update(&self.total_len.to_le_bytes());
        self.root.digest()
    }
}

impl Default for StreamingTensorHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for StreamingTensorHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingTensorHasher")
            .field("bytes_hashed", &self.total_len)
            .finish_non_exhaustive()
    }
}

/// XXH3-64 with seed 0 and the default secret, i.e. exactly `xxh3_64`, but
/// with an AVX2 inner loop picked at run time for inputs on XXH3's long path
/// (over 240 bytes, so every full leaf). `xxhash-rust` chooses its SIMD code
/// at compile time, and the default x86-64 target only guarantees SSE2.
#[inline]
fn xxh3(data: &[u8]) -> u64 {
    #[cfg(all(target_arch = "x86_64", not(target_feature = "avx2")))]
    {
        if data.len() > avx2::MID_SIZE_MAX && avx2::available() {
            // SAFETY: the CPU supports AVX2 (checked at run time).
            return unsafe { avx2::xxh3_64_long(data) };
        }
    }
    xxh3_64(data)
}

/// XXH3-64's long path (seed 0, default secret) with AVX2, as in the
/// reference `xxhash.h` (v0.8.x): `XXH3_hashLong_64b` with
/// `XXH3_accumulate_512_avx2` and `XXH3_scrambleAcc_avx2`. Tested equal to
/// `xxhash-rust`'s `xxh3_64` on every length class of the long path.
#[cfg(target_arch = "x86_64")]
#[allow(dead_code)] // unused when the build already enables AVX2
mod avx2 {
    use std::arch::x86_64::*;

    /// Inputs up to this length take XXH3's short and mid-size paths.
    pub(super) const MID_SIZE_MAX: usize = 240;
    const STRIPE_LEN: usize = 64;
    const SECRET_CONSUME_RATE: usize = 8;
    const SECRET_SIZE: usize = 192;
    const STRIPES_PER_BLOCK: usize = (SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME_RATE;
    const BLOCK_LEN: usize = STRIPE_LEN * STRIPES_PER_BLOCK;
    const SECRET_LASTACC_START: usize = 7;
    const SECRET_MERGEACCS_START: usize = 11;
    /// How far ahead of the stripe being hashed to prefetch (`XXH_PREFETCH_DIST`).
    const PREFETCH_DIST: usize = 384;

    const PRIME32_1: u64 = 0x9E37_79B1;
    const PRIME32_2: u64 = 0x85EB_CA77;
    const PRIME32_3: u64 = 0xC2B2_AE3D;
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
    const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

    const INITIAL_ACC: [u64; 8] = [
        PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
    ];

    /// XXH3's default secret (`XXH3_kSecret`).
    const SECRET: [u8; SECRET_SIZE] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad,
        0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3,
        0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc,
        0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
        0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65,
        0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19,
        0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9,
        0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
        0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb,
        0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, 0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0,
        0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d,
        0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
        0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
    ];

    /// Whether this CPU has AVX2 (the standard library caches the answer).
    #[inline]
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// `XXH3_accumulate_512`: one 64-byte stripe into the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn accumulate_512(acc: &mut [__m256i; 2], stripe: *const u8, secret: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(stripe.wrapping_add(PREFETCH_DIST) as *const i8);
        for (i, a) in acc.iter_mut().enumerate() {
            let data = _mm256_loadu_si256(stripe.add(32 * i) as *const __m256i);
            let key = _mm256_loadu_si256(secret.add(32 * i) as *const __m256i);
            let data_key = _mm256_xor_si256(data, key);
            let data_key_hi = _mm256_srli_epi64::<32>(data_key);
            let product = _mm256_mul_epu32(data_key, data_key_hi);
            // Swap the two 64-bit words of each 128-bit half: acc[i ^ 1] += data[i].
            let swapped = _mm256_shuffle_epi32::<0b01_00_11_10>(data);
            *a = _mm256_add_epi64(*a, _mm256_add_epi64(product, swapped));
        }
    }

    /// `XXH3_scrambleAcc`, at the end of every block.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scramble(acc: &mut [__m256i; 2], secret: *const u8) {
        let prime = _mm256_set1_epi32(PRIME32_1 as i32);
        for (i, a) in acc.iter_mut().enumerate() {
            let shifted = _mm256_xor_si256(*a, _mm256_srli_epi64::<47>(*a));
            let key = _mm256_loadu_si256(secret.add(32 * i) as *const __m256i);
            let data_key = _mm256_xor_si256(shifted, key);
            let data_key_hi = _mm256_srli_epi64::<32>(data_key);
            let lo = _mm256_mul_epu32(data_key, prime);
            let hi = _mm256_mul_epu32(data_key_hi, prime);
            *a = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
        }
    }

    fn read64(at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&SECRET[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn mul128_fold64(a: u64, b: u64) -> u64 {
        let p = (a as u128).wrapping_mul(b as u128);
        (p as u64) ^ ((p >> 64) as u64)
    }

    fn avalanche(mut h: u64) -> u64 {
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }

    /// `XXH3_64bits(input)`; meant for `input.len() > MID_SIZE_MAX` (shorter
    /// inputs go to `xxhash-rust`).
    ///
    /// # Safety
    /// The CPU must support AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn xxh3_64_long(input: &[u8]) -> u64 {
        let len = input.len();
        if len <= MID_SIZE_MAX {
            return xxhash_rust::xxh3::xxh3_64(input);
        }
        let p = input.as_ptr();
        let secret = SECRET.as_ptr();
        let init = INITIAL_ACC.as_ptr() as *const __m256i;
        let mut acc = [_mm256_loadu_si256(init), _mm256_loadu_si256(init.add(1))];
        let nb_blocks = (len - 1) / BLOCK_LEN;
        for n in 0..nb_blocks {
            let block = p.add(n * BLOCK_LEN);
            for s in 0..STRIPES_PER_BLOCK {
                accumulate_512(
                    &mut acc,
                    block.add(s * STRIPE_LEN),
                    secret.add(s * SECRET_CONSUME_RATE),
                );
            }
            scramble(&mut acc, secret.add(SECRET_SIZE - STRIPE_LEN));
        }
        let nb_stripes = ((len - 1) - BLOCK_LEN * nb_blocks) / STRIPE_LEN;
        let block = p.add(nb_blocks * BLOCK_LEN);
        for s in 0..nb_stripes {
            accumulate_512(
                &mut acc,
                block.add(s * STRIPE_LEN),
                secret.add(s * SECRET_CONSUME_RATE),
            );
        }
        accumulate_512(
            &mut acc,
            p.add(len - STRIPE_LEN),
            secret.add(SECRET_SIZE - STRIPE_LEN - SECRET_LASTACC_START),
        );
        let mut lanes = [0u64; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc[0]);
        _mm256_storeu_si256((lanes.as_mut_ptr() as *mut __m256i).add(1), acc[1]);
        let mut h = (len as u64).wrapping_mul(PRIME64_1);
        for i in 0..4 {
            let at = SECRET_MERGEACCS_START + 16 * i;
            h = h.wrapping_add(mul128_fold64(
                lanes[2 * i] ^ read64(at),
                lanes[2 * i + 1] ^ read64(at + 8),
            ));
        }
        avalanche(h)
    }
}

/// `available_parallelism()`, read once (on Linux it reads cgroup files).
fn default_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| thread::available_parallelism().map_or(1, |n| n.get()))
}

fn total_len(tensors: &[&[u8]]) -> usize {
    tensors.iter().fold(0, |acc, t| acc.saturating_add(t.len()))
}

/// Root for a tensor of at most one leaf, without allocating.
#[inline]
fn root_of_one(leaf: u64, total_len: u64) -> u64 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&leaf.to_le_bytes());
    buf[8..].copy_from_slice(&total_len.to_le_bytes());
    xxh3_64(&buf)
}

/// Threads worth using for `bytes` bytes in `leaves` leaves.
fn effective_threads(
    bytes: usize,
    leaves: usize,
    requested: usize,
    min_per_thread: usize,
) -> usize {
    let by_size = bytes / min_per_thread.max(1);
    requested.min(by_size).min(leaves).max(1)
}

/// Writes the little-endian hash of each leaf of `data` (which starts at a
/// leaf boundary) into consecutive 8-byte slots of `out`.
fn hash_leaves_into(data: &[u8], out: &mut [u8]) {
    for (slot, leaf) in out.chunks_exact_mut(8).zip(data.chunks(LEAF_SIZE)) {
        slot.copy_from_slice(&xxh3(leaf).to_le_bytes());
    }
}

/// Runs `work(i, item)` for every item, item 0 on the calling thread and the
/// others on scoped threads; returns the indices whose thread could not be
/// spawned or did not finish, so the caller can redo them.
fn run_parallel<T: Send, F>(items: Vec<T>, work: F) -> Vec<usize>
where
    F: Fn(usize, T) + Sync,
{
    let work = &work;
    thread::scope(|s| {
        let mut handles = Vec::with_capacity(items.len());
        let mut failed = Vec::new();
        let mut first = None;
        for (i, item) in items.into_iter().enumerate() {
            if i == 0 {
                first = Some(item);
                continue;
            }
            match thread::Builder::new()
                .name("pccl-hash".into())
                .spawn_scoped(s, move || work(i, item))
            {
                Ok(handle) => handles.push((i, handle)),
                Err(_) => failed.push(i),
            }
        }
        if let Some(item) = first {
            work(0, item);
        }
        for (i, handle) in handles {
            if handle.join().is_err() {
                failed.push(i);
            }
        }
        failed
    })
}

fn hash_impl(bytes: &[u8], threads: usize, min_per_thread: usize) -> u64 {
    let len = bytes.len();
    if len == 0 {
        return root_hash(&[], 0);
    }
    if len <= LEAF_SIZE {
        return root_of_one(xxh3(bytes), len as u64);
    }
    let n_leaves = len.div_ceil(LEAF_SIZE);
    let mut root = vec![0u8; n_leaves * 8 + 8];
    let (leaf_part, len_part) = root.split_at_mut(n_leaves * 8);
    len_part.copy_from_slice(&(len as u64).to_le_bytes());

    let threads = effective_threads(len, n_leaves, threads, min_per_thread);
    if threads <= 1 {
        hash_leaves_into(bytes, leaf_part);
    } else {
        let per_thread = n_leaves.div_ceil(threads);
        let data_chunk = per_thread * LEAF_SIZE;
        let out_chunk = per_thread * 8;
        let items: Vec<_> = bytes
            .chunks(data_chunk)
            .zip(leaf_part.chunks_mut(out_chunk))
            .collect();
        let failed = run_parallel(items, |_, (data, out)| hash_leaves_into(data, out));
        for i in failed {
            let data = bytes.chunks(data_chunk).nth(i).unwrap_or_default();
            if let Some(out) = leaf_part.chunks_mut(out_chunk).nth(i) {
                hash_leaves_into(data, out);
            }
        }
    }
    xxh3(&root)
}

/// Fills `out` with the hashes of global leaves `first..first + out.len()`,
/// where global leaf numbering runs through `tensors` in order and
/// `starts[t]` is the global index of the first leaf of tensor `t`.
fn hash_global_leaves(tensors: &[&[u8]], starts: &[usize], first: usize, out: &mut [u64]) {
    // Last tensor whose first leaf is <= `first`: the one holding it (empty
    // tensors share their start with the next tensor and are skipped).
    let mut t = starts.partition_point(|&s| s <= first).saturating_sub(1);
    let mut j = first.saturating_sub(starts.get(t).copied().unwrap_or(0));
    for slot in out.iter_mut() {
        let leaf = loop {
            let Some(tensor) = tensors.get(t) else { return };
            match tensor.chunks(LEAF_SIZE).nth(j) {
                Some(leaf) => break leaf,
                None => {
                    t += 1;
                    j = 0;
                }
            }
        };
        *slot = xxh3(leaf);
        j += 1;
    }
}

fn hashes_impl(tensors: &[&[u8]], threads: usize, min_per_thread: usize) -> Vec<u64> {
    let total_bytes = total_len(tensors);
    let mut starts = Vec::with_capacity(tensors.len());
    let mut n_leaves = 0usize;
    for t in tensors {
        starts.push(n_leaves);
        n_leaves += t.len().div_ceil(LEAF_SIZE);
    }
    let threads = effective_threads(total_bytes, n_leaves, threads, min_per_thread);
    if threads <= 1 {
        return tensors
            .iter()
            .map(|t| hash_impl(t, 1, min_per_thread))
            .collect();
    }

    let mut leaves = vec![0u64; n_leaves];
    let per_thread = n_leaves.div_ceil(threads);
    let items: Vec<_> = leaves.chunks_mut(per_thread).collect();
    let failed = run_parallel(items, |i, out| {
        hash_global_leaves(tensors, &starts, i * per_thread, out)
    });
    for i in failed {
        if let Some(out) = leaves.chunks_mut(per_thread).nth(i) {
            hash_global_leaves(tensors, &starts, i * per_thread, out);
        }
    }

    tensors
        .iter()
        .zip(&starts)
        .map(|(t, &start)| {
            let count = t.len().div_ceil(LEAF_SIZE);
            let mine = leaves.get(start..start + count).unwrap_or_default();
            root_hash(mine, t.len() as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, RngCore, SeedableRng};

    /// The xxHash project's sanity-test buffer (`cli/xsum_sanity_check.c`):
    /// `buf[i] = gen >> 56; gen *= PRIME64`, starting from `gen = PRIME32`.
    fn sanity_buffer(len: usize) -> Vec<u8> {
        const PRIME32: u64 = 2_654_435_761;
        const PRIME64: u64 = 11_400_714_785_074_694_797;
        let mut gen = PRIME32;
        (0..len)
            .map(|_| {
                let b = (gen >> 56) as u8;
                gen = gen.wrapping_mul(PRIME64);
                b
            })
            .collect()
    }

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// Straight transcription of docs/hashing.md, sharing no code with the
    /// implementation above except XXH3 itself.
    fn reference(bytes: &[u8]) -> u64 {
        let mut root = Vec::new();
        for leaf in bytes.chunks(65536) {
            root.extend_from_slice(&xxh3_64(leaf).to_le_bytes());
        }
        root.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        xxh3_64(&root)
    }

    /// XXH3_64bits, seed 0, of the sanity buffer: the official vectors of
    /// xxHash 0.8.x (`XSUM_XXH3_testdata`), one per length class.
    #[test]
    fn xxh3_known_answers() {
        let buf = sanity_buffer(2367);
        let vectors: [(usize, u64); 14] = [
            (0, 0x2D06800538D394C2),
            (1, 0xC44BDFF4074EECDB),
            (6, 0x27B56A84CD2D7325),
            (12, 0xA713DAF0DFBB77E7),
            (24, 0xA3FE70BF9D3510EB),
            (48, 0x397DA259ECBA1F11),
            (80, 0xBCDEFBBB2C47C90A),
            (195, 0xCD94217EE362EC3A),
            (403, 0xCDEB804D65C6DEA4),
            (512, 0x617E49599013CB6B),
            (2048, 0xDD59E2C3A5F038E0),
            (2099, 0xC6B9D9B3FC9AC765),
            (2240, 0x6E73A90539CF2948),
            (2367, 0xCB37AEB9E5D361ED),
        ];
        for (len, want) in vectors {
            assert_eq!(
                leaf_hash(&buf[..len]),
                want,
                "XXH3_64bits of {len} sanity bytes"
            );
        }
    }

    /// Known answers of the tensor hash (docs/hashing.md), cross-checked
    /// against a Python transcription calling the system's C libxxhash.
    #[test]
    fn tensor_hash_known_answers() {
        let buf = sanity_buffer(1 << 20);
        let vectors: [(usize, u64); 9] = [
            (0, 0xC77B3ABB6F87ACD9),
            (1, 0x87BC669437310826),
            (195, 0xA53908C9E4E562B2),
            (65535, 0xE26ACAC7933B8BA2),
            (65536, 0xC6DFE81770814032),
            (65537, 0xA00C987975018E9C),
            (196625, 0x05EB0B1920C7EF1D),
            (1 << 20, 0xB26CB959C9935FD5),
            (1000003, 0xEA9606516C328CA8),
        ];
        for (len, want) in vectors {
            let data = &buf[..len];
            assert_eq!(tensor_hash(data), want, "tensor_hash of {len} sanity bytes");
            assert_eq!(reference(data), want, "reference of {len} sanity bytes");
            assert_eq!(hash_impl(data, 4, 1), want, "4 threads, {len} sanity bytes");
        }
        // 3 MiB of zeros: large enough for tensor_hash to use threads.
        let zeros = vec![0u8; 3 << 20];
        assert_eq!(tensor_hash(&zeros), 0x854B76DFDDF38BE6);
    }

    /// The run-time AVX2 path equals `xxhash-rust` on every length class of
    /// XXH3's long path: one stripe, partial blocks, whole blocks (the
    /// `len - 1` boundary), a full leaf, and arbitrary lengths.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_long_path_matches_xxh3() {
        if !avx2::available() {
            eprintln!("no AVX2 on this CPU; nothing to compare");
            return;
        }
        let buf = random_bytes(3 * LEAF_SIZE + 4096, 21);
        let mut lens: Vec<usize> = (241..=2200).collect();
        for k in 1..=70usize {
            for d in [-1isize, 0, 1] {
                lens.push((k * 1024).saturating_add_signed(d));
            }
        }
        lens.extend([
            LEAF_SIZE - 1,
            LEAF_SIZE,
            LEAF_SIZE + 1,
            3 * LEAF_SIZE + 4096,
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        lens.extend((0..500).map(|_| rng.gen_range(241..buf.len())));
        for len in lens {
            for start in [0, 1, 7] {
                let Some(data) = buf.get(start..start + len) else {
                    continue;
                };
                // SAFETY: AVX2 is available (checked above).
                let got = unsafe { avx2::xxh3_64_long(data) };
                assert_eq!(got, xxh3_64(data), "len {len} at offset {start}");
            }
        }
        let zeros = vec![0u8; LEAF_SIZE];
        // SAFETY: as above.
        assert_eq!(unsafe { avx2::xxh3_64_long(&zeros) }, xxh3_64(&zeros));
    }

    #[test]
    fn empty_and_tiny_inputs() {
        assert_eq!(tensor_hash(&[]), xxh3_64(&[0u8; 8]));
        assert_eq!(tensor_hash_with_threads(&[], 0), tensor_hash(&[]));
        assert_eq!(StreamingTensorHasher::new().finish(), tensor_hash(&[]));
        assert_eq!(root_hash(&[], 0), tensor_hash(&[]));
        // Different lengths of zeros differ (length is part of the root).
        let zeros = vec![0u8; 3 * LEAF_SIZE + 1];
        let mut seen = std::collections::HashSet::new();
        for len in [
            0,
            1,
            2,
            8,
            LEAF_SIZE,
            LEAF_SIZE + 1,
            2 * LEAF_SIZE,
            3 * LEAF_SIZE + 1,
        ] {
            assert!(
                seen.insert(tensor_hash(&zeros[..len])),
                "collision at {len}"
            );
        }
    }

    #[test]
    fn leaf_and_root_compose() {
        let data = random_bytes(5 * LEAF_SIZE + 123, 7);
        let leaves: Vec<u64> = data.chunks(LEAF_SIZE).map(leaf_hash).collect();
        assert_eq!(leaf_count(data.len() as u64), leaves.len() as u64);
        assert_eq!(root_hash(&leaves, data.len() as u64), tensor_hash(&data));
        let one = &data[..100];
        assert_eq!(root_hash(&[leaf_hash(one)], 100), tensor_hash(one));
    }

    #[test]
    fn threads_are_used_for_large_inputs_and_agree() {
        let data = random_bytes(4 * MIN_BYTES_PER_THREAD + 3, 11);
        let one = tensor_hash_with_threads(&data, 1);
        assert_eq!(one, reference(&data));
        for threads in [0, 2, 3, 4, 16] {
            assert_eq!(
                tensor_hash_with_threads(&data, threads),
                one,
                "{threads} threads"
            );
        }
        assert_eq!(tensor_hash(&data), one);
    }

    #[test]
    fn single_bit_flips_change_the_hash() {
        let mut data = random_bytes(3 * LEAF_SIZE + 17, 3);
        let base = tensor_hash(&data);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut positions = vec![
            0,
            LEAF_SIZE - 1,
            LEAF_SIZE,
            2 * LEAF_SIZE + 1,
            data.len() - 1,
        ];
        positions.extend((0..64).map(|_| rng.gen_range(0..data.len())));
        for pos in positions {
            for bit in [0, 7] {
                data[pos] ^= 1 << bit;
                assert_ne!(tensor_hash(&data), base, "flip of bit {bit} at {pos}");
                data[pos] ^= 1 << bit;
            }
        }
        assert_eq!(tensor_hash(&data), base);
        // Also for a small (single-leaf) tensor.
        let mut small = random_bytes(64, 4);
        let base = tensor_hash(&small);
        for pos in 0..small.len() {
            small[pos] ^= 0x10;
            assert_ne!(tensor_hash(&small), base, "flip at {pos}");
            small[pos] ^= 0x10;
        }
    }

    #[test]
    fn many_tensors_match_one_by_one() {
        let sizes = [
            0,
            1,
            LEAF_SIZE,
            0,
            3 * LEAF_SIZE + 5,
            100,
            0,
            LEAF_SIZE - 1,
            7 * LEAF_SIZE,
        ];
        let owned: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| random_bytes(n, i as u64))
            .collect();
        let tensors: Vec<&[u8]> = owned.iter().map(|v| v.as_slice()).collect();
        let want: Vec<u64> = tensors.iter().map(|t| reference(t)).collect();
        assert_eq!(tensor_hashes(&tensors), want);
        for threads in [0, 1, 2, 3, 5, 8, 64] {
            assert_eq!(hashes_impl(&tensors, threads, 1), want, "{threads} threads");
        }
        assert_eq!(tensor_hashes(&[]), Vec::<u64>::new());
        assert_eq!(hashes_impl(&[&[], &[]], 4, 1), vec![tensor_hash(&[]); 2]);
    }

    /// Sizes around leaf boundaries, plus arbitrary ones.
    fn interesting_len() -> impl Strategy<Value = usize> {
        prop_oneof![
            (0usize..6, -2isize..=2).prop_map(|(k, d)| (k * LEAF_SIZE).saturating_add_signed(d)),
            0usize..300,
            0usize..6 * LEAF_SIZE,
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn thread_count_does_not_matter(len in interesting_len(), threads in 0usize..9, seed: u64) {
            let data = random_bytes(len, seed);
            let want = reference(&data);
            prop_assert_eq!(tensor_hash_with_threads(&data, threads), want);
            // Force splitting even small inputs across threads.
            prop_assert_eq!(hash_impl(&data, threads, 1), want);
        }

        #[test]
        fn streaming_matches_one_shot(
            len in interesting_len(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
            seed: u64,
        ) {
            let data = random_bytes(len, seed);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
            points.push(0);
            points.push(len);
            points.sort_unstable();
            let mut hasher = StreamingTensorHasher::new();
            for w in points.windows(2) {
                hasher.update(&data[w[0]..w[1]]);
            }
            prop_assert_eq!(hasher.bytes_hashed(), len as u64);
            prop_assert_eq!(hasher.finish(), tensor_hash(&data));
        }
    }

    #[test]
    fn streaming_in_tiny_pieces() {
        let data = random_bytes(2 * LEAF_SIZE + 77, 9);
        for piece in [1, 7, 64, 4096, LEAF_SIZE - 1, LEAF_SIZE + 1] {
            let mut hasher = StreamingTensorHasher::default();
            for chunk in data.chunks(piece) {
                hasher.update(chunk);
            }
            assert_eq!(hasher.finish(), tensor_hash(&data), "pieces of {piece}");
        }
    }
}
