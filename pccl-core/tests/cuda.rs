//! No build has a CUDA path yet: `CUDA_SUPPORT` is false with or without the
//! `cuda` feature, and a CUDA tensor is refused with `InvalidArgument`
//! before anything is read from its (device) address or sent.

mod common;

use common::*;
use pccl_core::{
    DataType, DeviceType, Error, SharedState, SharedTensor, SyncStrategy, CUDA_SUPPORT,
};

#[test]
fn cuda_support_is_false_in_every_build() {
    // black_box: the value is a constant, the point is to check which one.
    assert!(
        !std::hint::black_box(CUDA_SUPPORT),
        "no CUDA code exists, whatever the features"
    );
}

#[test]
fn a_cuda_tensor_is_invalid_argument() {
    let m = master();
    let peers = connect_peers(m.local_addr(), 1, |_| 0);
    let mut w = vec![1.5f32; 8];
    let mut step = vec![3i64; 1];
    // SAFETY: `w` is valid for reads and writes of 8 f32 for as long as the
    // shared state lives (it is dropped before `w` is read below); the tensor
    // is labelled CUDA to check that the label alone is refused.
    let cuda = unsafe {
        SharedTensor::from_raw(
            "w",
            w.as_mut_ptr() as *mut u8,
            w.len(),
            DataType::F32,
            DeviceType::Cuda,
        )
    };
    let mut st = SharedState::new(1, vec![SharedTensor::new("step", &mut step), cuda]);
    match peers[0].sync_shared_state(&mut st, SyncStrategy::EnforcePopular) {
        Err(Error::InvalidArgument(msg)) => assert!(msg.contains("CUDA"), "{msg}"),
        other => panic!("a CUDA tensor gave {other:?}"),
    }
    assert_eq!(st.revision, 1);
    drop(st);
    assert!(w.iter().all(|&x| x == 1.5) && step == [3]);
}
