//! A pool of reusable byte buffers for received data frames, so the data
//! path does not allocate per sub-chunk.

use std::sync::{Arc, Mutex};

/// Buffers up to this size are recycled; larger ones are freed after use.
const POOLED_CAPACITY: usize = 4 << 20;
/// At most this many bytes of idle buffers are kept: enough for an op's
/// whole inbox of default-sized sub-chunks (256 × 512 KiB), so a steady
/// stream of frames does not allocate and free buffers.
const MAX_IDLE_BYTES: usize = 128 << 20;

#[derive(Default)]
pub struct BufPool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    pub fn new() -> Arc<Self> {
        Arc::new(BufPool::default())
    }

    /// A buffer of exactly `len` initialized bytes.
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut v = if len <= POOLED_CAPACITY {
            self.idle
                .lock()
                .ok()
                .and_then(|mut idle| {
                    let v = idle.bufs.pop()?;
                    idle.bytes -= v.len();
                    Some(v)
                })
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if v.len() < len {
            // Grow once to the pooled size: recycled buffers never zero-fill again.
            v.resize(len.max(POOLED_CAPACITY.min(len.next_power_of_two())), 0);
        }
        PooledBuf {
            data: v,
            len,
            pool: Some(self.clone()),
        }
    }
}

/// A buffer on loan from a [`BufPool`]; returns itself on drop.
pub struct PooledBuf {
    data: Vec<u8>,
    len: usize,
    pool: Option<Arc<BufPool>>,
}

impl PooledBuf {
    /// A zero-length buffer that belongs to no pool.
    pub fn empty() -> Self {
        PooledBuf {
            data: Vec::new(),
            len: 0,
            pool: None,
        }
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            if self.data.len() <= POOLED_CAPACITY {
                if let Ok(mut idle) = pool.idle.lock() {
                    if idle.bytes + self.data.len() <= MAX_IDLE_BYTES {
                        idle.bytes += self.data.len();
                        let v = std::mem::take(&mut self.data);
                        idle.bufs.push(v);
                    }
                }
            }
        }
    }
}
