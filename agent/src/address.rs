//! Where this node's LLM server is: read from `--backend-url`,
//! `LLM_ROUTER_BACKEND_URL` or `OLLAMA_HOST` the way Ollama itself reads
//! `OLLAMA_HOST`, since that is the variable fleet users already set (its
//! documentation tells them `OLLAMA_HOST=0.0.0.0`).
//!
//! Ollama's rules (`envconfig.Host` in its source): quotes and spaces
//! around the value are dropped; with no scheme the scheme is `http` and
//! the port 11434, while `http://` without a port means port 80 and
//! `https://` 443; a host alone (`0.0.0.0`, `::`, `gpu-1`) takes the
//! default port; an empty host (`:11434`) means every interface; a port
//! that is not a number is replaced by the default; a path is kept as the
//! API's base. An unspecified host (`0.0.0.0`, `::`, empty) is where the
//! server *listens*: the agent reaches it on loopback, and tells the router
//! this machine's own address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Ollama's port, and so the default when the value names no scheme.
pub const OLLAMA_PORT: u16 = 11434;

/// The LLM server as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    /// Where the agent itself reaches the server: the configured host,
    /// with an unspecified one replaced by loopback; a kept path included.
    pub url: String,
    pub host: ServerHost,
    pub port: u16,
}

impl ServerAddress {
    /// The server speaks HTTPS: the router must connect with TLS too.
    pub fn is_https(&self) -> bool {
        self.url.starts_with("https://")
    }
}

/// The host part, as the router's view of the node depends on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerHost {
    /// `0.0.0.0`, `::` or nothing: the server listens on every interface,
    /// so it is reachable at whatever address this machine has.
    AnyInterface,
    Ip(IpAddr),
    Name(String),
}

/// Reads a server address as Ollama reads `OLLAMA_HOST`; `Err` only for a
/// scheme the agent cannot speak. A port that is not a number is replaced by
/// the default, as Ollama does (the caller is told, to log it).
pub fn parse_server_address(raw: &str) -> Result<(ServerAddress, Option<String>), String> {
    let value = raw.trim().trim_matches(['"', '\'']).trim();
    let (scheme, hostport, default_port) = match value.split_once("://") {
        None => ("http", value, OLLAMA_PORT),
        Some(("http", rest)) => ("http", rest, 80),
        Some(("https", rest)) => ("https", rest, 443),
        Some((other, _)) => {
            return Err(format!(
                "{raw:?}: {other}:// is not an LLM server URL; write it as http://HOST:PORT, https://HOST:PORT or HOST:PORT"
            ))
        }
    };
    let (hostport, path) = match hostport.split_once('/') {
        Some((hostport, path)) => (hostport, path.trim_end_matches('/')),
        None => (hostport, ""),
    };
    let mut warning = None;
    let (host, port) = match split_host_port(hostport) {
        Some((host, port)) => {
            let port = match port.parse::<u16>() {
                Ok(port) => port,
                Err(_) => {
                    warning = Some(format!(
                        "{raw:?}: port {port:?} is not a number from 0 to 65535; using {default_port}, as Ollama does"
                    ));
                    default_port
                }
            };
            (host.to_owned(), port)
        }
        // Nothing at all is Ollama's default, loopback.
        None if hostport.is_empty() => (Ipv4Addr::LOCALHOST.to_string(), default_port),
        // A host without a port: an IP (IPv6 bare or bracketed) or a name.
        None => (hostport.trim_matches(['[', ']']).to_owned(), default_port),
    };
    let host = if host.is_empty() {
        ServerHost::AnyInterface
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        if ip.is_unspecified() {
            ServerHost::AnyInterface
        } else {
            ServerHost::Ip(ip)
        }
    } else {
        ServerHost::Name(host)
    };
    let connect_host = match &host {
        ServerHost::AnyInterface => match value.contains("::") || value.contains('[') {
            // `::` and `[::]` listen on IPv6 (and, on Linux, IPv4 too).
            true => IpAddr::V6(Ipv6Addr::LOCALHOST).to_string(),
            false => IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
        },
        ServerHost::Ip(ip) => ip.to_string(),
        ServerHost::Name(name) => name.clone(),
    };
    let authority = if connect_host.contains(':') {
        format!("[{connect_host}]:{port}")
    } else {
        format!("{connect_host}:{port}")
    };
    let url = if path.is_empty() {
        format!("{scheme}://{authority}")
    } else {
        format!("{scheme}://{authority}/{path}")
    };
    Ok((ServerAddress { url, host, port }, warning))
}

