//! Numbers, addresses and JSON strings written as bytes on the hot path (ids in hex:
//! `service_core::telemetry::write_hex`), without the formatting machinery
//! (`format!` and `Display` cost several hundred instructions per value; these a few dozen). Each writes exactly
//! what `Display` would (tests compare them).

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

/// A JSON string: quoted, with `"`, `\` and control characters escaped (everything else, UTF-8 included, as is).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b >= 0x20 && b != b'"' && b != b'\\' {
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

/// `n` in decimal.
pub fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// An address as `Display` writes it (IPv4 dotted quad without the formatting machinery; IPv6 through it).
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            for (i, octet) in [a, b, c, d].into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                write_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A socket address as `Display` writes it (`1.2.3.4:80`, `[::1]:80`).
pub fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            write_ip(out, IpAddr::V4(*v4.ip()));
            out.push(b':');
            write_u64(out, u64::from(v4.port()));
        }
        SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_addresses_read_as_display_writes_them() {
        for n in [0, 7, 10, 99, 1000, 65_535, u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for ip in ["0.0.0.0", "255.255.255.255", "10.20.3.4", "2001:db8::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().expect("ip");
            let mut out = Vec::new();
            write_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
        for addr in ["127.0.0.1:1", "[2001:db8::1]:8443"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            let mut out = Vec::new();
            write_addr(&mut out, addr);
            assert_eq!(out, addr.to_string().as_bytes());
        }
    }
}
