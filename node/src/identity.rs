//! A node's identity: an Ed25519 key pair and a self-signed certificate for
//! it, kept in the data directory. The node id is the SHA-256 of the public
//! key (SubjectPublicKeyInfo DER), as INTERFACE.md defines it.

use std::io::Write;
use std::path::{Path, PathBuf};

use concord_core::NodeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// The private key's file name in the data directory (owner-readable only).
pub const KEY_FILE: &str = "node.key";
/// The certificate's file name in the data directory.
pub const CERT_FILE: &str = "node.crt";

/// Why an identity could not be made, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The data directory already holds an identity.
    #[error("{0} already holds an identity")]
    Exists(PathBuf),
    /// There is no identity in the data directory.
    #[error("no identity in {0} (run `concord init` first)")]
    Missing(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The key or certificate could not be generated or parsed.
    #[error("invalid identity: {0}")]
    Invalid(String),
}

/// A node's key pair and certificate.
#[derive(Clone)]
pub struct Identity {
    key_der: Vec<u8>,
    cert_der: Vec<u8>,
    node_id: NodeId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// The node id of a certificate: SHA-256 of its SubjectPublicKeyInfo.
pub fn node_id_of(cert_der: &[u8]) -> Result<NodeId, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::Invalid(format!("certificate: {e}")))?;
    Ok(node_id_of_spki(cert.tbs_certificate.subject_pki.raw))
}

/// The node id of a SubjectPublicKeyInfo (DER).
pub fn node_id_of_spki(spki_der: &[u8]) -> NodeId {
    NodeId::from_bytes(Sha256::digest(spki_der).into())
}

impl Identity {
    /// A new random identity.
    pub fn generate() -> Result<Self, IdentityError> {
        let invalid = |e: rcgen::Error| IdentityError::Invalid(e.to_string());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(invalid)?;
        let params = rcgen::CertificateParams::new(vec!["concord".to_string()]).map_err(invalid)?;
        let cert = params.self_signed(&key).map_err(invalid)?;
        Self::from_der(key.serialize_der(), cert.der().to_vec())
    }

    fn from_der(key_der: Vec<u8>, cert_der: Vec<u8>) -> Result<Self, IdentityError> {
        let node_id = node_id_of(&cert_der)?;
        Ok(Self {
            key_der,
            cert_der,
            node_id,
        })
    }

    /// The node id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The certificate, for TLS.
    pub fn certificate(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    /// The private key, for TLS.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes a new identity into `dir` (created if needed); refuses if one
    /// is there. The key file is readable by its owner only.
    pub fn create_in(dir: &Path) -> Result<Self, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            return Err(IdentityError::Exists(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let identity = Self::generate()?;
        write_new(&key_path, &identity.key_der, true)?;
        write_new(&dir.join(CERT_FILE), &identity.cert_der, false)?;
        Ok(identity)
    }

    /// Reads the identity kept in `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            return Err(IdentityError::Missing(dir.to_path_buf()));
        }
        let read = |path: PathBuf| {
            std::fs::read(&path).map_err(|source| IdentityError::Io { path, source })
        };
        let key_der = read(key_path)?;
        let cert_der = read(dir.join(CERT_FILE))?;
        let identity = Self::from_der(key_der, cert_der)?;
        // The certificate must belong to the key.
        let key = rcgen::KeyPair::try_from(identity.key_der.as_slice())
            .map_err(|e| IdentityError::Invalid(format!("key: {e}")))?;
        use rcgen::PublicKeyData;
        if node_id_of_spki(&key.subject_public_key_info()) != identity.node_id {
            return Err(IdentityError::Invalid(
                "the certificate does not match the key".into(),
            ));
        }
        Ok(identity)
    }
}

fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_round_trips_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let made = Identity::create_in(dir.path()).expect("create");
        assert!(matches!(
            Identity::create_in(dir.path()),
            Err(IdentityError::Exists(_))
        ));
        let loaded = Identity::load(dir.path()).expect("load");
        assert_eq!(made.node_id(), loaded.node_id());
        assert_eq!(made.node_id().to_string().len(), 52);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_ne!(
            Identity::generate().expect("other").node_id(),
            made.node_id()
        );
    }
}
