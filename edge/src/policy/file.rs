//! Reading `*.toml` policy files into a [`Policy`], with every error located (file, line, column).
//!
//! ```toml
//! [client]
//! trusted_proxies = ["10.0.0.0/8"]   # peers whose X-Forwarded-For is believed
//! ipv6_prefix = 64
//!
//! [zones.per_client]
//! key = "client_ip"                  # or "header:X-Api-Key", or "claim:sub"
//! rate = "1r/s"                      # N r/s or N r/m
//! burst = 25
//! mode = "delay"                     # "delay" (nginx's default), "nodelay", or "delay=N"
//! status = 429                       # 400..=599
//! dry_run = false
//! max_keys = 160000
//!
//! [[routes]]
//! name = "api"
//! path_prefix = "/"
//! methods = []                       # empty: all
//! zones = ["per_client"]
//!
//! exempt = ["192.0.2.0/24"]         # top level: never limited
//! ```
//! Several files are merged: zones and routes add up; a zone defined twice, or `[client]` in two files, is an error.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{ClientSpec, KeySource, Policy, PolicyError, PolicyErrors, Route, ZoneSpec};
use crate::limits::algorithm::Params;

/// Default size of a zone: as many keys as nginx keeps in a 10 MB zone.
pub const DEFAULT_MAX_KEYS: usize = 160_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    client: Option<Spanned<RawClient>>,
    #[serde(default)]
    zones: HashMap<String, Spanned<RawZone>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    exempt: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    ipv6_prefix: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    key: Option<Spanned<String>>,
    rate: Spanned<String>,
    burst: Option<Spanned<i64>>,
    mode: Option<Spanned<String>>,
    status: Option<Spanned<i64>>,
    #[serde(default)]
    dry_run: bool,
    max_keys: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    path_prefix: Spanned<String>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    zones: Vec<Spanned<String>>,
}

/// Collects located errors for one file.
struct Located<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Located<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        self.errors.push(PolicyError { file: self.file.to_path_buf(), line, column, message: message.into() });
    }
}

/// Loads and validates every `*.toml` file in `dir`, in name order.
pub fn load_dir(dir: &Path) -> Result<Policy, PolicyErrors> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PolicyErrors::whole_file(dir, format!("cannot read the policy directory: {e}")))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        // Kubernetes mounts a ConfigMap through `..data` symlinks; only the visible names count.
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(PolicyErrors::whole_file(dir, "no *.toml policy file found"));
    }
    let mut sources = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| PolicyErrors::whole_file(f, format!("cannot read: {e}")))?;
        sources.push((f.clone(), text));
    }
    parse(&sources)
}

/// Validates the files' contents (`(path, text)` pairs) into one policy.
pub fn parse(sources: &[(PathBuf, String)]) -> Result<Policy, PolicyErrors> {
    let mut errors = Vec::new();
    let mut policy = Policy { files: sources.iter().map(|(p, _)| p.clone()).collect(), ..Policy::default() };
    let mut client_from: Option<PathBuf> = None;
    // Routes name zones that may come from another file: resolve them once all zones are known.
    let mut pending_routes: Vec<(PathBuf, String, RawRoute, Range<usize>)> = Vec::new();
    let mut zone_origin: HashMap<String, PathBuf> = HashMap::new();

    for (path, text) in sources {
        let raw: RawFile = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let mut loc = Located { file: path, text, errors: Vec::new() };
                loc.error(e.span().unwrap_or(0..0), e.message().to_owned());
                errors.extend(loc.errors);
                continue;
            }
        };
        let mut loc = Located { file: path, text, errors: Vec::new() };
        if let Some(client) = raw.client {
            let span = client.span();
            if let Some(first) = &client_from {
                loc.error(
                    span.clone(),
                    format!("[client] is already set in {}; set it in one file only", first.display()),
                );
            }
            client_from = Some(path.clone());
            policy.client = client_spec(&mut loc, client.into_inner());
        }
        let mut zones: Vec<(String, Spanned<RawZone>)> = raw.zones.into_iter().collect();
        zones.sort_by_key(|(_, z)| z.span().start);
        for (name, zone) in zones {
            let span = zone.span();
            if let Some(first) = zone_origin.get(&name) {
                loc.error(span, format!("zone {name:?} is already defined in {}", first.display()));
                continue;
            }
            if let Some(spec) = zone_spec(&mut loc, &name, zone.into_inner()) {
                zone_origin.insert(name, path.clone());
                policy.zones.push(spec);
            }
        }
        for route in raw.routes {
            let span = route.span();
            pending_routes.push((path.clone(), text.clone(), route.into_inner(), span));
        }
        for net in raw.exempt {
            if let Some(n) = cidr(&mut loc, &net) {
                policy.exempt.push(n);
            }
        }
        errors.extend(loc.errors);
    }

    for (path, text, raw, span) in pending_routes {
        let mut loc = Located { file: &path, text: &text, errors: Vec::new() };
        if let Some(route) = route(&mut loc, &policy.zones, raw, span) {
            policy.routes.push(route);
        }
        errors.extend(loc.errors);
    }
    if errors.is_empty() { Ok(policy) } else { Err(PolicyErrors(errors)) }
}

