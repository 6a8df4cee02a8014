//! The one place in kvserve that says `unsafe`.
//!
//! mlx-rs covers most of MLX; where kvserve calls mlx-c or the C library
//! directly, the call goes through [`guarded`] (or a function here built on it)
//! so an MLX failure comes back as [`MlxError`] carrying MLX's own message and
//! the caller's location, never as an abort.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::Location;
use std::sync::Once;

use super::MlxError;

thread_local! {
    /// The newest MLX error message raised on this thread by a guarded call.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

extern "C" {
    /// mlx-rs's own handler (exported with #[no_mangle]); ours forwards to it so
    /// mlx-rs keeps reporting its errors.
    fn default_mlx_error_handler(msg: *const c_char, data: *mut c_void);
}

extern "C" fn chained_error_handler(msg: *const c_char, data: *mut c_void) {
    if !msg.is_null() {
        // SAFETY: MLX passes a NUL-terminated message valid for this call.
        let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
        LAST_ERROR.with(|e| *e.borrow_mut() = Some(text));
    }
    // SAFETY: same contract as the handler MLX would have called.
    unsafe { default_mlx_error_handler(msg, data) };
}

static INSTALL: Once = Once::new();

/// Install the chained error handler after mlx-rs has installed its own (it
/// does so once, on its first guarded call), so neither replaces the other.
fn install_handler() {
    INSTALL.call_once(|| {
        // Any mlx-rs op registers mlx-rs's handler first.
        let _ = mlx_rs::memory::active_memory();
        // SAFETY: the handler is a plain extern "C" fn with no captured state.
        unsafe { mlx_sys::mlx_set_error_handler(Some(chained_error_handler), std::ptr::null_mut(), None) };
    });
}

/// Run one raw mlx-c call that returns a status (0 = success) and turn a
/// failure into [`MlxError`] with MLX's message.
///
/// # Safety contract (upheld by the callers in this file)
/// `f` must only pass valid, live MLX handles and pointers to mlx-c.
#[track_caller]
fn guarded(f: impl FnOnce() -> c_int) -> Result<(), MlxError> {
    install_handler();
    LAST_ERROR.with(|e| e.borrow_mut().take());
    let status = f();
    if status == 0 {
        return Ok(());
    }
    let message = LAST_ERROR
        .with(|e| e.borrow_mut().take())
        .unwrap_or_else(|| format!("MLX call failed with status {status}"));
    Err(MlxError { message, location: Location::caller() })
}

/// [`guarded`] for the other raw mlx-c callers of this module (distributed).
#[track_caller]
pub(super) fn guarded_call(f: impl FnOnce() -> c_int) -> Result<(), MlxError> {
    guarded(f)
}

/// The MLX library version, as MLX reports it (e.g. "0.32.2").
#[track_caller]
pub fn mlx_version() -> Result<String, MlxError> {
    // SAFETY: mlx_string_new returns an empty handle we own and free below.
    let mut s = unsafe { mlx_sys::mlx_string_new() };
    let result = guarded(|| unsafe { mlx_sys::mlx_version(&mut s) }).map(|()| {
        // SAFETY: on success `s` holds a NUL-terminated string owned by `s`.
        let data = unsafe { mlx_sys::mlx_string_data(s) };
        if data.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(data) }.to_string_lossy().into_owned()
        }
    });
    // SAFETY: `s` was created above and is freed exactly once.
    unsafe { mlx_sys::mlx_string_free(s) };
    result
}

/// Runs `f` on the evaluated float32 data of `a` and lets it change that data
/// in place (a softmax written in Rust over a matmul's scores, say).
///
/// # Safety
/// `a` must be a fresh result that owns its buffer alone, such as a matmul
/// output no other array has seen: MLX cannot tell whether another array
/// shares the buffer, and one that did would see the change. (Non-f32 and
/// non-row-contiguous arrays are refused with an error.) Only
/// [`super::matmul_in_place`] calls it, on the product it has just made.
#[track_caller]
pub(super) unsafe fn with_f32_data_mut<R>(a: &mlx_rs::Array, f: impl FnOnce(&mut [f32]) -> R) -> Result<R, MlxError> {
    let refuse = |why: String| Err(MlxError { message: why, location: Location::caller() });
    a.eval()?;
    if a.dtype() != mlx_rs::Dtype::Float32 {
        return refuse(format!("in-place data access needs float32, not {:?}", a.dtype()));
    }
    let shape = a.shape();
    // SAFETY: `a` is a live, evaluated array; mlx-c returns `ndim` strides.
    let strides = unsafe { std::slice::from_raw_parts(mlx_sys::mlx_array_strides(a.as_ptr()), shape.len()) };
    let mut expect = 1usize;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim > 1 && stride != expect {
            return refuse(format!("in-place data access needs a row-contiguous array (shape {shape:?}, strides {strides:?})"));
        }
        expect *= dim as usize;
    }
    // SAFETY: as above; the pointer is to the array's own evaluated data.
    let ptr = unsafe { mlx_sys::mlx_array_data_float32(a.as_ptr()) } as *mut f32;
    if ptr.is_null() {
        return refuse("MLX returned no data for an evaluated array".into());
    }
    // SAFETY: `expect` elements, contiguous (checked above), live while `a` is
    // borrowed; exclusive by this function's contract (a fresh result).
    let data = unsafe { std::slice::from_raw_parts_mut(ptr, expect) };
    Ok(f(data))
}

/// Frees the `Vec<f32>` behind an array made by [`array_from_vec`].
extern "C" fn drop_f32_vec(payload: *mut c_void) {
    // SAFETY: `payload` is the `Box<Vec<f32>>` leaked by `array_from_vec`;
    // MLX calls this once, when the array's buffer is released.
    drop(unsafe { Box::from_raw(payload as *mut Vec<f32>) });
}

