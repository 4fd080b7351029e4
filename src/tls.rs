//! TLS on the gRPC port (rustls, on ring), with certificates that rotate
//! under a running server.
//!
//! The certificate is handed to each handshake by [`CurrentCert`], a rustls
//! `ResolvesServerCert` that holds the key pair loaded last. A poll
//! ([`crate::reload`]) re-reads the files and swaps in the new pair once the
//! certificate and the key both parse and match each other, so a half-written
//! rotation (the certificate renewed, the key not yet) keeps the old pair
//! until the new one is whole. The client CA of mutual TLS is part of the
//! rustls configuration itself, so a change to it builds a new
//! configuration, used from the next connection on.
//!
//! tonic's own `tls_config` reads its certificate once; so the server is
//! fed a stream of connections that are already TLS ([`incoming`]), each
//! handshake in a task of its own, so that a slow or failed handshake never
//! holds up the accept loop.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
        sign::CertifiedKey,
    },
    server::TlsStream,
};
use tonic::transport::server::TcpIncoming;

use crate::locks::{lock, read_lock, write_lock};
use crate::reload::{self, Snapshot};
use crate::settings::SettingError;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshake is done, waiting for the server to take
/// them.
const HANDSHAKEN_QUEUE: usize = 64;

/// gRPC is HTTP/2, and gRPC clients insist the server says so by ALPN.
const ALPN_H2: &[u8] = b"h2";

/// The settings that name each file, for messages.
const CERT: (&str, &str) = ("--tls-cert", "PRESENCE_TLS_CERT");
const KEY: (&str, &str) = ("--tls-key", "PRESENCE_TLS_KEY");
const CLIENT_CA: (&str, &str) = ("--tls-client-ca", "PRESENCE_TLS_CLIENT_CA");

/// The rustls cryptography: ring, named explicitly (the build has no other
/// provider; aws-lc would need cmake).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default rustls provider, for the libraries
/// that build their rustls configuration from the default (the Redis
/// client's `rediss://`). Idempotent.
pub fn install_default_provider() {
    // An error means a provider is installed already: nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The PEM files of the gRPC port's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: mutual TLS, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.cert.as_path(), self.key.as_path()];
        paths.extend(self.client_ca.as_deref());
        paths
    }
}

/// Hands every handshake the key pair loaded last.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl CurrentCert {
    fn get(&self) -> Arc<CertifiedKey> {
        read_lock(&self.0).clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *write_lock(&self.0) = key;
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The gRPC port's TLS: the current configuration, and how to renew it.
pub struct ServerTls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    cert: Arc<CurrentCert>,
    config: RwLock<Arc<ServerConfig>>,
    /// The files as last read, loaded or refused: each change is acted on
    /// (and a bad one reported) once.
    seen: Mutex<Snapshot>,
}

impl ServerTls {
    /// Loads the files; any that is missing or does not parse is an error
    /// naming its setting.
    pub fn load(files: TlsFiles) -> Result<Self, SettingError> {
        let provider = provider();
        let seen = Snapshot::read(&files.paths());
        let cert = Arc::new(CurrentCert(RwLock::new(load_key_pair(&files, &provider)?)));
        let config = build_config(&files, &provider, cert.clone())?;
        Ok(Self {
            files,
            provider,
            cert,
            config: RwLock::new(config),
            seen: Mutex::new(seen),
        })
    }

    /// Whether clients must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(read_lock(&self.config).clone())
    }

    /// Re-reads the files; if they changed and the new ones are good, new
    /// connections use them. Bad new files are logged, and the ones in use
    /// kept.
    pub fn reload_if_changed(&self) {
        let now = Snapshot::read(&self.files.paths());
        {
            let mut seen = lock(&self.seen);
            if *seen == now {
                return;
            }
            *seen = now;
        }
        let reloaded = load_key_pair(&self.files, &self.provider).and_then(|pair| {
            let config = build_config(&self.files, &self.provider, self.cert.clone())?;
            Ok((pair, config))
        });
        match reloaded {
            Ok((pair, config)) => {
                self.cert.set(pair);
                *write_lock(&self.config) = config;
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS certificate reloaded: new connections use it"
                );
            }
            Err(error) => tracing::error!(
                %error,
                "TLS files changed but cannot be used; keeping the certificate in use"
            ),
        }
    }
}

