//! The handshake matrix, against a real node: every kind of bad client
//! certificate (and no certificate, and an unknown protocol) is refused,
//! nothing reaches the service behind the node, each refusal is counted and
//! logged with its own reason, and the peer learns no mesh name.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshnode_transport::alpn::Alpn;
use meshnode_transport::tunnel::{self, Header};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use time::OffsetDateTime;

use crate::{http_get, subnet, wait_until, NodeProc, NodeSpec, Pki, CLUSTER};

/// The client side trusts any server: only the server's checks are under test.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client credential: a chain (leaf first) and the leaf's key.
struct Cred {
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
}

/// Node-like leaf parameters, for the cases to bend.
fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::OrganizationName, "meshnode");
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, "node");
    p.distinguished_name.push(DnType::CommonName, "x");
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("uri")))
        .collect();
    p.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::hours(1);
    p.serial_number = Some(rcgen::SerialNumber::from(rand::random::<u64>()));
    p
}

/// Signs `params` with the CA saved in `ca_dir`.
fn signed_by(ca_dir: &std::path::Path, params: CertificateParams) -> Cred {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).expect("ca.pem");
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).expect("ca.key"))
            .expect("ca key");
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    Cred {
        chain: vec![cert.der().clone()],
        key,
    }
}

/// Dials `to` with `cred` (or none) and `alpn`, and tries one tunnel stream
/// to `echo`. Ok(()) only if the stream was accepted.
async fn attempt(to: SocketAddr, cred: Option<&Cred>, alpn: &[u8]) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut tls = match cred {
        Some(c) => builder
            .with_client_auth_cert(
                c.chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.serialize_der())),
            )
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let cfg = quinn::ClientConfig::new(Arc::new(quic));
    let ep =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    let work = async {
        let conn = ep
            .connect_with(cfg, to, "meshnode")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        tunnel::open(
            &mut send,
            &mut recv,
            &Header::new("echo", 0),
            Duration::from_secs(3),
        )
        .await
        .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(8), work)
        .await
        .map_err(|_| "timeout".to_string())?
}

