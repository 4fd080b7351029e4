//! A private test PKI, made by the shared launcher's `certs` subcommand
//! (the openssl CLI) in a temporary directory: a CA with a server and a
//! client certificate, and an unrelated CA with a client of its own, for
//! "a client of the wrong CA is refused".

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tempfile::TempDir;

use crate::launcher::launcher;

/// Cheap to clone: the clones share the directory, which goes when the last
/// one does (a TLS Redis keeps one, so it can restart).
#[derive(Clone)]
pub struct TestCerts {
    dir: Arc<TempDir>,
}

impl TestCerts {
    /// Server certificate for 127.0.0.1 and localhost.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for certificates");
        let output = launcher()
            .arg("certs")
            .arg(dir.path())
            .output()
            .expect("the launcher runs (python3 is needed)");
        assert!(
            output.status.success(),
            "certs failed (the openssl CLI is needed): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self { dir: Arc::new(dir) }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.file("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.file("server.key")
    }

    /// A client certificate of the same CA, for mutual TLS.
    pub fn client_cert(&self) -> PathBuf {
        self.file("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.file("client.key")
    }

    /// A CA that signed none of the above.
    pub fn other_ca(&self) -> PathBuf {
        self.file("other-ca.pem")
    }

    /// A client certificate of the other CA: a server must refuse it.
    pub fn other_client_cert(&self) -> PathBuf {
        self.file("other-client.pem")
    }

    pub fn other_client_key(&self) -> PathBuf {
        self.file("other-client.key")
    }
}
