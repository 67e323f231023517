//! Requests a browser was made to send: refused before they reach a handler.
//!
//! A web page an operator opens can make the browser send requests to the
//! router (it is often on the operator's network, or on loopback), and DNS
//! rebinding can make such a page look same-origin. The registry changes
//! what the router does with prompts, so:
//!
//! - its JSON routes take only `Content-Type: application/json` (a page can
//!   send `text/plain` without asking the router first; JSON it cannot);
//! - a change to the registry that carries an `Origin` other than the
//!   router's own, or `Sec-Fetch-Site: cross-site`, is refused: agents, the
//!   CLI and scripts send neither;
//! - with `--allowed-hosts`, a request whose `Host` is not one of them is
//!   refused on every route, which defeats rebinding (the rebound name is
//!   not in the list).

use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};

use super::error::ApiError;

/// What the guard checks, fixed at start.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Host names (or addresses) clients may use for the router; empty: any.
    pub allowed_hosts: Vec<String>,
}

/// Made once: looked up by a `&str`, the name would be parsed and checked
/// on every registry change (every heartbeat).
static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Whether a request may reach the routes; the error says why not.
pub fn check(
    policy: &OriginPolicy,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !policy.allowed_hosts.is_empty()
        && !policy
            .allowed_hosts
            .iter()
            .any(|allowed| host_name(host).eq_ignore_ascii_case(allowed))
    {
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "this router answers only to the names in --allowed-hosts, and the request named {:?}: use one of {}",
                host_name(host),
                policy.allowed_hosts.join(", ")
            ),
        ));
    }
    let registry = path == "/api/agents" || path.starts_with("/api/agents/");
    let changes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !(registry && changes) {
        return Ok(());
    }
    let cross_site = headers
        .get(&SEC_FETCH_SITE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    let foreign_origin = headers
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|origin| !same_origin(origin, host));
    if cross_site || foreign_origin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_origin",
            "the registry does not take changes from web pages of other sites (the request carried a \
             foreign Origin): register nodes with llm-router-agent, manage them with the llm-router CLI",
        ));
    }
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        if !is_json(content_type.as_bytes()) {
            return Err(unsupported_media_type());
        }
    }
    Ok(())
}

/// The registry's bodies are JSON; a body sent as anything else is refused
/// (see the JSON extractors, which also refuse a body with no type).
pub fn unsupported_media_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "the body must be JSON, sent with 'Content-Type: application/json'",
    )
}

/// `application/json`, or a `+json` type, with any parameters. Compared in
/// place, without a lowercased copy: every heartbeat asks twice.
pub fn is_json(content_type: &[u8]) -> bool {
    const PREFIX: &[u8] = b"application/";
    const SUFFIX: &[u8] = b"+json";
    // What nearly every client sends, agents included.
    if content_type == b"application/json" {
        return true;
    }
    let Ok(text) = std::str::from_utf8(content_type) else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or_default().trim().as_bytes();
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() >= PREFIX.len() + SUFFIX.len()
            && essence[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
            && essence[essence.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX))
}

/// `Origin` is `scheme://host[:port]`; same-origin when its authority is the
/// request's `Host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !authority.is_empty() && authority.eq_ignore_ascii_case(host)
}

/// The host of a `Host` header, without its port (IPv6 in brackets kept whole).
fn host_name(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    host.rsplit_once(':').map_or(host, |(name, _port)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn registry_changes_from_other_origins_are_refused() {
        let policy = OriginPolicy::default();
        let post = |pairs| {
            check(
                &policy,
                &Method::POST,
                "/api/agents/register",
                &headers(pairs),
            )
        };
        assert!(post(&[
            ("host", "127.0.0.1:8080"),
            ("content-type", "application/json")
        ])
        .is_ok());
        assert!(post(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080")
        ])
        .is_ok());
        for refused in [
            &[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://evil.example"),
            ][..],
            &[("host", "127.0.0.1:8080"), ("origin", "null")],
            &[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")],
            &[("host", "127.0.0.1:8080"), ("content-type", "text/plain")],
        ] {
            assert!(post(refused).is_err(), "{refused:?}");
        }
        // Reads and the LLM routes are not the registry's changes.
        let get = check(
            &policy,
            &Method::GET,
            "/api/agents",
            &headers(&[("origin", "http://evil.example")]),
        );
        assert!(get.is_ok());
        let chat = check(
            &policy,
            &Method::POST,
            "/api/chat",
            &headers(&[("content-type", "text/plain")]),
        );
        assert!(chat.is_ok());
    }

    #[test]
    fn json_types_and_host_names() {
        assert!(is_json(b"application/json"));
        assert!(is_json(b"Application/JSON; charset=utf-8"));
        assert!(is_json(b"application/merge-patch+json"));
        assert!(!is_json(b"text/plain"));
        assert!(!is_json(b"application/x-www-form-urlencoded"));
        assert!(is_json(b"  APPLICATION/VND.API+JSON ;q=1"));
        assert!(is_json(b"application/+json"));
        assert!(!is_json(b"application/jsonx"));
        assert!(!is_json(b"application+json"));
        assert!(!is_json(b"text/+json"));
        assert!(!is_json(b""));
        assert!(!is_json(b"application/\xff+json"));
        assert_eq!(host_name("router.lan:8080"), "router.lan");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("localhost"), "localhost");
    }

    #[test]
    fn allowed_hosts_refuse_other_names_on_every_route() {
        let policy = OriginPolicy {
            allowed_hosts: vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        };
        let on = |host: &'static str, path| {
            check(&policy, &Method::GET, path, &headers(&[("host", host)]))
        };
        assert!(on("localhost:8080", "/api/tags").is_ok());
        assert!(on("127.0.0.1:8080", "/health").is_ok());
        let refused = on("rebound.example:8080", "/api/agents").expect_err("refused");
        assert_eq!(refused.status, StatusCode::MISDIRECTED_REQUEST);
        assert!(refused.message.contains("--allowed-hosts"));
    }
}