/// What is tried, with which credential and ALPN, and the reasons it may be counted under.
type Case<'a> = (&'a str, Option<Cred>, &'a [u8], &'a [&'a str]);

fn refusals(metrics: &str, reason: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("meshnode_handshakes_refused_total{")
                && l.contains("side=\"server\"")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_client_certificate_is_refused_with_its_own_reason_and_nothing_reaches_the_service(
) {
    let pki = Pki::new();
    let net = subnet();
    let ca_dir = pki.dir.path().join("ca-files");
    pki.ca.save(&ca_dir).expect("save CA");
    // The backend counts every connection it gets; no health check dials it.
    let hits = Arc::new(AtomicUsize::new(0));
    let backend =
        tokio::net::TcpListener::bind((std::net::Ipv4Addr::new(127, net[0], net[1], 1), 0))
            .await
            .expect("backend");
    let backend_addr = backend.local_addr().expect("addr");
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = backend.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut spec = NodeSpec::new(net, 1, "node-1");
    spec.extra = format!(
        "\n[[service]]\nname = \"echo\"\naddress = \"{}\"\nport = {}\n",
        backend_addr.ip(),
        backend_addr.port()
    );
    let node = NodeProc::start(spec, &pki.issue(CLUSTER, "node-1"));
    assert!(
        wait_until(Duration::from_secs(15), || async {
            http_get(node.spec.admin, "/v1/health").await.is_some()
        })
        .await
        .is_some(),
        "node did not start"
    );
    let to = node.spec.quic;
    let tunnel = Alpn::Tunnel.as_bytes();
    let good_uri = "spiffe://acme/cluster/east/node/x";

    // The control: a proper certificate of the mesh gets through.
    let good = signed_by(&ca_dir, leaf_params(&[good_uri]));
    assert_eq!(
        attempt(to, Some(&good), tunnel).await,
        Ok(()),
        "the control must pass"
    );
    let reached = wait_until(Duration::from_secs(3), || async {
        hits.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(reached.is_some(), "the control reached the backend once");
    let control_hits = 1;

    let other_ca = Pki::new();
    let other_dir = other_ca.dir.path().join("ca-files");
    other_ca.ca.save(&other_dir).expect("save");
    let now = OffsetDateTime::now_utc();
    let mut expired = leaf_params(&[good_uri]);
    expired.not_before = now - time::Duration::hours(2);
    expired.not_after = now - time::Duration::hours(1);
    let mut not_yet = leaf_params(&[good_uri]);
    not_yet.not_before = now + time::Duration::hours(1);
    not_yet.not_after = now + time::Duration::hours(2);
    let mut ca_leaf = leaf_params(&[good_uri]);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    let mut server_only = leaf_params(&[good_uri]);
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // A real node certificate used as an intermediate for a leaf it signed.
    let node_cred = signed_by(&ca_dir, leaf_params(&["spiffe://acme/cluster/east/node/y"]));
    let node_issuer = Issuer::from_ca_cert_der(&node_cred.chain[0], node_cred.key).expect("issuer");
    let sub_key = KeyPair::generate().expect("key");
    let sub = leaf_params(&[good_uri])
        .signed_by(&sub_key, &node_issuer)
        .expect("sign");
    let via_node = Cred {
        chain: vec![sub.der().clone(), node_cred.chain[0].clone()],
        key: sub_key,
    };

    let cases: Vec<Case<'_>> = vec![
        (
            "no certificate on a tunnel",
            None,
            tunnel,
            &["no_certificate"],
        ),
        (
            "another CA",
            Some(signed_by(&other_dir, leaf_params(&[good_uri]))),
            tunnel,
            // Both CAs have the same subject, so webpki tries our CA's key on
            // its signature.
            &["unknown_ca", "bad_signature"],
        ),
        (
            "another mesh",
            Some(signed_by(
                &ca_dir,
                leaf_params(&["spiffe://globex/cluster/east/node/x"]),
            )),
            tunnel,
            &["other_mesh"],
        ),
        (
            "expired",
            Some(signed_by(&ca_dir, expired)),
            tunnel,
            &["expired"],
        ),
        (
            "not yet valid",
            Some(signed_by(&ca_dir, not_yet)),
            tunnel,
            &["not_yet_valid"],
        ),
        (
            "wrong SPIFFE path",
            Some(signed_by(
                &ca_dir,
                leaf_params(&["spiffe://acme/ns/east/sa/x"]),
            )),
            tunnel,
            &["bad_identity"],
        ),
        (
            "two URI SANs",
            Some(signed_by(
                &ca_dir,
                leaf_params(&[good_uri, "spiffe://acme/cluster/east/node/z"]),
            )),
            tunnel,
            &["bad_identity"],
        ),
        (
            "CA-flagged leaf",
            Some(signed_by(&ca_dir, ca_leaf)),
            tunnel,
            &["invalid", "malformed", "bad_identity"],
        ),
        (
            "a node certificate as intermediate",
            Some(via_node),
            tunnel,
            &["unknown_ca", "invalid", "bad_purpose"],
        ),
        (
            "serverAuth-only EKU",
            Some(signed_by(&ca_dir, server_only)),
            tunnel,
            &["bad_purpose"],
        ),
        (
            "unknown ALPN",
            Some(signed_by(&ca_dir, leaf_params(&[good_uri]))),
            b"h3",
            &["alpn"],
        ),
    ];
    let mut seen = Vec::new();
    for (what, cred, alpn, reasons) in cases {
        let before = http_get(node.spec.admin, "/metrics")
            .await
            .unwrap_or_default();
        let result = attempt(to, cred.as_ref(), alpn).await;
        let err = match result {
            Ok(()) => panic!("{what}: accepted"),
            Err(e) => e,
        };
        assert!(
            !err.contains("acme"),
            "{what}: the peer learnt the mesh name: {err}"
        );
        let counted = wait_until(Duration::from_secs(3), || async {
            let after = http_get(node.spec.admin, "/metrics")
                .await
                .unwrap_or_default();
            reasons
                .iter()
                .any(|r| refusals(&after, r) > refusals(&before, r))
        })
        .await;
        assert!(
            counted.is_some(),
            "{what}: none of {reasons:?} counted (client saw {err})"
        );
        seen.push(format!("{what}: {err}"));
    }
    // Give a wrongly admitted stream time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        control_hits,
        "a refused peer reached the backend"
    );
    let log = node.log_text();
    for reason in [
        "no_certificate",
        "bad_signature",
        "other_mesh",
        "expired",
        "not_yet_valid",
        "bad_identity",
        "bad_purpose",
        "alpn",
    ] {
        // Colour codes may sit between the field name and its value.
        let line = log
            .lines()
            .find(|l| l.contains("refused") && l.contains(&format!("\"{reason}\"")));
        assert!(line.is_some(), "no log line for {reason}");
    }
    eprintln!("what each refused client saw:\n  {}", seen.join("\n  "));
}