/// An f32 array of `shape` over `data` without copying it: MLX reads the
/// vector's buffer in place and frees the vector when the array's buffer
/// is released (for a dequantized weight matrix, a copy would cost as much
/// as making it).
#[track_caller]
pub(super) fn array_from_vec(data: Vec<f32>, shape: &[i32]) -> Result<mlx_rs::Array, MlxError> {
    let n: i64 = shape.iter().map(|&d| d as i64).product();
    if shape.iter().any(|&d| d < 0) || n != data.len() as i64 {
        return Err(MlxError { message: format!("{} values for shape {shape:?}", data.len()), location: Location::caller() });
    }
    let mut boxed = Box::new(data);
    let ptr = boxed.as_mut_ptr() as *mut c_void;
    let payload = Box::into_raw(boxed) as *mut c_void;
    // SAFETY: `ptr` is the vector's buffer of `n` f32 values, alive until MLX
    // calls `drop_f32_vec(payload)`; the vector is not touched meanwhile (it
    // is owned by the leaked box). `shape` outlives the call.
    let raw = unsafe {
        mlx_sys::mlx_array_new_data_managed_payload(
            ptr,
            shape.as_ptr(),
            shape.len() as c_int,
            mlx_sys::mlx_dtype__MLX_FLOAT32,
            payload,
            Some(drop_f32_vec),
        )
    };
    if raw.ctx.is_null() {
        // SAFETY: MLX did not take the payload.
        drop(unsafe { Box::from_raw(payload as *mut Vec<f32>) });
        return Err(MlxError { message: "MLX could not make an array over the buffer".into(), location: Location::caller() });
    }
    // SAFETY: a fresh mlx_array the Array now owns (and frees).
    Ok(unsafe { mlx_rs::Array::from_ptr(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_matches_the_pin() {
        let pins = include_str!("../../vendor/pins.env");
        let pinned = pins
            .lines()
            .find_map(|l| l.strip_prefix("MLX_VERSION="))
            .expect("pins.env has MLX_VERSION");
        assert_eq!(mlx_version().unwrap(), pinned.trim());
    }

    #[test]
    fn raw_call_failure_is_an_err_with_mlx_message() {
        let a = mlx_rs::Array::from_slice(&[1.0f32; 6], &[2, 3]);
        let b = mlx_rs::Array::from_slice(&[1.0f32; 8], &[4, 2]);
        let stream = mlx_rs::Stream::default();
        // SAFETY: valid live handles; the result handle is freed below.
        let mut res = unsafe { mlx_sys::mlx_array_new() };
        let err = guarded(|| unsafe {
            mlx_sys::mlx_matmul(&mut res, a.as_ptr(), b.as_ptr(), stream.as_ptr())
        })
        .unwrap_err();
        unsafe { mlx_sys::mlx_array_free(res) };
        assert!(err.message.contains("matmul"), "message: {}", err.message);
        assert!(err.message.contains("(2,3)") || err.message.contains("shape"), "message: {}", err.message);
        assert!(err.location.file().ends_with("ffi.rs"));
    }
}

/// The default device's type (`"cpu"` or `"gpu"`) and MLX's description of
/// it: `device_name`, `architecture`, memory sizes and whatever else the
/// backend reports, as (key, value) pairs in MLX's order.
#[track_caller]
pub fn default_device_info() -> Result<(String, Vec<(String, String)>), MlxError> {
    // SAFETY: every handle is created here, passed to mlx-c while live and
    // freed exactly once below; strings MLX returns are read before freeing.
    unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        let mut info = mlx_sys::mlx_device_info_new();
        let mut keys = mlx_sys::mlx_vector_string_new();
        let result = (|| {
            guarded(|| mlx_sys::mlx_get_default_device(&mut dev))?;
            let mut kind = mlx_sys::mlx_device_type__MLX_CPU;
            guarded(|| mlx_sys::mlx_device_get_type(&mut kind, dev))?;
            let kind = if kind == mlx_sys::mlx_device_type__MLX_GPU { "gpu" } else { "cpu" }.to_string();
            guarded(|| mlx_sys::mlx_device_info_get(&mut info, dev))?;
            guarded(|| mlx_sys::mlx_device_info_get_keys(&mut keys, info))?;
            let mut pairs = Vec::new();
            for i in 0..mlx_sys::mlx_vector_string_size(keys) {
                let mut key: *mut std::os::raw::c_char = std::ptr::null_mut();
                guarded(|| mlx_sys::mlx_vector_string_get(&mut key, keys, i))?;
                if key.is_null() {
                    continue;
                }
                let name = CStr::from_ptr(key).to_string_lossy().into_owned();
                let mut is_string = false;
                guarded(|| mlx_sys::mlx_device_info_is_string(&mut is_string, info, key))?;
                let value = if is_string {
                    let mut v: *const std::os::raw::c_char = std::ptr::null();
                    guarded(|| mlx_sys::mlx_device_info_get_string(&mut v, info, key))?;
                    if v.is_null() { String::new() } else { CStr::from_ptr(v).to_string_lossy().into_owned() }
                } else {
                    let mut v: usize = 0;
                    guarded(|| mlx_sys::mlx_device_info_get_size(&mut v, info, key))?;
                    v.to_string()
                };
                pairs.push((name, value));
            }
            Ok((kind, pairs))
        })();
        mlx_sys::mlx_vector_string_free(keys);
        mlx_sys::mlx_device_info_free(info);
        mlx_sys::mlx_device_free(dev);
        result
    }
}