fn client_spec(loc: &mut Located<'_>, raw: RawClient) -> ClientSpec {
    let mut spec = ClientSpec {
        trusted_proxies: raw.trusted_proxies.iter().filter_map(|n| cidr(loc, n)).collect(),
        ..ClientSpec::default()
    };
    if let Some(p) = raw.ipv6_prefix {
        match u8::try_from(*p.get_ref()) {
            Ok(v) if (1..=128).contains(&v) => spec.ipv6_prefix = v,
            _ => loc.error(p.span(), format!("ipv6_prefix {} is out of range: expected 1..=128", p.get_ref())),
        }
    }
    spec
}

fn cidr(loc: &mut Located<'_>, s: &Spanned<String>) -> Option<IpNet> {
    let text = s.get_ref().trim();
    // A bare address is a single-host network.
    let parsed = text.parse::<IpNet>().or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
    match parsed {
        Ok(n) => Some(n),
        Err(_) => {
            loc.error(
                s.span(),
                format!("{text:?} is not a network: expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32"),
            );
            None
        }
    }
}

fn zone_spec(loc: &mut Located<'_>, name: &str, raw: RawZone) -> Option<ZoneSpec> {
    let before = loc.errors.len();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        loc.error(raw.rate.span(), format!("zone name {name:?} is invalid: expected letters, digits, '_' or '-'"));
    }
    let key = match &raw.key {
        None => KeySource::ClientIp,
        Some(k) => match k.get_ref().split_once(':') {
            None if k.get_ref() == "client_ip" => KeySource::ClientIp,
            Some(("header", h)) if is_token(h) => KeySource::Header(h.to_ascii_lowercase()),
            Some(("claim", c)) if !c.is_empty() => KeySource::Claim(c.to_owned()),
            _ => {
                loc.error(
                    k.span(),
                    format!(
                        "key {:?} is invalid: expected \"client_ip\", \"header:<name>\" or \"claim:<name>\"",
                        k.get_ref()
                    ),
                );
                KeySource::ClientIp
            }
        },
    };
    let (rate, per_secs) = match parse_rate(raw.rate.get_ref()) {
        Some(r) => r,
        None => {
            loc.error(
                raw.rate.span(),
                format!("rate {:?} is invalid: expected \"<N>r/s\" or \"<N>r/m\" with N >= 1", raw.rate.get_ref()),
            );
            (1, 1)
        }
    };
    let burst = match &raw.burst {
        None => 0,
        Some(b) if (0..=1_000_000).contains(b.get_ref()) => *b.get_ref() as u64,
        Some(b) => {
            loc.error(b.span(), format!("burst {} is out of range: expected 0..=1000000", b.get_ref()));
            0
        }
    };
    let delay = match raw.mode.as_ref().map(|m| (m, m.get_ref().trim())) {
        None | Some((_, "delay")) => Some(0),
        Some((_, "nodelay")) => None,
        Some((m, text)) => match text.strip_prefix("delay=").and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => {
                loc.error(
                    m.span(),
                    format!("mode {text:?} is invalid: expected \"delay\", \"nodelay\" or \"delay=<N>\""),
                );
                Some(0)
            }
        },
    };
    let status = match &raw.status {
        None => 429,
        Some(s) if (400..=599).contains(s.get_ref()) => *s.get_ref() as u16,
        Some(s) => {
            loc.error(
                s.span(),
                format!("status {} is invalid: expected an HTTP error status in 400..=599", s.get_ref()),
            );
            429
        }
    };
    let max_keys = match &raw.max_keys {
        None => DEFAULT_MAX_KEYS,
        Some(m) if (64..=100_000_000).contains(m.get_ref()) => *m.get_ref() as usize,
        Some(m) => {
            loc.error(m.span(), format!("max_keys {} is out of range: expected 64..=100000000", m.get_ref()));
            DEFAULT_MAX_KEYS
        }
    };
    (loc.errors.len() == before).then(|| ZoneSpec {
        name: name.into(),
        key,
        params: Params::new(rate, per_secs, burst, delay),
        rate_text: raw.rate.get_ref().trim().to_owned(),
        burst,
        status,
        dry_run: raw.dry_run,
        max_keys,
    })
}

