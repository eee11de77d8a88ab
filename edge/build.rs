//! Link settings for the edge's binaries (the bare proxy in `loadtest/bare-proxy` is linked by this script too,
//! so that the benchmark's floor is built as the edge is).

fn main() {
    println!("cargo:rerun-if-env-changed=LINK_PACK_RELOCS");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let wanted = !std::env::var("LINK_PACK_RELOCS").is_ok_and(|v| v == "0");
    if os == "linux" && env == "gnu" && wanted {
        // Relative relocations packed as DT_RELR: a position-independent binary carries one 24-byte record per
        // pointer to fix at load time (46,000-59,000 of them in the edge, 1.06-1.36 MiB, read once at start and
        // then resident for good); packed, 15-18 KiB. Needs glibc 2.36 or later (Debian 12, the image's base); an older one refuses
        // to load the binary, naming the missing `GLIBC_ABI_DT_RELR` version. `LINK_PACK_RELOCS=0` links the
        // usual way: `scripts/pgo-build` does so for the binaries BOLT rewrites (bolt-19 corrupts the dynamic
        // section of a binary with packed relocations).
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
