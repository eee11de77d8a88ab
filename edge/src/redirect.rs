//! The plain-HTTP listener that only sends clients to HTTPS: `301` for GET and HEAD, `308` for other methods
//! (so that a client repeats the same method), `Location: https://{host}[:port]{path}?{query}`. A request without
//! a usable `Host` gets `400`: the edge never redirects to a host it made up.

use async_trait::async_trait;
use http::{Response, StatusCode, header};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

pub struct Redirect {
    /// The public HTTPS port, when not 443.
    pub https_port: Option<u16>,
}

impl Redirect {
    /// Where `host` (a `Host` header) and `path_and_query` go, or `None` when the host is not a plain authority.
    pub fn location(&self, host: &str, path_and_query: &str) -> Option<String> {
        let authority: http::uri::Authority = host.parse().ok()?;
        if authority.as_str().contains('@') {
            return None; // userinfo is not a host
        }
        let name = authority.host();
        let port = match self.https_port {
            Some(p) if p != 443 => format!(":{p}"),
            _ => String::new(),
        };
        let path = if path_and_query.starts_with('/') { path_and_query } else { "/" };
        Some(format!("https://{name}{port}{path}"))
    }
}

fn answer(status: StatusCode, location: Option<&str>, text: &str) -> Response<Vec<u8>> {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, text.len())
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(l) = location {
        b = b.header(header::LOCATION, l);
    }
    b.body(text.as_bytes().to_vec()).unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for Redirect {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()));
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let status = if matches!(req.method, http::Method::GET | http::Method::HEAD) {
            StatusCode::MOVED_PERMANENTLY
        } else {
            StatusCode::PERMANENT_REDIRECT
        };
        match host.and_then(|h| self.location(h, path)) {
            Some(location) => answer(status, Some(&location), "use HTTPS\n"),
            None => answer(StatusCode::BAD_REQUEST, None, "a Host header is required\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_keep_host_path_and_query_and_name_the_https_port() {
        let standard = Redirect { https_port: None };
        assert_eq!(
            standard.location("api.example.com", "/v1/orders?a=1").as_deref(),
            Some("https://api.example.com/v1/orders?a=1")
        );
        assert_eq!(standard.location("api.example.com:80", "/").as_deref(), Some("https://api.example.com/"));
        let custom = Redirect { https_port: Some(8443) };
        assert_eq!(custom.location("127.0.0.1:8080", "/x").as_deref(), Some("https://127.0.0.1:8443/x"));
        assert_eq!(custom.location("[::1]:8080", "/x").as_deref(), Some("https://[::1]:8443/x"));
        assert_eq!(Redirect { https_port: Some(443) }.location("h", "/").as_deref(), Some("https://h/"));
        assert_eq!(standard.location("evil.example/x", "/"), None);
        assert_eq!(standard.location("user@evil.example", "/"), None);
        assert_eq!(standard.location("", "/"), None);
        assert_eq!(standard.location("h", "*").as_deref(), Some("https://h/"));
    }
}
