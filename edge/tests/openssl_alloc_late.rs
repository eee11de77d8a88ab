//! Once OpenSSL has allocated through glibc's malloc, `use_mimalloc` refuses (a block from one allocator must not
//! reach the other's free) and OpenSSL stays with glibc's malloc. Its own test binary, as `openssl_alloc.rs`.

#[path = "support/openssl_ffi.rs"]
mod ffi;
use ffi::*;

#[test]
fn the_switch_is_refused_once_openssl_has_allocated() {
    openssl::init(); // OpenSSL sets itself up, allocating through glibc's malloc
    // SAFETY: this test binary's only test; nothing else runs OpenSSL.
    assert!(!unsafe { edge::openssl_alloc::use_mimalloc() }, "OpenSSL allocated already");
    // SAFETY: OpenSSL's allocator functions, used as documented; the block is freed by the allocator it came from.
    unsafe {
        let block = CRYPTO_malloc(100, c"test".as_ptr(), 0);
        assert!(!block.is_null());
        assert!(!mi_is_in_heap_region(block), "OpenSSL still allocates with glibc's malloc");
        CRYPTO_free(block, c"test".as_ptr(), 0);
    }
}
