//! The agent's HTTP clients (to the router, to its LLM server): rustls with
//! the system's roots plus `--ca-cert`, and timeouts so that a silent peer
//! never stalls the loop.

use std::time::Duration;

/// A client with these timeouts that trusts `ca_certificates` besides the
/// system's roots. `peer` names what it talks to, for the error.
pub fn client(
    timeout: Duration,
    connect_timeout: Duration,
    ca_certificates: Vec<reqwest::Certificate>,
    peer: &str,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect_timeout);
    for certificate in ca_certificates {
        builder = builder.add_root_certificate(certificate);
    }
    builder
        .build()
        .map_err(|error| anyhow::anyhow!("cannot set up HTTPS to {peer}: {error}"))
}
