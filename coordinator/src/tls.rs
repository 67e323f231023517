//! The router's own TLS (`--tls-cert`, `--tls-key`): so that join tokens,
//! agent secrets and API keys need not cross the network in clear.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS acceptor from a PEM certificate chain and its PEM private key
/// (PKCS#8, PKCS#1 or SEC1), speaking HTTP/1.1 as the router does.
pub fn acceptor(cert_path: &Path, key_path: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(Iterator::collect)
        .with_context(|| {
            format!(
                "--tls-cert {}: cannot read a PEM certificate chain from it",
                cert_path.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "--tls-cert {}: the file holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_path).with_context(|| {
        format!(
            "--tls-key {}: cannot read a PEM private key from it",
            key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS: the default protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context(
            "--tls-cert and --tls-key do not make a usable pair: is the key the certificate's?",
        )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Reads PEM certificates (a CA bundle), for the flag named `flag`.
pub fn read_certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .with_context(|| {
            format!(
                "{flag} {}: cannot read PEM certificates from it",
                path.display()
            )
        })?;
    if certificates.is_empty() {
        anyhow::bail!(
            "{flag} {}: the file holds no PEM certificate",
            path.display()
        );
    }
    Ok(certificates)
}

/// How the router checks the certificates of nodes that speak HTTPS: the
/// system's trust store plus `extra` (`--node-ca-cert`). A node's
/// certificate must name the address it registered. The proxy and the
/// probers share one: the system's store is read once.
pub fn node_client_config(extra: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    roots.add_parsable_certificates(extra.iter().cloned());
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// [`node_client_config`] made on a thread of its own, started before the
/// registry loads: reading and parsing the system's trust store (some
/// 15 ms) then overlaps the load instead of adding to start-up.
pub struct NodeClientConfigLoading {
    thread: Option<std::thread::JoinHandle<Arc<rustls::ClientConfig>>>,
    extra: Vec<CertificateDer<'static>>,
}

impl NodeClientConfigLoading {
    pub fn start(extra: Vec<CertificateDer<'static>>) -> Self {
        let for_thread = extra.clone();
        let thread = std::thread::Builder::new()
            .name("trust-store".into())
            .spawn(move || node_client_config(&for_thread))
            .ok();
        NodeClientConfigLoading { thread, extra }
    }

    /// The config; made here if the thread could not be started or failed.
    pub fn wait(self) -> Arc<rustls::ClientConfig> {
        self.thread
            .and_then(|thread| thread.join().ok())
            .unwrap_or_else(|| node_client_config(&self.extra))
    }
}