fn invalid(setting: (&'static str, &'static str), reason: String) -> SettingError {
    SettingError::new(setting.0, setting.1, reason)
}

fn read(setting: (&'static str, &'static str), path: &Path) -> Result<Vec<u8>, SettingError> {
    reload::read(path).map_err(|reason| invalid(setting, reason))
}

/// Certificates in a PEM file: at least one.
pub fn read_certificates(
    setting: (&'static str, &'static str),
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, SettingError> {
    let pem = read(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(setting, format!("{}: not PEM certificates ({e})", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            setting,
            format!("{}: no PEM certificate (BEGIN CERTIFICATE) in it", path.display()),
        ));
    }
    Ok(certs)
}

fn load_key_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, SettingError> {
    let certs = read_certificates(CERT, &files.cert)?;
    let pem = read(KEY, &files.key)?;
    // The parser's own message is not shown: it could quote the key.
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        invalid(
            KEY,
            format!(
                "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it",
                files.key.display()
            ),
        )
    })?;
    let pair = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        invalid(
            KEY,
            format!(
                "{}: unusable with the certificate in {} ({e})",
                files.key.display(),
                files.cert.display()
            ),
        )
    })?;
    Ok(Arc::new(pair))
}

fn build_config(
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
    cert: Arc<CurrentCert>,
) -> Result<Arc<ServerConfig>, SettingError> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(CERT, format!("TLS setup: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(read_certificates(CLIENT_CA, path)?);
            if added == 0 {
                return Err(invalid(
                    CLIENT_CA,
                    format!("{}: no usable CA certificate in it", path.display()),
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| invalid(CLIENT_CA, format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The connections of `tcp`, each after its TLS handshake. Handshakes run
/// concurrently, each within [`HANDSHAKE_TIMEOUT`]; one that fails is
/// logged and dropped, and the accepting goes on. The accepting ends, and
/// the listener closes, when the server drops the stream (at shutdown).
pub fn incoming(tcp: TcpIncoming, tls: Arc<ServerTls>) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> {
    let (sender, mut receiver) = mpsc::channel(HANDSHAKEN_QUEUE);
    tokio::spawn(accept(tcp, tls, sender));
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx)).map(Ok)
}

async fn accept(mut tcp: TcpIncoming, tls: Arc<ServerTls>, sender: mpsc::Sender<TlsStream<TcpStream>>) {
    loop {
        let stream = tokio::select! {
            () = sender.closed() => return,
            next = tcp.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(error)) => {
                    tracing::debug!(%error, "accepting a connection failed");
                    continue;
                }
                None => return,
            },
        };
        let acceptor = tls.acceptor();
        let sender = sender.clone();
        tokio::spawn(async move {
            let peer = stream.peer_addr().ok();
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    // Fails only if the server is shutting down.
                    let _ = sender.send(stream).await;
                }
                Ok(Err(error)) => tracing::debug!(?peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(?peer, "TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_refused_naming_the_setting() {
        install_default_provider();
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        };
        let error = ServerTls::load(files).err().expect("refused");
        assert!(error.to_string().contains("--tls-cert"), "{error}");
        assert!(error.to_string().contains("PRESENCE_TLS_CERT"), "{error}");
    }

    #[test]
    fn a_key_file_that_is_not_a_key_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        // Not a real certificate: the certificate check comes first, so
        // give it one that parses as PEM.
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").expect("written");
        std::fs::write(&key, "secret-material-here").expect("written");
        let files = TlsFiles {
            cert,
            key,
            client_ca: None,
        };
        let error = ServerTls::load(files).err().expect("refused");
        let text = error.to_string();
        assert!(text.contains("--tls-key"), "{text}");
        assert!(!text.contains("secret-material-here"), "{text}");
    }
}
