//! Rate-limit policies: what `policies/*.toml` say, validated once into a [`Policy`].
//!
//! A policy names zones (how a request is keyed, rate, burst, mode, rejection status, dry-run, size), routes (a
//! path prefix and methods, and the zones they apply, in order) and exempt networks, plus how the client's
//! address is found (trusted proxies, IPv6 prefix). Every error names the file, the line and column, what is
//! wrong and what was expected; `edge check` prints them without starting anything.

mod file;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;

use crate::limits::algorithm::Params;

pub use file::load_dir;

/// How a zone keys requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// The client's address (IPv6 aggregated to the configured prefix).
    ClientIp,
    /// The value of a request header (requests without it are keyed by client address).
    Header(String),
    /// A claim of the bearer JWT, read without verification (the gateway verifies); falls back to the address.
    Claim(String),
}

/// One zone, as the policy defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSpec {
    /// Shared, not copied, by every metric and header that names the zone.
    pub name: Arc<str>,
    pub key: KeySource,
    pub params: Params,
    /// The rate as written, for headers and logs (e.g. `1r/s`).
    pub rate_text: String,
    pub burst: u64,
    pub status: u16,
    pub dry_run: bool,
    pub max_keys: usize,
}

impl ZoneSpec {
    /// Whether a zone rebuilt from `other` can keep this zone's buckets (same keying and arithmetic).
    pub fn same_state_as(&self, other: &ZoneSpec) -> bool {
        self.name == other.name
            && self.key == other.key
            && self.params == other.params
            && self.max_keys == other.max_keys
    }
}

/// A route: requests whose path starts with `path_prefix` (longest prefix wins) and whose method is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Shared, not copied, by every request's metrics.
    pub name: Arc<str>,
    pub path_prefix: String,
    /// Upper-case methods; empty means every method.
    pub methods: Vec<String>,
    /// Indices into [`Policy::zones`], applied in this order.
    pub zones: Vec<usize>,
}

/// How the client's address is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSpec {
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// IPv6 clients are keyed by this prefix length (a host owns a whole /64).
    pub ipv6_prefix: u8,
}

impl Default for ClientSpec {
    fn default() -> Self {
        Self { trusted_proxies: Vec::new(), ipv6_prefix: 64 }
    }
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub zones: Vec<ZoneSpec>,
    pub routes: Vec<Route>,
    pub exempt: Vec<IpNet>,
    pub client: ClientSpec,
    /// The files it came from.
    pub files: Vec<PathBuf>,
}

impl Policy {
    /// The route for `method` and `path`: the longest matching prefix among routes that allow the method.
    pub fn route(&self, method: &str, path: &str) -> Option<&Route> {
        self.route_index(method, path).map(|i| &self.routes[i])
    }

    /// The `RateLimit-Policy` header of a route (IETF httpapi draft): every zone it applies, except dry-run ones,
    /// as `"name";q=quota;w=window` where a zone of rate r and burst b allows q = b + 1 requests in w = q / r
    /// seconds. `None` when no zone applies. It depends on the policy only, so the limiter makes it once per load.
    pub fn rate_limit_policy(&self, route: &Route) -> Option<String> {
        let mut text = String::new();
        for spec in route.zones.iter().map(|&i| &self.zones[i]).filter(|spec| !spec.dry_run) {
            let quota = spec.burst + 1;
            let window = (quota * 1_000_000).div_ceil(spec.params.rate * 1000).max(1);
            let sep = if text.is_empty() { "" } else { ", " };
            text.push_str(&format!("{sep}\"{}\";q={quota};w={window}", spec.name));
        }
        (!text.is_empty()).then_some(text)
    }

    /// The index in `routes` of the route for `method` and `path`: the longest matching prefix.
    pub fn route_index(&self, method: &str, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| path.starts_with(&r.path_prefix))
            .filter(|(_, r)| r.methods.is_empty() || r.methods.iter().any(|m| m == method))
            .max_by_key(|(_, r)| r.path_prefix.len())
            .map(|(i, _)| i)
    }

    pub fn is_exempt(&self, ip: std::net::IpAddr) -> bool {
        self.exempt.iter().any(|n| n.contains(&ip))
    }
}

/// One problem in a policy file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)
        }
    }
}

/// All problems found in a set of policy files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl PolicyErrors {
    pub(crate) fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        Self(vec![PolicyError { file: file.to_path_buf(), line: 0, column: 0, message: message.into() }])
    }
}
