//! Who the client is: its address (the TCP peer, or behind trusted proxies the right-most untrusted address of
//! `X-Forwarded-For`) and the rate-limit key derived from it or from a header or JWT claim.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnet::IpNet;

use crate::limits::Key;

/// The client's address. Only when `peer` is a trusted proxy is `X-Forwarded-For` read, from the right: the
/// first address that is not itself a trusted proxy is the client. A client can prepend anything to the header,
/// but cannot change what the trusted proxies appended, so it cannot pick another client's bucket.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(chain) = forwarded_for else { return peer };
    let mut last_valid = peer;
    for hop in chain.rsplit(',') {
        let Some(ip) = parse_hop(hop) else {
            // Garbage in the chain: everything to its left is unverifiable; the last trusted hop is the client.
            return last_valid;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        last_valid = ip;
    }
    last_valid
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        // "[2001:db8::1]:443" and "192.0.2.1:443" forms
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// The key of an address: IPv4 as is (IPv4-mapped IPv6 is the same client), IPv6 cut to `v6_prefix` bits.
pub fn ip_key(ip: IpAddr, v6_prefix: u8) -> Key {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_ipv6_mapped()),
            None => {
                let bits = u32::from(v6_prefix.clamp(1, 128));
                let mask = u128::MAX << (128 - bits);
                u128::from(v6) & mask
            }
        },
    }
}

/// The key of a header or claim value: a keyed hash (per process, so that outsiders cannot aim collisions),
/// tagged so that it never equals an address key.
pub fn value_key(value: &str) -> Key {
    static HASHER: OnceLock<RandomState> = OnceLock::new();
    let h = HASHER.get_or_init(RandomState::new).hash_one(value);
    (0xfeed_u128 << 112) | u128::from(h)
}

/// A claim of the bearer token in `authorization`, read without verifying the signature (the gateway does
/// that). Unverified, a claim is whatever the client wrote: keying by it alone lets a client rotate it for
/// fresh buckets or name someone else's, so routes pair such a zone with a `client_ip` one (see the docs).
/// Strings and numbers only.
pub fn bearer_claim(authorization: Option<&str>, claim: &str) -> Option<String> {
    let token = authorization?.strip_prefix("Bearer ").or_else(|| authorization?.strip_prefix("bearer "))?;
    let payload = token.trim().split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match json.get(claim)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("203.0.113.9"), Some("198.51.100.1"), &trusted), ip("203.0.113.9"));
        assert_eq!(client_ip(ip("203.0.113.9"), None, &[]), ip("203.0.113.9"));
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client spoofed "1.1.1.1"; the proxy appended the real address.
        assert_eq!(client_ip(ip("10.0.0.5"), Some("1.1.1.1, 198.51.100.7"), &trusted), ip("198.51.100.7"));
        // Two trusted hops.
        assert_eq!(client_ip(ip("10.0.0.5"), Some("198.51.100.7, 10.1.1.1"), &trusted), ip("198.51.100.7"));
        // Only trusted hops: the left-most is as far as we can see.
        assert_eq!(client_ip(ip("10.0.0.5"), Some("10.2.2.2"), &trusted), ip("10.2.2.2"));
        // Garbage stops the walk.
        assert_eq!(client_ip(ip("10.0.0.5"), Some("198.51.100.7, junk, 10.1.1.1"), &trusted), ip("10.1.1.1"));
        assert_eq!(client_ip(ip("10.0.0.5"), Some("[2001:db8::7]:443"), &trusted), ip("2001:db8::7"));
        assert_eq!(client_ip(ip("10.0.0.5"), None, &trusted), ip("10.0.0.5"));
    }

    #[test]
    fn ipv6_clients_share_their_prefix() {
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1"), 64), ip_key(ip("2001:db8:1:2:bbbb::9"), 64));
        assert_ne!(ip_key(ip("2001:db8:1:2::1"), 64), ip_key(ip("2001:db8:1:3::1"), 64));
        assert_ne!(ip_key(ip("2001:db8:1:2::1"), 128), ip_key(ip("2001:db8:1:2::2"), 128));
        assert_eq!(ip_key(ip("192.0.2.1"), 64), ip_key(ip("::ffff:192.0.2.1"), 64));
        assert_ne!(ip_key(ip("192.0.2.1"), 64), ip_key(ip("192.0.2.2"), 64));
    }

    #[test]
    fn claims_are_read_from_the_payload() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","n":7,"o":{}}"#);
        let auth = format!("Bearer h.{payload}.s");
        assert_eq!(bearer_claim(Some(&auth), "sub").as_deref(), Some("alice"));
        assert_eq!(bearer_claim(Some(&auth), "n").as_deref(), Some("7"));
        assert_eq!(bearer_claim(Some(&auth), "o"), None);
        assert_eq!(bearer_claim(Some("Bearer garbage"), "sub"), None);
        assert_eq!(bearer_claim(None, "sub"), None);
        assert_ne!(value_key("alice"), value_key("bob"));
        assert_eq!(value_key("alice"), value_key("alice"));
    }
}
