//! `--database-url`: a `postgres://` URL read once, with its password kept
//! out of every log line and its TLS settings (`sslmode`, `sslrootcert`)
//! read the way libpq reads them.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How the router checks the database's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// `sslmode=disable`: no TLS.
    None,
    /// `prefer` (libpq's default) and `require` without a CA file: encrypted
    /// when the server offers it (`require`: always), certificate unchecked,
    /// as libpq does.
    EncryptOnly,
    /// `verify-ca`, `verify-full`, or `require` with `sslrootcert`: the
    /// chain must lead to the CA file (or the system's roots) and name the
    /// host. `verify-ca` checks the name too: stricter than libpq, never
    /// weaker.
    Certificate,
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error(
        "--database-url is not a URL ({0}): give it as postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    )]
    NotAUrl(String),
    #[error("--database-url must start with postgres:// or postgresql://, not {0}://")]
    Scheme(String),
    #[error(
        "--database-url has sslmode={0}; use disable, prefer, require, verify-ca or verify-full"
    )]
    SslMode(String),
    #[error("--database-url: {0}")]
    Invalid(String),
    #[error("the database's CA file {path} (sslrootcert) cannot be used: {reason}")]
    RootCertificate { path: PathBuf, reason: String },
}

/// A parsed `--database-url`.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    verification: Verification,
    redacted: String,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.redacted)
    }
}

impl std::fmt::Display for DatabaseUrl {
    /// The URL with its password replaced: safe to log.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.redacted)
    }
}

impl DatabaseUrl {
    pub fn parse(text: &str) -> Result<Self, DatabaseUrlError> {
        let text = text.trim();
        let mut url =
            url::Url::parse(text).map_err(|error| DatabaseUrlError::NotAUrl(error.to_string()))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(DatabaseUrlError::Scheme(url.scheme().to_owned()));
        }
        // libpq's TLS parameters that tokio-postgres does not know are read
        // here and taken out; the rest it reads itself.
        let mut ssl_mode = "prefer".to_owned();
        let mut root_certificate = None;
        let mut kept = Vec::new();
        for (key, value) in url.query_pairs() {
            match &*key {
                "sslmode" => ssl_mode = value.into_owned(),
                "sslrootcert" => root_certificate = Some(PathBuf::from(&*value)),
                _ => kept.push((key.into_owned(), value.into_owned())),
            }
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        let (mode, verification) = match (ssl_mode.as_str(), &root_certificate) {
            ("disable", _) => (SslMode::Disable, Verification::None),
            ("allow" | "prefer", _) => (SslMode::Prefer, Verification::EncryptOnly),
            ("require", None) => (SslMode::Require, Verification::EncryptOnly),
            ("require" | "verify-ca" | "verify-full", _) => {
                (SslMode::Require, Verification::Certificate)
            }
            (other, _) => return Err(DatabaseUrlError::SslMode(other.to_owned())),
        };
        let mut config: tokio_postgres::Config = url
            .as_str()
            .parse()
            .map_err(|error: tokio_postgres::Error| DatabaseUrlError::Invalid(error.to_string()))?;
        config.ssl_mode(mode);
        if config.get_application_name().is_none() {
            config.application_name("llm-router");
        }
        let mut redacted = url.clone();
        if redacted.password().is_some() {
            let _ = redacted.set_password(Some("REDACTED"));
        }
        let tls = MakeRustlsConnect::new(client_config(verification, root_certificate.as_ref())?);
        Ok(DatabaseUrl {
            config,
            tls,
            verification,
            redacted: redacted.to_string(),
        })
    }

    /// Reads the URL from a file (`--database-url-file`): the first line.
    pub fn from_file(path: &std::path::Path) -> Result<Self, DatabaseUrlError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            DatabaseUrlError::Invalid(format!(
                "cannot read --database-url-file {}: {error}",
                path.display()
            ))
        })?;
        Self::parse(text.lines().next().unwrap_or_default())
    }

    pub fn verification(&self) -> Verification {
        self.verification
    }

    /// One new connection; the caller drives the returned connection.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
                    tokio_postgres::Socket,
                >>::Stream,
            >,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }
}

fn client_config(
    verification: Verification,
    root_certificate: Option<&PathBuf>,
) -> Result<rustls::ClientConfig, DatabaseUrlError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| DatabaseUrlError::Invalid(error.to_string()))?;
    let config =
        match verification {
            Verification::None | Verification::EncryptOnly => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth(),
            Verification::Certificate => {
                let mut roots = rustls::RootCertStore::empty();
                match root_certificate {
                    Some(path) => {
                        let certificates = crate::tls::read_certificates(path, "sslrootcert")
                            .map_err(|error| DatabaseUrlError::RootCertificate {
                                path: path.clone(),
                                reason: format!("{error:#}"),
                            })?;
                        for certificate in certificates {
                            roots.add(certificate).map_err(|error| {
                                DatabaseUrlError::RootCertificate {
                                    path: path.clone(),
                                    reason: error.to_string(),
                                }
                            })?;
                        }
                    }
                    None => {
                        for certificate in rustls_native_certs::load_native_certs().certs {
                            let _ = roots.add(certificate);
                        }
                    }
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
        };
    Ok(config)
}

/// `sslmode=require` as libpq means it: the connection is encrypted and
/// the handshake's signatures are checked, but not who signed the
/// certificate.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        let url =
            DatabaseUrl::parse("postgres://router:s3cret@127.0.0.1:5432/fleet").expect("parses");
        let shown = url.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("router:REDACTED@127.0.0.1:5432/fleet"),
            "{shown}"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn sslmode_is_read_as_libpq_reads_it() {
        let cases = [
            ("", Verification::EncryptOnly),
            ("?sslmode=disable", Verification::None),
            ("?sslmode=prefer", Verification::EncryptOnly),
            ("?sslmode=require", Verification::EncryptOnly),
            ("?sslmode=verify-full", Verification::Certificate),
            ("?sslmode=verify-ca", Verification::Certificate),
        ];
        for (query, expected) in cases {
            let url =
                DatabaseUrl::parse(&format!("postgres://u@127.0.0.1/db{query}")).expect(query);
            assert_eq!(url.verification(), expected, "{query}");
        }
        let error =
            DatabaseUrl::parse("postgres://u@127.0.0.1/db?sslmode=always").expect_err("refused");
        assert!(error.to_string().contains("verify-full"), "{error}");
    }

    #[test]
    fn a_url_of_another_kind_is_refused_with_the_form_to_use() {
        let error = DatabaseUrl::parse("mysql://u@127.0.0.1/db").expect_err("refused");
        assert!(error.to_string().contains("postgres://"), "{error}");
        let error = DatabaseUrl::parse("host=127.0.0.1 user=u").expect_err("refused");
        assert!(
            error.to_string().contains("postgres://USER:PASSWORD@HOST"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_ca_file_names_the_file() {
        let error = DatabaseUrl::parse(
            "postgres://u@127.0.0.1/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .expect_err("refused");
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }
}
