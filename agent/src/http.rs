//! The agent's HTTP clients (to the router, to its LLM server): rustls with
//! the system's roots plus `--ca-cert`, and timeouts so that a silent peer
//! never stalls the loop.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::CertificateDer;

/// The system's trust store, read once per process. Reading it is some 150
/// PEM files parsed on the thread that asks, milliseconds of blocking work
/// (tens in a debug build): done for every client, a process running many
/// agents (the restart-herd test runs 1,000) kept its event loops busy
/// reading certificates instead of serving its agents.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "Part of the system's trust store could not be read; HTTPS peers it vouches for may be refused.");
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(native.certs);
        roots
    })
}

/// A client with these timeouts that trusts `ca_certificates` besides the
/// system's roots. `peer` names what it talks to, for the error.
pub fn client(
    timeout: Duration,
    connect_timeout: Duration,
    ca_certificates: Vec<CertificateDer<'static>>,
    peer: &str,
) -> anyhow::Result<reqwest::Client> {
    let mut roots = system_roots().clone();
    for (number, certificate) in ca_certificates.into_iter().enumerate() {
        roots.add(certificate).map_err(|error| {
            anyhow::anyhow!(
                "cannot set up HTTPS to {peer}: certificate {} of --ca-cert is not a usable CA certificate: {error}",
                number + 1
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| anyhow::anyhow!("cannot set up HTTPS to {peer}: {error}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The clients speak HTTP/1.1 only (reqwest is built without HTTP/2).
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(connect_timeout)
        .build()
        .map_err(|error| anyhow::anyhow!("cannot set up HTTPS to {peer}: {error}"))
}
