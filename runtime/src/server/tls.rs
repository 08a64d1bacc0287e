//! TLS on the gRPC port: rustls with the ring provider (the one the
//! workspace already builds), ALPN `h2`, the certificate and key re-read
//! when their files change (a cert-manager renewal needs no restart), and
//! mutual TLS — client certificates required and verified — with a client
//! CA. Handshakes happen in `connection`'s accept loop.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio_rustls::rustls::{
    RootCertStore, ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::{
    error::{Error, Result},
    server::reload::{Reloading, read_credential},
};

/// Where the server's TLS material lives (the `--tls-*` flags).
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    /// `--tls-cert`: the certificate chain, PEM.
    pub(crate) cert: PathBuf,
    /// `--tls-key`: its private key, PEM.
    pub(crate) key: PathBuf,
    /// `--tls-client-ca`: CA certificates client certificates must chain
    /// to; `None`: no client certificates asked for.
    pub(crate) client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The TLS files the flags name; `None` when TLS is off. Half a
    /// configuration is an error: TLS was asked for, and there is no
    /// falling back to plaintext.
    pub(crate) fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>> {
        match (cert, key) {
            (None, None) => match client_ca {
                None => Ok(None),
                Some(ca) => Err(Error::Config(format!(
                    "--tls-client-ca {} needs --tls-cert and --tls-key: client certificates are checked only on a TLS port",
                    ca.display()
                ))),
            },
            (Some(cert), None) => {
                Err(Error::Config(format!("--tls-cert {} needs --tls-key (its private key)", cert.display())))
            }
            (None, Some(key)) => {
                Err(Error::Config(format!("--tls-key {} needs --tls-cert (its certificate)", key.display())))
            }
            (Some(cert), Some(key)) => {
                Ok(Some(Self { cert: cert.to_owned(), key: key.to_owned(), client_ca: client_ca.map(Path::to_owned) }))
            }
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()].into_iter().flatten().cloned().collect()
    }

    /// The rustls configuration these files make; errors name the flag and
    /// the file.
    fn server_config(&self) -> Result<ServerConfig> {
        let provider = Arc::new(ring::default_provider());
        let certs = read_certs("--tls-cert", &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read_credential("--tls-key", &self.key)?)
            .map_err(|e| Error::Config(format!("--tls-key {}: no usable PEM private key: {e}", self.key.display())))?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(format!("TLS protocol versions: {e}")))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs("--tls-client-ca", ca)? {
                    roots.add(cert).map_err(|e| {
                        Error::Config(format!("--tls-client-ca {}: not a usable CA certificate: {e}", ca.display()))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| Error::Config(format!("--tls-client-ca {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            Error::Config(format!(
                "--tls-key {} does not go with --tls-cert {}: {e}",
                self.key.display(),
                self.cert.display()
            ))
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |e: String| Error::Config(format!("{flag} {}: {e}", path.display()));
    let pem = read_credential(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".to_owned()));
    }
    Ok(certs)
}

/// The server's TLS configuration, as last read from its files.
#[derive(Debug)]
pub(crate) struct Tls {
    files: TlsFiles,
    config: Arc<Reloading<ServerConfig>>,
}

impl Tls {
    /// Reads the files; anything wrong stops the runtime at start.
    pub(crate) fn load(files: TlsFiles) -> Result<Self> {
        let config = Reloading::load("TLS certificate", files.paths(), || files.server_config())?;
        Ok(Self { files, config: Arc::new(config) })
    }

    /// Whether clients must present a certificate.
    pub(crate) fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-reads the files when they change; new connections get the new
    /// certificate, open ones keep theirs.
    pub(crate) async fn watch(self: Arc<Self>) {
        let files = self.files.clone();
        Arc::clone(&self.config).watch(move || files.server_config()).await;
    }

    /// The server configuration in force.
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        self.config.get()
    }
}

/// The owner key of a client certificate's retained calls: a digest of its
/// issuer, its subject and its URI subject alternative names (SPIFFE IDs),
/// so a renewed certificate for the same identity keeps access while the
/// same subject from another CA, or two certificates with empty subjects
/// and different URIs, do not share calls. `None` when the certificate
/// names no one (an empty subject and no URI) or cannot be parsed that far:
/// such a client cannot retain calls.
pub(crate) fn subject_owner(cert_der: &[u8]) -> Option<Arc<str>> {
    use sha2::{Digest, Sha256};
    let names = names(cert_der)?;
    if names.subject == [0x30, 0x00] && names.uris.is_empty() {
        return None;
    }
    let mut digest = Sha256::new();
    for part in [names.issuer, names.subject].into_iter().chain(names.uris) {
        digest.update((part.len() as u64).to_be_bytes());
        digest.update(part);
    }
    let hex: String = digest.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("cert:{hex}").into())
}

/// What names a certificate's holder, as DER.
struct Names<'a> {
    issuer: &'a [u8],
    subject: &'a [u8],
    uris: Vec<&'a [u8]>,
}

