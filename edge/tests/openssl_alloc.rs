//! OpenSSL's allocations land in mimalloc once `use_mimalloc` ran first (`openssl_alloc_late.rs`: not when
//! OpenSSL allocated before). Its own test binary: nothing else in it touches OpenSSL first.

#[path = "support/openssl_ffi.rs"]
mod ffi;
use ffi::*;

#[test]
fn openssl_allocates_from_mimalloc_once_switched() {
    // SAFETY: this test binary's only test; nothing else runs OpenSSL.
    assert!(unsafe { edge::openssl_alloc::use_mimalloc() }, "nothing allocated through OpenSSL before this test");
    let at = c"test".as_ptr();
    // SAFETY: OpenSSL's allocator functions, used as documented; every block is freed by the same allocator.
    unsafe {
        let block = CRYPTO_malloc(100, at, 0);
        assert!(!block.is_null());
        assert!(mi_is_in_heap_region(block), "OpenSSL's block is not in mimalloc's heap");
        // OpenSSL's own semantics kept: growing keeps the contents; no block for zero bytes; realloc to zero frees.
        block.cast::<u8>().write_bytes(0xab, 100);
        let grown = CRYPTO_realloc(block, 64 * 1024, at, 0);
        assert!(mi_is_in_heap_region(grown));
        assert!(std::slice::from_raw_parts(grown.cast::<u8>(), 100).iter().all(|b| *b == 0xab));
        assert!(CRYPTO_realloc(grown, 0, at, 0).is_null());
        assert!(CRYPTO_malloc(0, at, 0).is_null());
        let fresh = CRYPTO_realloc(std::ptr::null_mut(), 32, at, 0);
        assert!(mi_is_in_heap_region(fresh), "realloc of null allocates");
        CRYPTO_free(fresh, at, 0);
    }
    // A real OpenSSL object round trip through the new functions.
    let key = openssl::ec::EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).expect("curve"),
    )
    .expect("a P-256 key");
    assert!(key.check_key().is_ok());
}
