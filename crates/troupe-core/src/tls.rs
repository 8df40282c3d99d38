//! TLS settings a backend connection may carry beyond its `rediss://` or `amqps://` scheme: a
//! CA to trust instead of the public roots, and a client certificate with its key. Each backend
//! reads them from its URL under the names its own ecosystem uses (redis-py's `ssl_ca_certs`,
//! RabbitMQ's `cacertfile`, libpq's `sslrootcert`) and turns handshake failures into one line
//! that says which setting to fix ([`tls_hint`]). Every backend uses rustls; none uses OpenSSL.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The TLS files of one connection; all optional. Paths only: the files are read when the
/// connection is made ([`TlsFiles::read`]), so a renewed certificate is picked up on reconnect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// PEM file of the CA (or CAs) that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (mutual TLS); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// The names a backend's URL gives the three [`TlsFiles`] settings, for its error messages.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct TlsSettingNames {
    /// The backend as users know it (`Redis`, `RabbitMQ`).
    pub backend: &'static str,
    /// The CA file's setting.
    pub ca_file: &'static str,
    /// The client certificate's setting.
    pub cert_file: &'static str,
    /// The client key's setting.
    pub key_file: &'static str,
}

impl TlsSettingNames {
    /// Names for `backend`.
    #[must_use]
    pub const fn new(
        backend: &'static str,
        ca_file: &'static str,
        cert_file: &'static str,
        key_file: &'static str,
    ) -> Self {
        Self {
            backend,
            ca_file,
            cert_file,
            key_file,
        }
    }
}

/// The contents of [`TlsFiles`], PEM-encoded. Its `Debug` output leaves out the key.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct TlsPem {
    /// The CA certificates.
    pub ca: Option<Vec<u8>>,
    /// The client certificate (chain).
    pub cert: Option<Vec<u8>>,
    /// The client certificate's private key.
    pub key: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("cert", &self.cert.as_ref().map(Vec::len))
            .field("key", &self.key.as_ref().map(|_| "***"))
            .finish()
    }
}

impl TlsFiles {
    /// True when no file is set (the scheme's defaults: the public roots, no client
    /// certificate).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.cert_file.is_none() && self.key_file.is_none()
    }

    /// Trusts the CA certificates in `path` (PEM).
    #[must_use]
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents the client certificate in `cert` with its private key in `key` (both PEM).
    #[must_use]
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert_file = Some(cert.into());
        self.key_file = Some(key.into());
        self
    }

    /// Checks that a client certificate comes with its key and the other way round.
    ///
    /// # Errors
    /// [`Error::Config`] naming the missing setting.
    pub fn validate(&self, names: &TlsSettingNames) -> Result<()> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(Error::Config(format!(
                "`{}` is set without `{}` in the {} URL; a client certificate needs its private key",
                names.cert_file, names.key_file, names.backend
            ))),
            (None, Some(_)) => Err(Error::Config(format!(
                "`{}` is set without `{}` in the {} URL; a private key needs its client certificate",
                names.key_file, names.cert_file, names.backend
            ))),
            _ => Ok(()),
        }
    }

    /// Reads the files.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting and the file that cannot be read or holds no PEM
    /// block (never the key's contents).
    pub fn read(&self, names: &TlsSettingNames) -> Result<TlsPem> {
        self.validate(names)?;
        Ok(TlsPem {
            ca: read_pem(self.ca_file.as_deref(), names.ca_file, "CERTIFICATE", names)?,
            cert: read_pem(self.cert_file.as_deref(), names.cert_file, "CERTIFICATE", names)?,
            key: read_pem(self.key_file.as_deref(), names.key_file, "PRIVATE KEY", names)?,
        })
    }
}

fn read_pem(path: Option<&Path>, setting: &str, label: &str, names: &TlsSettingNames) -> Result<Option<Vec<u8>>> {
    let Some(path) = path else { return Ok(None) };
    let bytes = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the {} URL's `{setting}` file {}: {e}",
            names.backend,
            path.display()
        ))
    })?;
    // "BEGIN CERTIFICATE", "BEGIN PRIVATE KEY", "BEGIN EC PRIVATE KEY", "BEGIN RSA PRIVATE KEY".
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.trim_end().ends_with(&format!("{label}-----")));
    if !found {
        return Err(Error::Config(format!(
            "the {} URL's `{setting}` file {} holds no PEM {} (a `-----BEGIN ...{label}-----` block)",
            names.backend,
            path.display(),
            label.to_ascii_lowercase()
        )));
    }
    Ok(Some(bytes))
}

