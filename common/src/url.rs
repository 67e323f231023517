//! A router's URL as the agent's and the CLI's `--router-url` take it: the
//! same rules and the same messages in both binaries.

/// Checks a router URL and returns it normalised (scheme added when
/// missing, no trailing slash). Each refusal says what to write instead;
/// clap adds which flag it was.
pub fn parse_router_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (scheme, rest) = text.split_once("://").unwrap_or(("http", text));
    let rest = rest.trim_end_matches('/');
    if text.is_empty() {
        return Err("give the router's address, such as http://ROUTER_HOST:8080".to_owned());
    }
    let with_scheme = format!("{scheme}://{rest}");
    let parsed = ::url::Url::parse(&with_scheme).map_err(|error| match error {
        ::url::ParseError::InvalidPort => {
            "the port must be a number from 1 to 65535, such as http://ROUTER_HOST:8080".to_owned()
        }
        ::url::ParseError::EmptyHost => {
            "the URL names no host: write it as http://ROUTER_HOST:8080".to_owned()
        }
        other => format!("{other}: write it as http://ROUTER_HOST:8080"),
    })?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "{other}:// is not a router URL: use http://ROUTER_HOST:8080, or https:// when the router serves TLS"
            ))
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("the URL names no host: write it as http://ROUTER_HOST:8080".to_owned());
    }
    if parsed.port() == Some(0) {
        return Err(
            "port 0 cannot be connected to: give the router's port, such as 8080".to_owned(),
        );
    }
    Ok(with_scheme)
}

#[cfg(test)]
mod tests {
    use super::parse_router_url;

    #[test]
    fn router_urls_are_normalised_or_refused_with_a_fix() {
        for (given, expected) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
            ("127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("localhost", "http://localhost"),
            (" http://[::1]:8080 ", "http://[::1]:8080"),
            ("https://127.0.0.1:8443/", "https://127.0.0.1:8443"),
        ] {
            assert_eq!(parse_router_url(given).as_deref(), Ok(expected), "{given}");
        }
        for (given, says) in [
            ("http://127.0.0.1:99999", "from 1 to 65535"),
            ("http://127.0.0.1:0", "port 0"),
            ("", "router's address"),
            ("ftp://127.0.0.1", "not a router URL"),
            ("http://", "no host"),
        ] {
            let error = parse_router_url(given).expect_err(given);
            assert!(error.contains(says), "{given}: {error}");
        }
    }
}
