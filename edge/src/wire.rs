//! Numbers, addresses and JSON strings written as bytes on the hot path (ids in hex:
//! `service_core::telemetry::write_hex`), without the formatting machinery
//! (`format!` and `Display` cost several hundred instructions per value; these a few dozen). Each writes exactly
//! what `Display` would (tests compare them).

use std::io::Write as _;
use std::net::IpAddr;

/// A JSON string: quoted, with `"`, `\` and control characters escaped (everything else, UTF-8 included, as is).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Most strings need no escape: checked without an early exit (the compiler checks many bytes at a time), then
    // copied whole.
    if !bytes.iter().fold(false, |any, &b| any | needs_escape(b)) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// `n` in decimal (`itoa`: two digits per step; the digit-at-a-time loop this replaced was ~2,000 instructions of
/// the edge's work per request over the access log's and `RateLimit` header's numbers).
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// An address as `Display` writes it (IPv4 dotted quad without the formatting machinery; IPv6 through it).
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            // Into a stack buffer, one copy out (three addresses per request: a number written at a time cost
            // ~250 instructions an address).
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    text[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    text[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                text[len] = b'0' + octet % 10;
                len += 1;
            }
            out.extend_from_slice(&text[..len]);
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ipv4_octet_reads_as_display_writes_it() {
        for octet in 0..=255u8 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::new(octet, 0, 255 - octet, octet / 3));
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }

    #[test]
    fn strings_read_back_as_they_were() {
        let long_clean = "/v1/orders/0123456789abcdef0123456789abcdef?page=2&size=50";
        let cases = [
            "",
            "GET",
            long_clean,
            "a \"quoted\" word",
            "back\\slash",
            "tab\tnew\nline\rcr",
            "\u{1}\u{8}\u{c}\u{1f} controls",
            "ünïcödé ✓ stays as is",
            "a long clean prefix of more than thirty-two bytes, then a quote: \"",
        ];
        for s in cases {
            let mut out = Vec::new();
            write_str(&mut out, s);
            let back: String = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert_eq!(back, s);
            // Nothing escaped that needs none.
            if !s.bytes().any(needs_escape) {
                assert_eq!(out.len(), s.len() + 2, "{s:?}");
            }
        }
    }

    #[test]
    fn numbers_and_ip_addresses_read_as_display_writes_them() {
        for n in [0, 7, 10, 99, 1000, 65_535, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for ip in ["0.0.0.0", "255.255.255.255", "10.20.3.4", "100.9.10.199", "2001:db8::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }
}