fn route(loc: &mut Located<'_>, zones: &[ZoneSpec], raw: RawRoute, span: Range<usize>) -> Option<Route> {
    let before = loc.errors.len();
    if !raw.path_prefix.get_ref().starts_with('/') {
        loc.error(
            raw.path_prefix.span(),
            format!("path_prefix {:?} is invalid: expected a path starting with '/'", raw.path_prefix.get_ref()),
        );
    }
    let mut methods = Vec::new();
    for m in &raw.methods {
        let upper = m.get_ref().to_ascii_uppercase();
        if is_token(&upper) {
            methods.push(upper);
        } else {
            loc.error(
                m.span(),
                format!("method {:?} is invalid: expected an HTTP method such as \"POST\"", m.get_ref()),
            );
        }
    }
    if raw.zones.is_empty() {
        loc.error(span, "a route must list at least one zone in `zones`");
    }
    let mut indices = Vec::new();
    for z in &raw.zones {
        match zones.iter().position(|spec| *spec.name == **z.get_ref()) {
            Some(i) if indices.contains(&i) => loc
                .error(z.span(), format!("zone {:?} is listed twice: expected each zone once per route", z.get_ref())),
            Some(i) => indices.push(i),
            None => {
                let known: Vec<&str> = zones.iter().map(|s| &*s.name).collect();
                loc.error(z.span(), format!("unknown zone {:?}: expected one of {known:?}", z.get_ref()));
            }
        }
    }
    (loc.errors.len() == before).then(|| Route {
        name: raw.name.unwrap_or_else(|| raw.path_prefix.get_ref().clone()).into(),
        path_prefix: raw.path_prefix.into_inner(),
        methods,
        zones: indices,
    })
}

