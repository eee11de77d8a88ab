//! OpenSSL's allocations through mimalloc, the allocator of the rest of the process (the bare proxy in
//! `loadtest/bare-proxy` includes this file too).

use std::ffi::{c_char, c_int, c_void};

unsafe extern "C" {
    // OpenSSL 3 (`crypto/mem.c`), statically linked; not declared by openssl-sys.
    fn CRYPTO_set_mem_functions(
        malloc: Option<unsafe extern "C" fn(usize, *const c_char, c_int) -> *mut c_void>,
        realloc: Option<unsafe extern "C" fn(*mut c_void, usize, *const c_char, c_int) -> *mut c_void>,
        free: Option<unsafe extern "C" fn(*mut c_void, *const c_char, c_int)>,
    ) -> c_int;
}

// As OpenSSL's own functions behave: no block for a zero size, and a reallocation to zero frees.
unsafe extern "C" fn malloc(size: usize, _: *const c_char, _: c_int) -> *mut c_void {
    if size == 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: mi_malloc has no preconditions.
    unsafe { libmimalloc_sys::mi_malloc(size) }
}

unsafe extern "C" fn realloc(block: *mut c_void, size: usize, _: *const c_char, _: c_int) -> *mut c_void {
    // SAFETY: OpenSSL hands back only null or blocks these functions returned.
    unsafe {
        if size == 0 {
            libmimalloc_sys::mi_free(block);
            return std::ptr::null_mut();
        }
        libmimalloc_sys::mi_realloc(block, size)
    }
}

unsafe extern "C" fn free(block: *mut c_void, _: *const c_char, _: c_int) {
    // SAFETY: as for `realloc`.
    unsafe { libmimalloc_sys::mi_free(block) }
}

/// Routes OpenSSL's allocations to mimalloc; false when OpenSSL has allocated through glibc's malloc already (it
/// then keeps it, and nothing changes). Call first thing in `main`.
///
/// # Safety
/// No other thread may exist yet: OpenSSL keeps its allocator in plain statics, and a thread inside
/// `CRYPTO_malloc` while they change could hand a glibc block to mimalloc's free. (OpenSSL's refusal after its
/// first allocation does not cover an aligned allocation made first; its own initialisation always makes a plain
/// one first.)
pub unsafe fn use_mimalloc() -> bool {
    // SAFETY: the three functions match OpenSSL's prototypes and stay valid for the process's life; the caller
    // guarantees that no other thread is in OpenSSL.
    unsafe { CRYPTO_set_mem_functions(Some(malloc), Some(realloc), Some(free)) == 1 }
}
