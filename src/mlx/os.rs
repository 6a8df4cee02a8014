//! The C library calls kvserve makes outside MLX: signals to processes,
//! free disk space, and the dynamic loader's symbol lookup. Each wraps one libc call in a safe
//! function; like [`super::ffi`], this file is a room where `unsafe` is allowed.

use std::ffi::{c_int, CStr, CString};
use std::path::PathBuf;

/// Send `signal` (e.g. `libc::SIGTERM`) to process `pid`; false if it failed.
pub fn send_signal(pid: u32, signal: c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Bytes free to an unprivileged user on the file system holding `path`.
pub fn free_disk_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs reads the NUL-terminated path and writes only into `st`.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Ignore SIGINT in this process (a launcher whose child owns the terminal).
pub fn ignore_interrupt() {
    // SAFETY: installing SIG_IGN for SIGINT has no memory effects.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// Which shared object the process's global symbol lookup resolves `symbol`
/// to: the library whose code MLX's own calls to it will run. `None` when no
/// loaded object exports it.
pub fn symbol_provider(symbol: &str) -> Option<PathBuf> {
    let name = CString::new(symbol).ok()?;
    // SAFETY: dlsym with RTLD_DEFAULT only reads the loaded objects' tables;
    // dladdr fills `info` with pointers into the loader's static strings.
    unsafe {
        let addr = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
        if addr.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let file = CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned();
        Some(std::fs::canonicalize(&file).unwrap_or_else(|_| PathBuf::from(file)))
    }
}

/// End the process now with `code`, running no atexit handlers or static
/// destructors (the caller has flushed what it wrote).
pub fn exit_immediately(code: i32) -> ! {
    // SAFETY: _exit takes no pointers and does not return.
    unsafe { libc::_exit(code) }
}

/// The ids of this process's threads (Linux; empty elsewhere).
pub fn thread_ids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The calling thread's id (Linux; 0 elsewhere).
pub fn this_thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid takes nothing and cannot fail.
        unsafe { libc::gettid() }
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// Put thread `tid` of this process in Linux's idle scheduling class (see
/// [`make_this_thread_idle`]); false where that is not possible.
pub fn make_thread_idle(tid: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads `param` only; `tid` names one thread.
        unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = tid;
        false
    }
}

/// Puts the calling thread in Linux's idle scheduling class (`SCHED_IDLE`):
/// it runs only on a core nothing else wants, so background work (writing
/// snapshot files: hashing and copying hundreds of MB) never delays the
/// engine. Returns whether it took effect (false elsewhere than Linux).
pub fn make_this_thread_idle() -> bool {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads `param` only; pid 0 is the calling thread.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// `cblas_sgemm`'s C signature (CBLAS enums as ints).
type SgemmFn = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

/// The process's `cblas_sgemm` (OpenBLAS, linked ahead of the wheel's netlib
/// BLAS; MLX's own products call the same one), looked up once.
fn sgemm_symbol() -> Option<SgemmFn> {
    static SYM: std::sync::OnceLock<Option<SgemmFn>> = std::sync::OnceLock::new();
    *SYM.get_or_init(|| {
        let name = CString::new("cblas_sgemm").ok()?;
        // SAFETY: dlsym with RTLD_DEFAULT only reads the loaded objects' tables.
        let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if addr.is_null() {
            return None;
        }
        // SAFETY: every CBLAS exports cblas_sgemm with this signature.
        Some(unsafe { std::mem::transmute::<*mut libc::c_void, SgemmFn>(addr) })
    })
}

/// Whether [`sgemm_nt`] can run (a CBLAS is loaded).
pub fn has_sgemm() -> bool {
    sgemm_symbol().is_some()
}

/// `c[i][ldc-strided j] = sum_k a[i][k] * b[j][k]` for row-major `a: [m, k]`
/// (row stride `k`), `b: [n, k]` (row stride `k`) and `c` rows of stride
/// `ldc >= n`: one BLAS product `A B^T`. False (nothing written) when no
/// CBLAS is loaded or a slice is too short for the sizes.
pub fn sgemm_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize) -> bool {
    let Some(f) = sgemm_symbol() else { return false };
    if m == 0 || n == 0 {
        return true;
    }
    let fits = |x: usize| c_int::try_from(x).is_ok();
    if !(fits(m) && fits(n) && fits(k) && fits(ldc)) || ldc < n || k == 0 {
        return false;
    }
    if a.len() < m * k || b.len() < n * k || c.len() < (m - 1) * ldc + n {
        return false;
    }
    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;
    // SAFETY: the lengths were checked against the sizes and strides above,
    // so BLAS reads and writes only inside the three slices; `c` is borrowed
    // mutably, so nothing else reads it meanwhile.
    unsafe {
        f(ROW_MAJOR, NO_TRANS, TRANS, m as c_int, n as c_int, k as c_int, 1.0, a.as_ptr(), k as c_int, b.as_ptr(), k as c_int, 0.0, c.as_mut_ptr(), ldc as c_int);
    }
    true
}