/// Go's `net.SplitHostPort`: `host:port` or `[host]:port`; `None` when there
/// is no port (a bare host, a bare IPv6 address).
fn split_host_port(hostport: &str) -> Option<(&str, &str)> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = hostport.rsplit_once(':')?;
    // More than one colon without brackets is a bare IPv6 address.
    if host.contains(':') {
        return None;
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> ServerHost {
        ServerHost::Ip(text.parse().expect("ip"))
    }

    /// Every form Ollama's documentation and its users write.
    #[test]
    fn ollama_host_is_read_as_ollama_reads_it() {
        let any = ServerHost::AnyInterface;
        let cases: &[(&str, &str, ServerHost, u16)] = &[
            ("0.0.0.0", "http://127.0.0.1:11434", any.clone(), 11434),
            (
                "0.0.0.0:11434",
                "http://127.0.0.1:11434",
                any.clone(),
                11434,
            ),
            ("0.0.0.0:8000", "http://127.0.0.1:8000", any.clone(), 8000),
            (":11434", "http://127.0.0.1:11434", any.clone(), 11434),
            ("::", "http://[::1]:11434", any.clone(), 11434),
            ("[::]:11434", "http://[::1]:11434", any.clone(), 11434),
            (
                "http://0.0.0.0:11434",
                "http://127.0.0.1:11434",
                any.clone(),
                11434,
            ),
            // An explicit http:// without a port is port 80, in Ollama too.
            ("http://0.0.0.0", "http://127.0.0.1:80", any.clone(), 80),
            (
                "127.0.0.1",
                "http://127.0.0.1:11434",
                ip("127.0.0.1"),
                11434,
            ),
            (
                "127.0.0.1:11434",
                "http://127.0.0.1:11434",
                ip("127.0.0.1"),
                11434,
            ),
            (
                "http://127.0.0.1:11434",
                "http://127.0.0.1:11434",
                ip("127.0.0.1"),
                11434,
            ),
            (
                "http://127.0.0.1:11434/",
                "http://127.0.0.1:11434",
                ip("127.0.0.1"),
                11434,
            ),
            ("::1", "http://[::1]:11434", ip("::1"), 11434),
            ("[::1]:9000", "http://[::1]:9000", ip("::1"), 9000),
            (
                "localhost",
                "http://localhost:11434",
                ServerHost::Name("localhost".into()),
                11434,
            ),
            (
                "gpu-7:11500",
                "http://gpu-7:11500",
                ServerHost::Name("gpu-7".into()),
                11500,
            ),
            (
                "http://gpu-7",
                "http://gpu-7:80",
                ServerHost::Name("gpu-7".into()),
                80,
            ),
            ("\"0.0.0.0\"", "http://127.0.0.1:11434", any.clone(), 11434),
            (
                "  '127.0.0.1:11434'  ",
                "http://127.0.0.1:11434",
                ip("127.0.0.1"),
                11434,
            ),
            (
                "127.0.0.1:11434/ollama",
                "http://127.0.0.1:11434/ollama",
                ip("127.0.0.1"),
                11434,
            ),
            ("", "http://127.0.0.1:11434", ip("127.0.0.1"), 11434),
            ("http://[::]", "http://[::1]:80", any, 80),
        ];
        for (raw, url, host, port) in cases {
            let (address, warning) = parse_server_address(raw).expect(raw);
            assert_eq!(address.url, *url, "{raw:?}");
            assert_eq!(address.host, *host, "{raw:?}");
            assert_eq!(address.port, *port, "{raw:?}");
            assert_eq!(warning, None, "{raw:?}");
        }
    }

    #[test]
    fn a_port_that_is_not_a_number_falls_back_as_in_ollama_and_is_said() {
        let (address, warning) = parse_server_address("0.0.0.0:abc").expect("parses");
        assert_eq!(address.port, 11434);
        assert!(warning.expect("a warning").contains("\"abc\""));
        let (address, _) = parse_server_address("0.0.0.0:99999").expect("parses");
        assert_eq!(address.port, 11434);
    }

    #[test]
    fn schemes_the_agent_cannot_speak_are_refused_with_a_fix() {
        for raw in ["ftp://127.0.0.1", "unix:///run/ollama.sock"] {
            let error = parse_server_address(raw).expect_err(raw);
            assert!(error.contains("http"), "{raw}: {error}");
        }
    }

    #[test]
    fn https_servers_keep_their_scheme_and_default_to_443() {
        let (address, _) = parse_server_address("https://127.0.0.1").expect("parses");
        assert_eq!(
            (address.url.as_str(), address.port),
            ("https://127.0.0.1:443", 443)
        );
        assert!(address.is_https());
        let (address, _) = parse_server_address("https://127.0.0.1:8443").expect("parses");
        assert_eq!(address.port, 8443);
        let (address, _) = parse_server_address("127.0.0.1:8443").expect("parses");
        assert!(!address.is_https());
    }
}
