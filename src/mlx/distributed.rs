//! MLX's own distributed layer (the ring backend over TCP: `mlx.launch`'s
//! `MLX_RANK` and `MLX_HOSTFILE`), through mlx-c: joining a group and the
//! collectives kvserve uses. No networking of kvserve's own.

use std::ffi::CString;
use std::panic::Location;

use mlx_rs::{Array, Dtype, Stream};

use super::ffi::guarded_call;
use super::MlxError;

/// A joined group of processes; its rank and size.
pub struct Group {
    raw: mlx_sys::mlx_distributed_group,
}

// The group handle is only read by MLX's collectives, which MLX serializes.
unsafe impl Send for Group {}
// kvserve calls a group's collectives from its engine thread only (a
// sharded model's blocks share it through an Arc).
unsafe impl Sync for Group {}

impl Group {
    /// Join the group `backend` (`"ring"`, `"any"`, ...) describes through
    /// the environment (`MLX_RANK`, `MLX_HOSTFILE` for the ring). Blocks
    /// until every neighbour is connected or the backend gives up.
    #[track_caller]
    pub fn init(backend: &str) -> Result<Group, MlxError> {
        let name = CString::new(backend).map_err(|_| MlxError { message: "a backend name with a NUL".into(), location: Location::caller() })?;
        // SAFETY: `name` outlives the call; the group written is owned by the returned Group.
        let mut raw = unsafe { mlx_sys::mlx_distributed_group_new() };
        guarded_call(|| unsafe { mlx_sys::mlx_distributed_init(&mut raw, true, name.as_ptr()) })?;
        if raw.ctx.is_null() {
            return Err(MlxError { message: format!("MLX's {backend} backend is not available in this build"), location: Location::caller() });
        }
        Ok(Group { raw })
    }

    /// Whether MLX was built with `backend`.
    pub fn available(backend: &str) -> bool {
        let Ok(name) = CString::new(backend) else { return false };
        // SAFETY: reads a static table; `name` outlives the call.
        unsafe { mlx_sys::mlx_distributed_is_available(name.as_ptr()) }
    }

    pub fn rank(&self) -> usize {
        // SAFETY: a live group handle.
        unsafe { mlx_sys::mlx_distributed_group_rank(self.raw) }.max(0) as usize
    }

    pub fn size(&self) -> usize {
        // SAFETY: a live group handle.
        unsafe { mlx_sys::mlx_distributed_group_size(self.raw) }.max(0) as usize
    }

    /// The sum of `x` over every rank (lazy, on the CPU stream).
    #[track_caller]
    pub fn all_sum(&self, x: &Array) -> Result<Array, MlxError> {
        self.op(|res, s| unsafe { mlx_sys::mlx_distributed_all_sum(res, x.as_ptr(), self.raw, s) })
    }

    /// Every rank's `x` stacked along the first axis, in rank order (lazy).
    #[track_caller]
    pub fn all_gather(&self, x: &Array) -> Result<Array, MlxError> {
        self.op(|res, s| unsafe { mlx_sys::mlx_distributed_all_gather(res, x.as_ptr(), self.raw, s) })
    }

    /// Send `x` to rank `dst`: the returned array is done when it was sent (evaluate it).
    #[track_caller]
    pub fn send(&self, x: &Array, dst: usize) -> Result<Array, MlxError> {
        self.op(|res, s| unsafe { mlx_sys::mlx_distributed_send(res, x.as_ptr(), dst as i32, self.raw, s) })
    }

    /// An array of `shape` and `dtype` received from rank `src` (lazy).
    #[track_caller]
    pub fn recv(&self, shape: &[i32], dtype: Dtype, src: usize) -> Result<Array, MlxError> {
        self.op(|res, s| unsafe { mlx_sys::mlx_distributed_recv(res, shape.as_ptr(), shape.len(), dtype as mlx_sys::mlx_dtype, src as i32, self.raw, s) })
    }

    #[track_caller]
    fn op(&self, f: impl FnOnce(*mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> i32) -> Result<Array, MlxError> {
        let stream = Stream::cpu();
        // SAFETY: a fresh empty array the result is written into and the
        // returned Array then owns; the stream and group are live.
        let mut res = unsafe { mlx_sys::mlx_array_new() };
        match guarded_call(|| f(&mut res, stream.as_ptr())) {
            Ok(()) => Ok(unsafe { Array::from_ptr(res) }),
            Err(e) => {
                unsafe { mlx_sys::mlx_array_free(res) };
                Err(e)
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: the handle is freed once.
        unsafe { mlx_sys::mlx_distributed_group_free(self.raw) };
    }
}
