//! Shared state: named tensors plus a revision counter, kept bit-identical
//! across the peers of a group. A sync hashes every tensor, lets the master
//! elect the popular content, and fetches exactly the differing tensors from
//! a peer that holds it, verifying them by hash before returning.

use std::marker::PhantomData;

use crate::comm::Element;
use crate::types::{DataType, DeviceType};

/// One tensor of a shared state. Borrowed mutably for `'a`: a sync may
/// overwrite it with the popular content.
pub struct SharedTensor<'a> {
    pub(crate) name: String,
    pub(crate) ptr: *mut u8,
    pub(crate) count: usize,
    pub(crate) datatype: DataType,
    pub(crate) device: DeviceType,
    pub(crate) allow_content_inequality: bool,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a SharedTensor is an exclusive borrow of its buffer (or, via
// `from_raw`, a caller promise of the same), so moving it to another thread
// is as safe as moving a `&mut [u8]`.
unsafe impl Send for SharedTensor<'_> {}

impl<'a> SharedTensor<'a> {
    /// A tensor over a typed slice on the CPU.
    pub fn new<T: Element>(name: impl Into<String>, data: &'a mut [T]) -> Self {
        SharedTensor {
            name: name.into(),
            ptr: data.as_mut_ptr() as *mut u8,
            count: data.len(),
            datatype: T::DTYPE,
            device: DeviceType::Cpu,
            allow_content_inequality: false,
            _borrow: PhantomData,
        }
    }

    /// A tensor over raw memory (for the C and Python layers).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `count * datatype.size()`
    /// bytes for `'a`, and nothing else may access it during a sync.
    pub unsafe fn from_raw(
        name: impl Into<String>,
        ptr: *mut u8,
        count: usize,
        datatype: DataType,
        device: DeviceType,
    ) -> Self {
        SharedTensor {
            name: name.into(),
            ptr,
            count,
            datatype,
            device,
            allow_content_inequality: false,
            _borrow: PhantomData,
        }
    }

    /// Marks the tensor as allowed to differ between peers: it is neither
    /// voted on nor re-sent every step (only to peers whose revision lags).
    pub fn allow_content_inequality(mut self, allow: bool) -> Self {
        self.allow_content_inequality = allow;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    pub fn byte_len(&self) -> usize {
        self.count * self.datatype.size()
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the constructor's contract makes ptr valid for byte_len bytes for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr, self.byte_len()) }
    }
}

/// A revision counter and the tensors it versions.
pub struct SharedState<'a> {
    /// Must advance by exactly one per sync; a newcomer's first sync adopts
    /// the group's revision.
    pub revision: u64,
    pub tensors: Vec<SharedTensor<'a>>,
}

impl<'a> SharedState<'a> {
    pub fn new(revision: u64, tensors: Vec<SharedTensor<'a>>) -> Self {
        SharedState { revision, tensors }
    }
}
