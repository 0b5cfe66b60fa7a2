//! The C ABI of `csrc/c10d_shim.cpp`. Every function returns NULL on success or a malloc'd
//! message, freed with [`hq_dist_free`]. Tensors are torch-sys's `C_tensor` (`at::Tensor*`).

use std::os::raw::{c_char, c_int};

use torch_sys::C_tensor;

/// Opaque: a TCPStore client (rank 0: and server).
#[repr(C)]
pub struct Store {
    _private: [u8; 0],
}

/// Opaque: DDP's gradient reducer over a process group.
#[repr(C)]
pub struct Reducer {
    _private: [u8; 0],
}

/// Opaque: a process group (sharing a store).
#[repr(C)]
pub struct Group {
    _private: [u8; 0],
}

extern "C" {
    pub fn hq_dist_free(message: *mut c_char);
    pub fn hq_dist_store_new(
        master_addr: *const c_char,
        port: u16,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        out: *mut *mut Store,
    ) -> *mut c_char;
    pub fn hq_dist_store_free(store: *mut Store);
    pub fn hq_dist_group_new(
        store: *mut Store,
        rank: c_int,
        world_size: c_int,
        backend: *const c_char,
        gloo_host: *const c_char,
        timeout_ms: i64,
        out: *mut *mut Group,
    ) -> *mut c_char;
    pub fn hq_dist_group_free(group: *mut Group);
    pub fn hq_dist_all_reduce(
        group: *mut Group,
        tensor: *mut C_tensor,
        op: c_int,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub fn hq_dist_all_gather(
        group: *mut Group,
        input: *mut C_tensor,
        outputs: *const *mut C_tensor,
        n_outputs: usize,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub fn hq_dist_broadcast(
        group: *mut Group,
        tensor: *mut C_tensor,
        root: c_int,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub fn hq_dist_barrier(group: *mut Group, timeout_ms: i64) -> *mut c_char;
    pub fn hq_dist_reducer_new(
        group: *mut Group,
        params: *const *mut C_tensor,
        n: usize,
        bucket_bytes: i64,
        out: *mut *mut Reducer,
    ) -> *mut c_char;
    pub fn hq_dist_reducer_free(reducer: *mut Reducer);
    pub fn hq_dist_reducer_prepare(reducer: *mut Reducer, output: *mut C_tensor) -> *mut c_char;
    pub fn hq_dist_store_set(
        store: *mut Store,
        key: *const c_char,
        value: *const u8,
        len: usize,
    ) -> *mut c_char;
    pub fn hq_dist_store_get(
        store: *mut Store,
        key: *const c_char,
        timeout_ms: i64,
        value: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
}
