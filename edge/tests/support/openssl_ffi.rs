//! OpenSSL's allocator functions and mimalloc's heap check, for the tests of `edge::openssl_alloc` (each its own
//! test binary, so that nothing else touches OpenSSL first).

use std::ffi::{c_char, c_int, c_void};

unsafe extern "C" {
    pub fn CRYPTO_malloc(size: usize, file: *const c_char, line: c_int) -> *mut c_void;
    #[allow(dead_code)] // used by one of the two test binaries
    pub fn CRYPTO_realloc(block: *mut c_void, size: usize, file: *const c_char, line: c_int) -> *mut c_void;
    pub fn CRYPTO_free(block: *mut c_void, file: *const c_char, line: c_int);
}

pub use libmimalloc_sys::mi_is_in_heap_region;