/// `"<N>r/s"` or `"<N>r/m"`: (requests, per seconds).
fn parse_rate(s: &str) -> Option<(u64, u64)> {
    let s = s.trim();
    let (n, per) = if let Some(n) = s.strip_suffix("r/s") { (n, 1) } else { (s.strip_suffix("r/m")?, 60) };
    let n: u64 = n.trim().parse().ok()?;
    (1..=1_000_000).contains(&n).then_some((n, per))
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<Policy, PolicyErrors> {
        parse(&[(PathBuf::from("p.toml"), text.to_owned())])
    }

    #[test]
    fn the_shipped_default_policy_is_nginx_equivalent() {
        let p = load_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"))).expect("valid");
        let route = p.route("GET", "/anything").expect("a catch-all route");
        let zone = &p.zones[route.zones[0]];
        assert_eq!(zone.key, KeySource::ClientIp);
        assert_eq!(zone.params, Params::new(1, 1, 25, Some(0)));
        assert_eq!(zone.status, 429);
        assert!(!zone.dry_run);
    }

    #[test]
    fn a_full_policy_parses() {
        let p = one(r#"
            exempt = ["192.0.2.0/24", "2001:db8::1"]
            [client]
            trusted_proxies = ["10.0.0.0/8"]
            ipv6_prefix = 56
            [zones.ip]
            rate = "30r/m"
            burst = 5
            mode = "delay=2"
            status = 503
            [zones.user]
            key = "claim:sub"
            rate = "10r/s"
            mode = "nodelay"
            dry_run = true
            [[routes]]
            path_prefix = "/v1/orders"
            methods = ["post"]
            zones = ["ip", "user"]
        "#)
        .expect("valid");
        assert_eq!(p.zones.len(), 2);
        let r = p.route("POST", "/v1/orders/async").expect("route");
        assert_eq!(r.zones.iter().map(|&i| &*p.zones[i].name).collect::<Vec<_>>(), ["ip", "user"]);
        assert!(p.route("GET", "/v1/orders/1").is_none(), "method filtered");
        assert_eq!(p.zones[0].params, Params::new(30, 60, 5, Some(2)));
        assert_eq!(p.zones[1].key, KeySource::Claim("sub".into()));
        assert_eq!(p.client.ipv6_prefix, 56);
        assert!(p.is_exempt("192.0.2.7".parse().expect("ip")));
        assert!(p.is_exempt("2001:db8::1".parse().expect("ip")));
        assert!(!p.is_exempt("198.51.100.1".parse().expect("ip")));
    }

    #[test]
    fn errors_name_the_line_and_what_was_expected() {
        let err = one("[zones.ip]\nrate = \"1r/s\"\nburst = 25\nmode = \"sometimes\"\n").unwrap_err();
        assert_eq!(err.0.len(), 1);
        let e = &err.0[0];
        assert_eq!((e.line, e.column), (4, 8));
        assert!(e.message.contains("mode \"sometimes\"") && e.message.contains("nodelay"), "{e}");
        assert_eq!(e.to_string(), format!("p.toml:4:8: {}", e.message));

        let err =
            one("[zones.ip]\nrate = \"fast\"\n\n[[routes]]\npath_prefix = \"/\"\nzones = [\"nope\"]\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("p.toml:2:8: rate \"fast\" is invalid"), "{text}");
        // The route names a zone that failed to validate: reported too, on its own line.
        assert!(text.contains("p.toml:6:10: unknown zone \"nope\""), "{text}");

        let err = one("[zones.ip]\nrate = \"1r/s\"\nbrust = 3\n").unwrap_err();
        assert!(err.0[0].message.contains("unknown field `brust`"), "{err}");
        assert_eq!(err.0[0].line, 3);

        let err = one("[zones.ip\n").unwrap_err();
        assert_eq!(err.0[0].line, 1, "{err}");

        let err = one("[zones.ip]\nrate = \"1r/s\"\n[[routes]]\npath_prefix = \"/\"\nzones = [\"ip\", \"ip\"]\n")
            .unwrap_err();
        assert!(err.to_string().contains("p.toml:5:16: zone \"ip\" is listed twice"), "{err}");

        let err = one("[zones.ip]\nrate = \"1r/s\"\nstatus = 302\n").unwrap_err();
        assert!(err.0[0].message.contains("400..=599"), "{err}");
    }

    #[test]
    fn files_merge_and_duplicates_are_refused() {
        let a = (PathBuf::from("a.toml"), "[zones.ip]\nrate = \"1r/s\"\n".to_owned());
        let b = (PathBuf::from("b.toml"), "[[routes]]\npath_prefix = \"/\"\nzones = [\"ip\"]\n".to_owned());
        let p = parse(&[a.clone(), b]).expect("zone from a, route from b");
        assert_eq!(p.routes[0].zones, vec![0]);
        let err = parse(&[a.clone(), (PathBuf::from("c.toml"), a.1.clone())]).unwrap_err();
        assert!(err.to_string().starts_with("c.toml:1:1: zone \"ip\" is already defined in a.toml"), "{err}");
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("1r/s"), Some((1, 1)));
        assert_eq!(parse_rate(" 30r/m "), Some((30, 60)));
        assert_eq!(parse_rate("0r/s"), None);
        assert_eq!(parse_rate("1 r/h"), None);
    }
}
