//! ctk's transport: identities (a key and a self-signed certificate each), pinning by
//! certificate fingerprint (SSH's known_hosts, not a CA), QUIC endpoints over quinn and
//! rustls (TLS 1.3, mutual authentication, ALPN `ctk/2`), and framing of `ctk::wire`
//! messages. Both binaries use it; `ctk` itself opens no socket.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DistinguishedName, SignatureScheme};

pub mod local;
pub mod log;
pub mod service;

pub use bytes::Bytes;
pub use ctk::wire;

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a certificate fingerprint: use sha256:<64 hex digits> (as `init` prints)")]
    BadFingerprint(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("connecting to {addr}: {why}")]
    Connect { addr: SocketAddr, why: String },
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

type Result<T, E = NetError> = std::result::Result<T, E>;

fn io(doing: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let doing = doing.into();
    move |source| NetError::Io { doing, source }
}

/// SHA-256 of a certificate's DER bytes: what each side pins of the other.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert);
        Fingerprint(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Fingerprint> {
        let bad = || NetError::BadFingerprint(s.chars().take(80).collect());
        let hex = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// A key and its self-signed certificate.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// A new identity (ECDSA P-256); `name` goes into the certificate for humans only.
    pub fn generate(name: &str) -> Result<Identity> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()])
            .map_err(|e| NetError::Tls(format!("generating a certificate: {e}")))?;
        Ok(Identity {
            cert: ck.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()),
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// The identity in `dir`: the one already there (its fingerprint is what peers pinned,
    /// so it is never replaced), or a new one, generated and saved. Says which.
    pub fn init(dir: &Path, name: &str) -> Result<(Identity, bool)> {
        if dir.join("cert.der").exists() || dir.join("key.der").exists() {
            return Ok((Identity::load(dir)?, false));
        }
        let id = Identity::generate(name)?;
        id.save(dir)?;
        Ok((id, true))
    }

    /// Writes `cert.der` and `key.der` (owner-only) into `dir`, refusing to overwrite.
    pub fn save(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        for (name, bytes, mode) in [
            ("key.der", self.key.secret_pkcs8_der(), 0o600),
            ("cert.der", self.cert.as_ref(), 0o644),
        ] {
            let path = dir.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(io(format!(
                    "creating {} (an identity is never overwritten)",
                    path.display()
                )))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .map_err(io(format!("writing {}", path.display())))?;
        }
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(io(format!(
                "reading {} (create an identity with `init`)",
                path.display()
            )))
        };
        Ok(Identity {
            cert: CertificateDer::from(read("cert.der")?),
            key: PrivatePkcs8KeyDer::from(read("key.der")?),
        })
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verify13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// The agent's check of the receiver: its certificate must be the pinned one. The
/// handshake signature is still verified, so only the holder of the key passes.
#[derive(Debug)]
struct PinnedServer {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        if got == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the receiver's certificate is {got}, not the pinned {}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only.
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The receiver's check of agents: a certificate on the allow-list, proven by its key.
#[derive(Debug)]
struct AllowedAgents {
    allowed: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AllowedAgents {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        if self.allowed.contains(&got) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(fingerprint = %got, "refused an agent that is not on the allow-list");
            Err(rustls::Error::General(format!(
                "agent certificate {got} is not on the allow-list"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Both ends: keep-alives every 2 s, so a connection waiting on a long merge stays up, and a
/// 10 s idle timeout, so a peer that died (a SIGKILLed agent sends no close) is noticed and
/// its half-sent push released soon.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)).expect("in range"),
    ));
    t
}

/// A receiver's endpoint: serves agents whose certificates are in `allowed`.
pub fn server_endpoint(
    identity: &Identity,
    allowed: Vec<Fingerprint>,
    addr: SocketAddr,
) -> Result<quinn::Endpoint> {
    let provider = provider();
    let verifier = Arc::new(AllowedAgents {
        allowed,
        provider: provider.clone(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key())
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport()));
    quinn::Endpoint::server(config, addr).map_err(io(format!("listening on {addr}")))
}

/// Connects an agent to the receiver at `addr` whose certificate must be `pinned`.
pub async fn connect(
    identity: &Identity,
    addr: SocketAddr,
    pinned: Fingerprint,
) -> Result<quinn::Connection> {
    let provider = provider();
    let verifier = Arc::new(PinnedServer {
        expected: pinned,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key())
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let mut endpoint = quinn::Endpoint::client(local).map_err(io("opening a UDP socket"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport()));
    endpoint.set_default_client_config(config);
    let fail = |why: String| NetError::Connect { addr, why };
    endpoint
        .connect(addr, "ctk-receiver")
        .map_err(|e| fail(e.to_string()))?
        .await
        .map_err(|e| fail(e.to_string()))
}

/// The fingerprint of the peer's certificate on an established connection.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    certs.first().map(|c| Fingerprint::of(c))
}

/// An error and its sources, as one line: quinn's "connection lost" says why only in its
/// source (for example the receiver's refusal of an unknown agent).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Writes one frame: a `u32` little-endian length, then the bytes.
pub async fn write_frame(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<()> {
    if bytes.len() > wire::FRAME_MAX {
        return Err(wire::WireError::TooLarge(bytes.len()).into());
    }
    send.write_all(&(bytes.len() as u32).to_le_bytes())
        .await
        .map_err(|e| NetError::Protocol(format!("sending a frame: {}", chain(&e))))?;
    send.write_all(bytes)
        .await
        .map_err(|e| NetError::Protocol(format!("sending a frame: {}", chain(&e))))
}

/// Sends one chunk of a pushed delta (1 to `CHUNK_MAX` bytes; see `ctk::wire`). The bytes
/// are handed to quinn without a copy.
pub async fn write_chunk(send: &mut quinn::SendStream, chunk: bytes::Bytes) -> Result<()> {
    if chunk.is_empty() || chunk.len() > wire::CHUNK_MAX {
        return Err(NetError::Protocol(format!(
            "a delta chunk of {} bytes (1 to {} allowed)",
            chunk.len(),
            wire::CHUNK_MAX
        )));
    }
    send.write_all(&(chunk.len() as u32).to_le_bytes())
        .await
        .map_err(|e| NetError::Protocol(format!("sending the delta: {}", chain(&e))))?;
    send.write_chunk(chunk)
        .await
        .map_err(|e| NetError::Protocol(format!("sending the delta: {}", chain(&e))))
}

/// Ends the chunks of a pushed delta.
pub async fn end_chunks(send: &mut quinn::SendStream) -> Result<()> {
    send.write_all(&0u32.to_le_bytes())
        .await
        .map_err(|e| NetError::Protocol(format!("ending the delta: {}", chain(&e))))
}

/// Reads one frame, refusing a length over `FRAME_MAX` before allocating anything.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| NetError::Protocol(format!("reading a frame length: {}", chain(&e))))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > wire::FRAME_MAX {
        return Err(wire::WireError::TooLarge(len).into());
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| NetError::Protocol(format!("reading a frame: {}", chain(&e))))?;
    Ok(buf)
}

/// Reads chunks (as `write_chunk` sends them) up to the zero length, expecting exactly
/// `expected` bytes in all: more, fewer, or a chunk over `CHUNK_MAX` is an error, and
/// nothing beyond `expected` is ever allocated (the caller bounds `expected`).
pub async fn read_chunks(recv: &mut quinn::RecvStream, expected: usize) -> Result<Vec<u8>> {
    let bad = |why: String| NetError::Protocol(why);
    let mut out = Vec::with_capacity(expected);
    loop {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len)
            .await
            .map_err(|e| bad(format!("reading a chunk length: {}", chain(&e))))?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 {
            break;
        }
        if len > wire::CHUNK_MAX || out.len() + len > expected {
            return Err(bad(format!(
                "a chunk of {len} bytes after {} of {expected} expected",
                out.len()
            )));
        }
        let at = out.len();
        out.resize(at + len, 0);
        recv.read_exact(&mut out[at..])
            .await
            .map_err(|e| bad(format!("reading a chunk: {}", chain(&e))))?;
    }
    if out.len() != expected {
        return Err(bad(format!(
            "the chunks held {} bytes, {expected} expected",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip_and_garbage_is_refused() {
        let id = Identity::generate("t").unwrap();
        let fp = id.fingerprint();
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        let bare = fp.to_string()["sha256:".len()..].to_string();
        assert_eq!(bare.parse::<Fingerprint>().unwrap(), fp);
        for bad in ["", "sha256:", "sha256:zz", &"g".repeat(64), &"a".repeat(63)] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn init_twice_keeps_the_first_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = Identity::init(dir.path(), "x").unwrap();
        assert!(created);
        let (b, created) = Identity::init(dir.path(), "x").unwrap();
        assert!(!created);
        assert_eq!(a.fingerprint(), b.fingerprint());
        // Half an identity is an error, not a reason to make a new one.
        std::fs::remove_file(dir.path().join("key.der")).unwrap();
        assert!(Identity::init(dir.path(), "x").is_err());
    }

    #[test]
    fn identities_save_load_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate("t").unwrap();
        id.save(dir.path()).unwrap();
        assert_eq!(
            Identity::load(dir.path()).unwrap().fingerprint(),
            id.fingerprint()
        );
        assert!(Identity::generate("u").unwrap().save(dir.path()).is_err());
    }
}
