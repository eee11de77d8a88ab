//! Answers the edge writes itself (rate-limit rejections, upstream failures): problem+json, with the request id
//! and any extra headers, and the connection closed after it.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::prelude::{Result, Session};
use service_core::problem::{self, Problem};

/// Writes `problem` as the whole response.
pub async fn problem(
    session: &mut Session,
    problem: &Problem,
    request_id: &str,
    extra: &[(HeaderName, HeaderValue)],
) -> Result<()> {
    let body = problem.to_body();
    let mut resp = ResponseHeader::build(problem.status, Some(4 + extra.len()))?;
    resp.insert_header("content-type", problem::CONTENT_TYPE)?;
    resp.insert_header("content-length", body.len().to_string())?;
    if !request_id.is_empty() {
        resp.insert_header("x-request-id", request_id)?;
    }
    for (k, v) in extra {
        resp.insert_header(k.clone(), v.clone())?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(Bytes::from(body)), true).await
}
