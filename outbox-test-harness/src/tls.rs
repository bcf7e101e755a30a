//! A throw-away certificate authority and server certificate for `stomp+ssl`.
//!
//! Made with the `openssl` command line tool: a CA certificate (CA:TRUE) that
//! clients trust, and a leaf certificate (CA:FALSE, serverAuth) for `localhost` and
//! `127.0.0.1` signed by it, packed with its key into the PKCS12 keystore that
//! ActiveMQ's `<sslContext>` reads. rustls rejects a CA certificate used as a leaf,
//! hence the two levels.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;

/// The keystore password. The keystore protects nothing but a test key.
pub(crate) const KEYSTORE_PASSWORD: &str = "outbox-test";

/// Files produced by [`generate`].
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    /// PEM certificate of the CA that signed the broker's certificate.
    pub(crate) ca_cert_pem: PathBuf,
    /// PKCS12 keystore with the broker's key and certificate chain.
    pub(crate) keystore: PathBuf,
}

const LEAF_EXTENSIONS: &str = "\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
";

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// Writes a CA and a broker certificate into `dir`.
pub(crate) fn generate(dir: &Path) -> Result<TlsFiles, HarnessError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
    let ca_key = dir.join("ca.key");
    let ca_cert_pem = dir.join("ca.pem");
    let leaf_key = dir.join("broker.key");
    let leaf_csr = dir.join("broker.csr");
    let leaf_cert = dir.join("broker.pem");
    let extensions = dir.join("broker.ext");
    let keystore = dir.join("broker.p12");
    std::fs::write(&extensions, LEAF_EXTENSIONS)
        .map_err(|e| HarnessError::io(format!("writing {}", extensions.display()), e))?;

    let mut ca = Command::new("openssl");
    ca.args(["req", "-x509", "-new", "-days", "3650"])
        .args(EC_KEY)
        .args(["-subj", "/CN=outbox test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca_cert_pem);
    run(ca)?;

    let mut request = Command::new("openssl");
    request
        .args(["req", "-new"])
        .args(EC_KEY)
        .args(["-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(&leaf_key)
        .arg("-out")
        .arg(&leaf_csr);
    run(request)?;

    let mut sign = Command::new("openssl");
    sign.args(["x509", "-req", "-days", "3650", "-set_serial", "2"])
        .arg("-in")
        .arg(&leaf_csr)
        .arg("-CA")
        .arg(&ca_cert_pem)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&extensions)
        .arg("-out")
        .arg(&leaf_cert);
    run(sign)?;

    let mut pack = Command::new("openssl");
    pack.args(["pkcs12", "-export", "-name", "broker"])
        .arg("-passout")
        .arg(format!("pass:{KEYSTORE_PASSWORD}"))
        .arg("-in")
        .arg(&leaf_cert)
        .arg("-inkey")
        .arg(&leaf_key)
        .arg("-certfile")
        .arg(&ca_cert_pem)
        .arg("-out")
        .arg(&keystore);
    run(pack)?;

    Ok(TlsFiles {
        ca_cert_pem,
        keystore,
    })
}

fn run(mut command: Command) -> Result<(), HarnessError> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            HarnessError::Missing {
                what: "openssl",
                detail: "not on PATH".into(),
                install: "apt-get install -y openssl",
            }
        } else {
            HarnessError::io(format!("running {shown}"), e)
        }
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Command {
            command: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
