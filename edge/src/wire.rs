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
    // Most strings need no escape: checked, then copied whole.
    if !any_needs_escape(bytes) {
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

/// A JSON string of text that needs no escape by where it comes from (a method token, an address written by us,
/// a label of ours): quoted and copied, without the check (checked in debug builds).
pub fn write_plain(out: &mut Vec<u8>, s: &str) {
    debug_assert!(!s.bytes().any(needs_escape), "{s:?} needs escapes");
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    // Without short-circuits: branch-free, so that a block of them becomes vector compares.
    (b < 0x20) | (b == b'"') | (b == b'\\')
}

/// Whether any byte of `bytes` needs an escape: 16 bytes at a time without an early exit inside a block (the
/// compiler checks a block in a few vector instructions), the rest one at a time. Byte by byte, the ~60 bytes of
/// an access line's strings took ~5 instructions each.
fn any_needs_escape(bytes: &[u8]) -> bool {
    let (blocks, rest) = bytes.as_chunks::<16>();
    blocks.iter().any(|block| block.iter().fold(false, |any, &b| any | needs_escape(b)))
        || rest.iter().any(|&b| needs_escape(b))
}

/// `n` in decimal (`itoa`: two digits per step; the digit-at-a-time loop this replaced was ~2,000 instructions of
/// the edge's work per request over the access log's and `RateLimit` header's numbers).
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    // Most numbers on the hot path have one to three digits (a status, a small body, a count, milliseconds):
    // written in place, without the variable-length copy out of itoa's buffer.
    let digit = |d: u64| b'0' + (d % 10) as u8;
    match n {
        0..10 => out.push(digit(n)),
        10..100 => out.extend_from_slice(&[digit(n / 10), digit(n)]),
        100..1000 => out.extend_from_slice(&[digit(n / 100), digit(n / 10), digit(n)]),
        _ => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
    }
}

/// A header value made of `parts` laid end to end, in one allocation of its exact size: `bytes::Bytes` takes a
/// vector as it is only when it has no room to spare, and allocates a second block otherwise. `None` when the
/// text is not a valid header value.
pub fn header_value(parts: &[&[u8]]) -> Option<http::HeaderValue> {
    let mut text = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        text.extend_from_slice(part);
    }
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
}

/// An address as `Display` writes it (IPv4 dotted quad without the formatting machinery; IPv6 through it).
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    out.extend_from_slice(IpText::new(ip).as_bytes());
}

/// An address's text as `Display` writes it, on the stack: for a caller that needs its length before it
/// allocates (see [`header_value`]).
pub struct IpText {
    text: [u8; 46],
    len: usize,
}

impl IpText {
    pub fn new(ip: IpAddr) -> Self {
        let mut text = [0u8; 46];
        let mut len = 0;
        match ip {
            IpAddr::V4(v4) => {
                // A number written at a time through `Display` cost ~250 instructions an address.
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
            }
            IpAddr::V6(v6) => {
                // At most 45 bytes (INET6_ADDRSTRLEN less its NUL): always fits.
                let mut rest = &mut text[..];
                let _ = write!(rest, "{v6}");
                len = 46 - rest.len();
            }
        }
        Self { text, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
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
            // An escape in a 16-byte block (first, inside, last byte), and in the rest after whole blocks.
            "\"23456789abcdef0123456789",
            "0123\\56789abcdef0123456789",
            "0123456789abcde\n",
            "0123456789abcdef0123456789abcde\u{1f}",
            "0123456789abcdef0123456789abcdef\"",
            "0123456789abcdef",
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
    fn plain_text_is_quoted_as_is() {
        let mut out = Vec::new();
        write_plain(&mut out, "10.0.0.7:8080");
        assert_eq!(out, b"\"10.0.0.7:8080\"");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "needs escapes")]
    fn plain_text_that_needs_escapes_is_a_bug_caught_in_debug_builds() {
        write_plain(&mut Vec::new(), "a \"quoted\" word");
    }

    #[test]
    fn numbers_and_ip_addresses_read_as_display_writes_them() {
        for n in [0, 7, 9, 10, 11, 99, 100, 101, 110, 999, 1000, 65_535, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        let longest = ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:255.255.255.255", "1:2:3:4:5:6:7:8"];
        for ip in ["0.0.0.0", "255.255.255.255", "10.20.3.4", "100.9.10.199", "2001:db8::1", "::ffff:1.2.3.4"]
            .into_iter()
            .chain(longest)
        {
            let ip: IpAddr = ip.parse().expect("ip");
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }
}
