//! TLS for `stomp+ssl://` addresses (cargo feature `tls`, rustls).

use crate::client::{Config, Transport};
use crate::error::Error;
use crate::uri::BrokerAddr;

#[cfg(feature = "tls")]
pub(crate) async fn wrap(
    tcp: impl Transport + 'static,
    addr: &BrokerAddr,
    config: &Config,
) -> Result<Box<dyn Transport>, Error> {
    use std::sync::Arc;

    use rustls_pki_types::ServerName;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let fail = |reason: String| Error::Tls {
        addr: addr.to_string(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    match &config.tls_ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| fail(format!("cannot read CA file {}: {e}", path.display())))?;
            let mut reader = std::io::BufReader::new(pem.as_slice());
            for cert in rustls_pemfile::certs(&mut reader) {
                let cert = cert.map_err(|e| fail(format!("bad PEM in {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| fail(format!("bad CA certificate in {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(fail(format!("no certificates in {}", path.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(fail(
                    "no system CA certificates found; set Config::tls_ca_file".to_owned(),
                ));
            }
        }
    }
    let tls = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = config
        .tls_server_name
        .clone()
        .unwrap_or_else(|| addr.host.clone());
    let server_name = ServerName::try_from(name.clone())
        .map_err(|_| fail(format!("invalid TLS server name {name:?}")))?;
    let stream = TlsConnector::from(Arc::new(tls))
        .connect(server_name, tcp)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(Box::new(stream))
}

/// The crypto provider of TLS connections: the one the application
/// installed as the process default (`CryptoProvider::install_default`, e.g.
/// aws-lc-rs for post-quantum key exchange), otherwise *ring*.
///
/// rustls 0.23.48 deprecates its *ring* provider for lacking post-quantum
/// key exchange. *ring* stays the fallback because it builds with the Rust
/// toolchain alone, where aws-lc-rs needs a C toolchain and CMake on every
/// user's machine; an application that wants post-quantum key exchange
/// installs its provider and this one is not used. `allow` rather than
/// `expect`: the rustls versions before 0.23.48 do not deprecate it, and
/// either must build without warnings.
#[cfg(feature = "tls")]
fn crypto_provider() -> std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    use tokio_rustls::rustls::crypto::CryptoProvider;

    if let Some(installed) = CryptoProvider::get_default() {
        return installed.clone();
    }
    #[allow(deprecated)]
    let ring = tokio_rustls::rustls::crypto::ring::default_provider();
    std::sync::Arc::new(ring)
}

#[cfg(not(feature = "tls"))]
pub(crate) async fn wrap(
    _tcp: impl Transport + 'static,
    addr: &BrokerAddr,
    _config: &Config,
) -> Result<Box<dyn Transport>, Error> {
    Err(Error::Tls {
        addr: addr.to_string(),
        reason: "this build has no TLS support; enable the `tls` feature of outbox-stomp"
            .to_owned(),
    })
}