/// The path a URL's query value names (percent-decoded: `%20` is a space).
#[must_use]
pub fn path_from_query(value: &str) -> PathBuf {
    PathBuf::from(
        percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// What to fix when `error` (a connection error's text) is a TLS handshake failure, or `None`.
/// Recognises rustls's certificate errors and the alerts a server sends when it wants a client
/// certificate.
#[must_use]
pub fn tls_hint(error: &str, names: &TlsSettingNames) -> Option<String> {
    let e = error.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| e.contains(n));
    if has(&[
        "unknownissuer",
        "unknown issuer",
        "badsignature",
        "self-signed",
        "self signed",
    ]) {
        Some(format!(
            "the server's certificate is not signed by a CA this client trusts; set `{}` to the CA file that signed it",
            names.ca_file
        ))
    } else if has(&["notvalidforname", "not valid for name", "certificate is not valid for"]) {
        Some(
            "the server's certificate does not name the host in the URL; connect by a name (or IP) its certificate holds"
                .into(),
        )
    } else if has(&["expired", "notvalidyet", "not valid yet"]) {
        Some("the server's certificate is outside its validity period; renew it (or check this machine's clock)".into())
    } else if has(&[
        "certificaterequired",
        "certificate required",
        "requires a valid client certificate",
        "badcertificate",
        "bad certificate",
        "unknownca",
        "unknown ca",
    ]) {
        Some(format!(
            "the server refused this client's certificate or wants one; set `{}` and `{}` to a client certificate its CA signed",
            names.cert_file, names.key_file
        ))
    } else if has(&["no encryption"]) {
        Some("the server accepts only TLS connections; connect with TLS".into())
    } else if has(&[
        "invalidcontenttype",
        "corrupt message",
        "invalid message",
        "wrong version number",
    ]) {
        Some("the server did not answer in TLS; check the port (TLS is usually served on its own port) or use the plain scheme".into())
    } else {
        None
    }
}

/// What to fix when a TLS connection that presented no client certificate was closed by the
/// server during or right after the handshake (`error` is the connection error's text), or
/// `None`. A server that requires client certificates may close before its alert arrives.
#[must_use]
pub fn closed_without_client_cert_hint(error: &str, names: &TlsSettingNames) -> Option<String> {
    let e = error.to_ascii_lowercase();
    [
        "reset by peer",
        "broken pipe",
        "unexpected eof",
        "unexpectedeof",
        "connection closed",
    ]
    .iter()
    .any(|n| e.contains(n))
    .then(|| {
        format!(
            "the server closed the TLS connection; if it asks for client certificates, set `{}` and `{}`",
            names.cert_file, names.key_file
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: TlsSettingNames = TlsSettingNames::new("Redis", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile");

    #[test]
    fn a_certificate_needs_its_key() {
        let e = TlsFiles::default().client_cert("c.pem", "k.pem");
        assert!(e.validate(&NAMES).is_ok());
        let mut only_cert = e.clone();
        only_cert.key_file = None;
        let err = only_cert.validate(&NAMES).unwrap_err().to_string();
        assert!(err.contains("`ssl_certfile` is set without `ssl_keyfile`"), "{err}");
        let mut only_key = e;
        only_key.cert_file = None;
        assert!(only_key.validate(&NAMES).is_err());
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named() {
        let err = TlsFiles::default()
            .ca_file("/nonexistent/ca.pem")
            .read(&NAMES)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`ssl_ca_certs` file /nonexistent/ca.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("troupe-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = TlsFiles::default().ca_file(&junk).read(&NAMES).unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let key = dir.join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let pem = TlsFiles::default()
            .ca_file(&ca)
            .client_cert(&ca, &key)
            .read(&NAMES)
            .unwrap();
        assert!(pem.key.is_some() && pem.cert.is_some() && pem.ca.is_some());
        assert!(!format!("{pem:?}").contains("c2VjcmV0"), "{pem:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn query_paths_are_percent_decoded() {
        assert_eq!(
            path_from_query("/etc/my%20certs/ca.pem"),
            PathBuf::from("/etc/my certs/ca.pem")
        );
        assert_eq!(path_from_query("/plain/ca.pem"), PathBuf::from("/plain/ca.pem"));
    }

    #[test]
    fn handshake_failures_name_the_setting_to_fix() {
        let hint = tls_hint("invalid peer certificate: UnknownIssuer", &NAMES).unwrap();
        assert!(hint.contains("`ssl_ca_certs`"), "{hint}");
        let hint = tls_hint("received fatal alert: CertificateRequired", &NAMES).unwrap();
        assert!(hint.contains("`ssl_certfile` and `ssl_keyfile`"), "{hint}");
        assert!(tls_hint("Connection refused (os error 111)", &NAMES).is_none());
        let hint =
            closed_without_client_cert_hint("IO error: Connection reset by peer (os error 104)", &NAMES).unwrap();
        assert!(hint.contains("set `ssl_certfile` and `ssl_keyfile`"), "{hint}");
        assert!(closed_without_client_cert_hint("Connection refused", &NAMES).is_none());
    }
}