/// The issuer, subject and URI alternative names of a certificate:
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serialNumber, signature, issuer, validity, subject,
/// subjectPublicKeyInfo, [1] [2] OPTIONAL, [3] extensions OPTIONAL } … }`.
fn names(cert: &[u8]) -> Option<Names<'_>> {
    /// One element, tag and length included, and what follows it.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (tag, _, after) = der(input)?;
        Some((tag, &input[..input.len() - after.len()], after))
    }
    let (_, certificate, _) = der(cert)?;
    let (_, tbs, _) = der(certificate)?;
    let mut rest = tbs;
    let (tag, _, after) = der(rest)?;
    if tag == 0xA0 {
        rest = after; // the explicit version
    }
    for _ in 0..2 {
        rest = der(rest)?.2; // serial, signature
    }
    let (tag, issuer, after) = element(rest)?;
    if tag != 0x30 {
        return None;
    }
    rest = der(after)?.2; // validity
    let (tag, subject, after) = element(rest)?;
    if tag != 0x30 {
        return None;
    }
    let mut uris = Vec::new();
    // subjectPublicKeyInfo, the optional unique ids, then [3] extensions.
    let mut rest = der(after)?.2;
    while let Some((tag, content, after)) = der(rest) {
        rest = after;
        if tag != 0xA3 {
            continue;
        }
        let (_, mut extensions, _) = der(content)?;
        while let Some((_, extension, after)) = der(extensions) {
            extensions = after;
            let (_, oid, mut value) = der(extension)?;
            if oid != [0x55, 0x1D, 0x11] {
                continue; // not subjectAltName (2.5.29.17)
            }
            if let Some((0x01, _, after)) = der(value) {
                value = after; // critical
            }
            let (_, octets, _) = der(value)?;
            let (_, mut general_names, _) = der(octets)?;
            while let Some((tag, name, after)) = der(general_names) {
                general_names = after;
                if tag == 0x86 {
                    uris.push(name); // [6] uniformResourceIdentifier
                }
            }
        }
    }
    Some(Names { issuer, subject, uris })
}

/// One DER element at the start of `input`: its tag, its content and what
/// follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_client_certificate_is_its_issuer_subject_and_uris() {
        let tlv = |tag: u8, content: &[u8]| {
            let mut v = vec![tag];
            if content.len() < 0x80 {
                v.push(content.len() as u8);
            } else {
                v.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
            }
            v.extend_from_slice(content);
            v
        };
        let name = |dn: &[u8]| if dn.is_empty() { tlv(0x30, &[]) } else { tlv(0x30, &tlv(0x31, &tlv(0x30, dn))) };
        let cert = |serial: u8, issuer: &[u8], subject: &[u8], uri: Option<&[u8]>, padding: usize| {
            let mut tbs = [
                tlv(0xA0, &tlv(0x02, &[2])),
                tlv(0x02, &[serial]),
                tlv(0x30, &[]),
                name(issuer),
                tlv(0x30, b"validity"),
                name(subject),
                tlv(0x30, &vec![0; padding]), // subjectPublicKeyInfo
            ]
            .concat();
            if let Some(uri) = uri {
                let san = tlv(0x30, &tlv(0x86, uri));
                let extension = [tlv(0x06, &[0x55, 0x1D, 0x11]), tlv(0x01, &[0xFF]), tlv(0x04, &san)].concat();
                let other = [tlv(0x06, &[0x55, 0x1D, 0x13]), tlv(0x04, &tlv(0x30, &[]))].concat();
                tbs.extend(tlv(0xA3, &tlv(0x30, &[tlv(0x30, &other), tlv(0x30, &extension)].concat())));
            }
            tlv(0x30, &[tlv(0x30, &tbs), tlv(0x30, b"sig")].concat())
        };
        let owner = |c: Vec<u8>| subject_owner(&c).expect("an identity");
        let a = owner(cert(1, b"CN=ca", b"CN=alice", None, 10));
        assert!(a.starts_with("cert:"));
        assert_eq!(a, owner(cert(2, b"CN=ca", b"CN=alice", None, 300)), "a renewed certificate for the same subject");
        assert_ne!(a, owner(cert(1, b"CN=ca", b"CN=bob", None, 10)));
        assert_ne!(a, owner(cert(1, b"CN=other-ca", b"CN=alice", None, 10)), "the same subject from another CA");
        // SPIFFE-style: empty subjects, the identity in the URI.
        let spiffe = |uri: &[u8]| cert(1, b"CN=ca", b"", Some(uri), 10);
        let web = owner(spiffe(b"spiffe://example.org/web"));
        assert_ne!(web, owner(spiffe(b"spiffe://example.org/batch")), "different URIs");
        assert_eq!(web, owner(spiffe(b"spiffe://example.org/web")));
        assert!(subject_owner(&cert(1, b"CN=ca", b"", None, 10)).is_none(), "names no one");
        assert!(subject_owner(b"\x30\x05abc").is_none(), "truncated DER");
        assert!(subject_owner(&[]).is_none());
    }

    #[test]
    fn half_a_configuration_is_refused_naming_the_flags() {
        let p = |s: &str| PathBuf::from(s);
        let err = |c: Option<PathBuf>, k: Option<PathBuf>, ca: Option<PathBuf>| {
            TlsFiles::from_flags(c.as_deref(), k.as_deref(), ca.as_deref()).expect_err("refused").to_string()
        };
        assert!(err(Some(p("c.pem")), None, None).contains("--tls-cert c.pem needs --tls-key"));
        assert!(err(None, Some(p("k.pem")), None).contains("--tls-key k.pem needs --tls-cert"));
        assert!(err(None, None, Some(p("ca.pem"))).contains("--tls-client-ca ca.pem needs --tls-cert"));
        assert!(TlsFiles::from_flags(None, None, None).expect("off").is_none());
    }

    #[test]
    fn unreadable_or_empty_files_name_the_flag_and_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let files = TlsFiles { cert: empty.clone(), key: empty.clone(), client_ca: None };
        let e = Tls::load(files).expect_err("no certificate").to_string();
        assert!(e.contains("--tls-cert") && e.contains("empty.pem") && e.contains("no PEM certificate"), "{e}");
        let missing = dir.path().join("missing.pem");
        let files = TlsFiles { cert: missing.clone(), key: missing, client_ca: None };
        let e = Tls::load(files).expect_err("missing").to_string();
        assert!(e.contains("--tls-cert") && e.contains("missing.pem"), "{e}");
    }
}
