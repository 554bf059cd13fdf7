//! A CA node: holds the mesh CA key, keeps join tokens (only the public half
//! of each token's key) and a log of what it issued, signs joins and renewals, and makes
//! signed revocations. State lives in `<data_dir>/ca/` (0700) and survives
//! restarts; every change is written atomically before it is acted on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use meshnode_transport::join::{Refusal, Request, Response};
use meshnode_transport::pki::revocation::{Revocation, SignedRevocation};
use meshnode_transport::pki::token::{proof_input, verify_proof, Token};
use meshnode_transport::pki::{
    check_name, csr_key_id, unix_now, write_atomic, Ca, Identity, PkiError, DEFAULT_NODE_VALIDITY,
};
use meshnode_transport::tls::TlsMaterial;
use meshnode_transport::{PeerCert, Role};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::config::CaSettings;

const TOKENS_FILE: &str = "tokens.json";
const ISSUED_FILE: &str = "issued.json";
/// Longest TTL and most uses a token may have.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const MAX_TOKEN_USES: u32 = 1000;

pub struct CaNode {
    ca: Ca,
    fingerprint: [u8; 32],
    cert_ttl: Duration,
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    tokens: BTreeMap<String, TokenRecord>,
    issued: Vec<IssuedRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex Ed25519 public key of the token's key; the secret (its private
    /// half) is never stored here and never travels. Empty for tokens of an
    /// older meshnode, which can no longer be used.
    #[serde(default)]
    pub public_key: String,
    pub expires: u64,
    pub uses_left: u32,
    pub cluster: Option<String>,
    pub gateway: bool,
    pub created: i64,
    /// Services the joined node may act as (its certificate names them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub identity: String,
    pub serial: String,
    pub key_id: String,
    pub not_after: i64,
    /// Unix seconds; 0 in records of an older meshnode.
    #[serde(default)]
    pub not_before: i64,
    #[serde(default)]
    pub role: Option<Role>,
    pub issued_at: i64,
    /// `join` or `renew`.
    pub how: String,
}

/// Whom a certificate is for: the name, the role and the services it may act as.
struct Subject<'a> {
    identity: &'a Identity,
    role: Role,
    services: &'a [String],
}

/// The fields of a join request.
struct JoinAsk<'a> {
    token_id: &'a [u8; 16],
    proof: &'a [u8],
    csr: &'a [u8],
    node: &'a str,
    cluster: Option<&'a str>,
}

/// What the handling node knows of its own pool, for the name check and seeds.
pub struct PoolView {
    pub cluster: String,
    /// Live members' node names.
    pub live: Vec<String>,
    /// Live members' QUIC addresses.
    pub addrs: Vec<std::net::SocketAddr>,
    /// Certificates (DER) of every member the pool knows, live or not: with
    /// this node's own issuance log, what the one-identity-one-key rule sees.
    pub certs: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Pki(#[from] PkiError),
    #[error("cannot use CA state directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("CA state file {path} is damaged: {reason}")]
    State { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Revocation(#[from] meshnode_transport::pki::revocation::RevocationError),
}

impl CaNode {
    /// Loads the CA key and the persisted state from `<data_dir>/ca/`.
    pub fn open(settings: &CaSettings, ca_cert: &Path, data_dir: &Path) -> Result<Self, CaError> {
        let ca = Ca::load_files(ca_cert, &settings.key)?;
        let fingerprint = ca.fingerprint()?;
        let dir = data_dir.join("ca");
        create_private_dir(&dir)?;
        let state = State {
            tokens: load_json(&dir.join(TOKENS_FILE))?,
            issued: load_json(&dir.join(ISSUED_FILE))?,
        };
        Ok(Self {
            ca,
            fingerprint,
            cert_ttl: settings.cert_ttl,
            dir,
            state: Mutex::new(state),
        })
    }

    /// The `role:ca` proof for `node_id` (its SPIFFE ID): the CA key's
    /// signature, which only a holder of the CA key can make.
    pub fn sign_role(&self, node_id: &str) -> Result<String, CaError> {
        let sig = self
            .ca
            .sign(&meshnode_gossip::signed::ca_role_input(node_id))?;
        Ok(meshnode_gossip::signed::encode_ca_proof(&sig))
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the state before the caller acts on a change.
    fn persist(&self, state: &State) -> Result<(), CaError> {
        let now = unix_now();
        let tokens = serde_json::to_vec_pretty(&state.tokens)
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        write_atomic(&self.dir.join(TOKENS_FILE), &tokens, 0o600)?;
        let issued: Vec<&IssuedRecord> = state
            .issued
            .iter()
            .filter(|r| r.not_after > now - 24 * 3600)
            .collect();
        let issued =
            serde_json::to_vec_pretty(&issued).map_err(|e| CaError::Invalid(e.to_string()))?;
        write_atomic(&self.dir.join(ISSUED_FILE), &issued, 0o600)?;
        Ok(())
    }

    /// Makes a join token. Only the public half of its key is kept.
    pub fn create_token(
        &self,
        ttl: Duration,
        uses: u32,
        cluster: Option<String>,
        gateway: bool,
        services: &[String],
    ) -> Result<Token, CaError> {
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(CaError::Invalid(format!(
                "ttl must be between 1s and {}",
                humantime::format_duration(MAX_TOKEN_TTL)
            )));
        }
        if uses == 0 || uses > MAX_TOKEN_USES {
            return Err(CaError::Invalid(format!(
                "uses must be between 1 and {MAX_TOKEN_USES}"
            )));
        }
        if let Some(c) = &cluster {
            check_name("cluster", c).map_err(|e| CaError::Invalid(e.to_string()))?;
        }
        let services = meshnode_transport::pki::check_services(services)
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        let now = unix_now();
        let token = Token::generate(self.fingerprint, (now as u64).saturating_add(ttl.as_secs()));
        let public_key = token
            .public_key_hex()
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        let mut state = self.lock();
        let now_u = now as u64;
        state.tokens.retain(|_, t| t.expires > now_u);
        state.tokens.insert(
            token.id_hex(),
            TokenRecord {
                public_key,
                expires: token.expires,
                uses_left: uses,
                cluster: cluster.clone(),
                gateway,
                created: now,
                services: services.clone(),
            },
        );
        self.persist(&state)?;
        info!(token = %token.id_hex(), ttl = %humantime::format_duration(ttl), uses, ?cluster, gateway, ?services, "join token created");
        Ok(token)
    }

    /// Answers a join or renewal request. `pool` is the handling node's view
    /// of its own cluster; `tls` gives the revocations and the chain check.
    pub fn handle(&self, req: &Request, pool: &PoolView, tls: &TlsMaterial) -> Response {
        match req {
            Request::Join {
                token_id,
                proof,
                csr,
                node,
                cluster,
            } => self.join(
                JoinAsk {
                    token_id,
                    proof,
                    csr,
                    node,
                    cluster: cluster.as_deref(),
                },
                pool,
                tls,
            ),
            Request::Renew { cert, csr } => self.renew(cert, csr, tls),
        }
    }

    fn join(&self, ask: JoinAsk<'_>, pool: &PoolView, tls: &TlsMaterial) -> Response {
        let JoinAsk {
            token_id,
            proof,
            csr,
            node,
            cluster,
        } = ask;
        if let Err(e) = check_name("node", node) {
            return Response::refused(Refusal::Malformed, e.to_string());
        }
        let now = unix_now();
        let mut state = self.lock();
        let id = meshnode_transport::pki::hex(token_id);
        let Some(record) = state.tokens.get(&id).cloned() else {
            return Response::refused(
                Refusal::BadToken,
                "unknown token (never issued by this CA, or expired and removed)",
            );
        };
        if record.public_key.is_empty() {
            return Response::refused(
                Refusal::BadToken,
                "the token was made by an older meshnode; create a new one",
            );
        }
        let input = proof_input(&self.fingerprint, token_id, csr, node, cluster);
        if !verify_proof(&record.public_key, &input, proof) {
            return Response::refused(
                Refusal::BadToken,
                "the token proof does not match this request (wrong token, or the request was altered)",
            );
        }
        if record.expires <= now as u64 {
            return Response::refused(
                Refusal::Expired,
                format!("the token expired {}s ago", now as u64 - record.expires),
            );
        }
        if record.uses_left == 0 {
            return Response::refused(Refusal::UsedUp, "the token has been used up");
        }
        let cluster = match (record.cluster.as_deref(), cluster) {
            (Some(t), Some(r)) if t != r => {
                return Response::refused(
                    Refusal::Malformed,
                    format!("the token is for cluster {t:?}, not {r:?}"),
                )
            }
            (Some(t), _) => t.to_string(),
            (None, Some(r)) => r.to_string(),
            (None, None) => pool.cluster.clone(),
        };
        if pool.cluster == cluster && pool.live.iter().any(|n| n == node) {
            return Response::refused(
                Refusal::NameTaken,
                format!("node name {node:?} is taken by a live member of cluster {cluster:?}; choose another with --node"),
            );
        }
        let identity = match Identity::new(self.ca.mesh(), &cluster, node) {
            Ok(i) => i,
            Err(e) => return Response::refused(Refusal::Malformed, e.to_string()),
        };
        let role = if record.gateway {
            Role::Gateway
        } else {
            Role::Node
        };
        let key_id = match csr_key_id(csr) {
            Ok(k) => k,
            Err(e) => return Response::refused(Refusal::Malformed, e.to_string()),
        };
        if let Some(holder) = self.holder_of(&identity, &key_id, &state, pool, tls, now) {
            return Response::refused(
                Refusal::NameTaken,
                format!(
                    "{identity} already has a certificate for another key (serial {}, valid for {} more); \
                     to replace that machine, revoke it first on a CA node: \
                     `meshnode cert revoke --node {node} --cluster {cluster}`",
                    holder.serial,
                    humantime::format_duration(Duration::from_secs(
                        holder.not_after.saturating_sub(now).max(0) as u64
                    )),
                ),
            );
        }
        let floor = tls.revocations().identity_revoked_at(&identity);
        let subject = Subject {
            identity: &identity,
            role,
            services: &record.services,
        };
        let issued = match self.sign(csr, &subject, floor, "join", &mut state) {
            Ok(i) => i,
            Err(r) => return r,
        };
        if let Some(t) = state.tokens.get_mut(&id) {
            t.uses_left -= 1;
        }
        if let Err(e) = self.persist(&state) {
            return Response::refused(Refusal::Internal, e.to_string());
        }
        info!(%identity, token = %id, "node joined");
        Response::Issued {
            cert_pem: issued,
            ca_pem: self.ca.cert_pem().to_string(),
            identity: identity.to_string(),
            seeds: if pool.cluster == cluster {
                pool.addrs.clone()
            } else {
                Vec::new()
            },
        }
    }

    /// One identity, one key: an unexpired, unrevoked certificate of
    /// `identity` for another key than `key_id`, from this node's issuance
    /// log or from the certificates its pool carries (so one issued by
    /// another CA node, or offline, counts too).
    fn holder_of(
        &self,
        identity: &Identity,
        key_id: &str,
        state: &State,
        pool: &PoolView,
        tls: &TlsMaterial,
        now: i64,
    ) -> Option<PeerCert> {
        let name = identity.to_string();
        let logged = state
            .issued
            .iter()
            .filter(|r| r.identity == name && r.not_after > now && r.key_id != key_id)
            .map(|r| PeerCert {
                identity: identity.clone(),
                role: r.role.unwrap_or(Role::Node),
                not_after: r.not_after,
                not_before: r.not_before,
                key_id: r.key_id.clone(),
                serial: r.serial.clone(),
                services: Vec::new(),
            });
        let mut found = logged.filter(|p| !tls.revocations().is_revoked(p));
        if let Some(p) = found.next() {
            return Some(p);
        }
        // Parsing is cheap; the chain check (`verify_peer`: chain, validity,
        // revocations) runs only on certificates of this identity.
        pool.certs
            .iter()
            .filter(|der| {
                PeerCert::from_der(der).is_ok_and(|p| p.identity == *identity && p.key_id != key_id)
            })
            .find_map(|der| tls.verify_peer(der).ok())
    }

    fn renew(&self, cert: &[u8], csr: &[u8], tls: &TlsMaterial) -> Response {
        let current = match tls.verify_peer(cert) {
            Ok(p) => p,
            Err(e) => {
                let revoked =
                    PeerCert::from_der(cert).is_ok_and(|p| tls.revocations().is_revoked(&p));
                let reason = if revoked {
                    Refusal::Revoked
                } else {
                    Refusal::Malformed
                };
                return Response::refused(
                    reason,
                    format!("the current certificate is not valid: {e}"),
                );
            }
        };
        match csr_key_id(csr) {
            Ok(k) if k == current.key_id => {}
            Ok(_) => {
                return Response::refused(
                    Refusal::Malformed,
                    "the signing request is not for the current certificate's key",
                )
            }
            Err(e) => return Response::refused(Refusal::Malformed, e.to_string()),
        }
        let mut state = self.lock();
        let subject = Subject {
            identity: &current.identity,
            role: current.role,
            services: &current.services,
        };
        let issued = match self.sign(csr, &subject, None, "renew", &mut state) {
            Ok(i) => i,
            Err(r) => return r,
        };
        if let Err(e) = self.persist(&state) {
            return Response::refused(Refusal::Internal, e.to_string());
        }
        info!(identity = %current.identity, "certificate renewed");
        Response::Issued {
            cert_pem: issued,
            ca_pem: self.ca.cert_pem().to_string(),
            identity: current.identity.to_string(),
            seeds: Vec::new(),
        }
    }

    fn sign(
        &self,
        csr: &[u8],
        subject: &Subject<'_>,
        floor: Option<i64>,
        how: &str,
        state: &mut State,
    ) -> Result<String, Response> {
        // A certificate for a revoked identity starts after the revocation's
        // second; right after a revocation that second may not have begun,
        // and the certificate would not be valid yet when it arrives. Rare
        // (an operator just replaced this identity) and under a second.
        if let Some(floor) = floor {
            let start = std::time::UNIX_EPOCH + Duration::from_secs((floor.max(0) as u64) + 1);
            if let Ok(wait) = start.duration_since(meshnode_transport::clock::wall()) {
                std::thread::sleep(wait.min(Duration::from_secs(2)));
            }
        }
        let pem = self
            .ca
            .sign_csr(
                csr,
                subject.identity,
                subject.role,
                subject.services,
                self.cert_ttl,
                floor,
            )
            .map_err(|e| Response::refused(Refusal::Malformed, e.to_string()))?;
        let peer = PeerCert::from_pem(&pem)
            .map_err(|e| Response::refused(Refusal::Internal, e.to_string()))?;
        state.issued.push(IssuedRecord {
            identity: subject.identity.to_string(),
            serial: peer.serial,
            key_id: peer.key_id,
            not_after: peer.not_after,
            not_before: peer.not_before,
            role: Some(peer.role),
            issued_at: unix_now(),
            how: how.to_string(),
        });
        Ok(pem)
    }

    /// A signed revocation of every certificate this CA issued to `identity`
    /// (and of the identity itself, for certificates issued offline), or of
    /// the certificate with `serial`.
    pub fn revoke(
        &self,
        identity: Option<&Identity>,
        serial: Option<&str>,
        reason: &str,
    ) -> Result<SignedRevocation, CaError> {
        let now = unix_now();
        let state = self.lock();
        let serial = serial.map(|s| s.trim().trim_start_matches("0x").to_ascii_lowercase());
        let matched: Vec<&IssuedRecord> = state
            .issued
            .iter()
            .filter(|r| {
                identity.is_some_and(|i| r.identity == i.to_string())
                    || serial
                        .as_deref()
                        .is_some_and(|s| strip_zeros(&r.serial) == strip_zeros(s))
            })
            .collect();
        if identity.is_none() && matched.is_empty() {
            return Err(CaError::Invalid(
                "no certificate with that serial was issued by this CA node".into(),
            ));
        }
        let mut keys: Vec<String> = matched.iter().map(|r| r.key_id.clone()).collect();
        keys.sort();
        keys.dedup();
        let last = matched.iter().map(|r| r.not_after).max().unwrap_or(now);
        // An identity revocation must outlive any certificate of that name,
        // including year-long ones issued offline.
        let expires = if identity.is_some() {
            last.max(now + DEFAULT_NODE_VALIDITY.as_secs() as i64)
        } else {
            last
        };
        let revocation = Revocation {
            mesh: self.ca.mesh().to_string(),
            identity: identity.cloned(),
            keys,
            serials: matched.iter().map(|r| r.serial.clone()).collect(),
            revoked_at: now,
            expires,
            reason: reason.to_string(),
        };
        let signed = SignedRevocation::sign(&self.ca, revocation)?;
        info!(id = %signed.id(), identity = ?identity.map(|i| i.to_string()), keys = signed.revocation.keys.len(), "revocation signed");
        Ok(signed)
    }

    /// A signed revocation of one certificate given whole (PEM): any
    /// certificate this CA signed, including operators' and node
    /// certificates issued offline, which no issuance log holds. An
    /// operator's entry outlives its certificate by 400 days: documents its
    /// key signed after the revocation stay refused that long.
    pub fn revoke_certificate(
        &self,
        cert_pem: &str,
        reason: &str,
    ) -> Result<SignedRevocation, CaError> {
        let der = meshnode_transport::pki::first_cert_der(cert_pem)
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        let k = self
            .ca
            .issued_key(&der)
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        let now = unix_now();
        let expires = if k.operator {
            k.not_after + OPERATOR_REVOCATION_MARGIN_SECS
        } else {
            k.not_after
        };
        let revocation = Revocation {
            mesh: self.ca.mesh().to_string(),
            identity: None,
            keys: vec![k.key_id],
            serials: vec![k.serial],
            revoked_at: now,
            expires: expires.max(now + 1),
            reason: reason.to_string(),
        };
        let signed = SignedRevocation::sign(&self.ca, revocation)?;
        info!(id = %signed.id(), operator = k.operator, "revocation of a certificate signed");
        Ok(signed)
    }

    /// Whether this CA node's issuance log holds a certificate of `identity`.
    pub fn has_issued(&self, identity: &Identity) -> bool {
        let id = identity.to_string();
        self.lock().issued.iter().any(|r| r.identity == id)
    }

    /// Token records, for the admin API (no secrets in them).
    pub fn tokens(&self) -> BTreeMap<String, TokenRecord> {
        self.lock().tokens.clone()
    }
}

/// How long an operator key's revocation outlives its certificate.
pub const OPERATOR_REVOCATION_MARGIN_SECS: i64 = 400 * 86_400;

fn strip_zeros(s: &str) -> &str {
    s.trim_start_matches('0')
}

/// A JSON state file, or the default when it does not exist yet.
fn load_json<T: Default + serde::de::DeserializeOwned>(path: &Path) -> Result<T, CaError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CaError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(CaError::Dir {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| CaError::Dir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

#[cfg(test)]
mod tests {
    use meshnode_transport::pki::join::NodeKey;
    use meshnode_transport::pki::DEFAULT_CA_VALIDITY;

    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
        ca_node: CaNode,
        tls: TlsMaterial,
        settings: CaSettings,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("acme", DEFAULT_CA_VALIDITY).unwrap();
        ca.save(&dir.path().join("pki")).unwrap();
        let me = ca
            .issue("east", "ca-1", Role::Node, Duration::from_secs(3600))
            .unwrap();
        let tls = TlsMaterial::from_pem(ca.cert_pem(), &me.cert_pem, &me.key_pem).unwrap();
        let settings = CaSettings {
            key: dir.path().join("pki/ca.key"),
            cert_ttl: Duration::from_secs(600),
        };
        let ca_node = CaNode::open(&settings, &dir.path().join("pki/ca.pem"), dir.path()).unwrap();
        Fixture {
            dir,
            ca_node,
            tls,
            settings,
        }
    }

    fn pool() -> PoolView {
        PoolView {
            cluster: "east".into(),
            live: vec!["ca-1".into(), "busy".into()],
            addrs: vec!["127.0.0.1:9470".parse().unwrap()],
            certs: Vec::new(),
        }
    }

    fn join_req(token: &Token, node: &str) -> Request {
        join_req_with(token, node, None, &NodeKey::generate().unwrap())
    }

    fn join_req_with(token: &Token, node: &str, cluster: Option<&str>, key: &NodeKey) -> Request {
        let csr = key.csr(node).unwrap();
        Request::Join {
            token_id: token.id,
            proof: token.prove(&csr, node, cluster).unwrap(),
            csr,
            node: node.into(),
            cluster: cluster.map(str::to_string),
        }
    }

    fn refusal(r: Response) -> Refusal {
        match r {
            Response::Refused { reason, .. } => reason,
            Response::Issued { identity, .. } => panic!("issued {identity}"),
        }
    }

    #[test]
    fn tokens_are_enforced_and_persisted() {
        let f = fixture();
        let t = f
            .ca_node
            .create_token(Duration::from_secs(60), 1, None, false, &[])
            .unwrap();
        // Only the public key is on disk.
        let stored = std::fs::read_to_string(f.dir.path().join("ca/tokens.json")).unwrap();
        assert!(stored.contains(&t.public_key_hex().unwrap()));
        assert!(!stored.contains(&meshnode_transport::pki::hex(&t.seed)));
        // A wrong secret, a token of another CA, a taken name.
        let mut wrong = t.clone();
        wrong.seed[0] ^= 1;
        assert_eq!(
            refusal(f.ca_node.handle(&join_req(&wrong, "vm-1"), &pool(), &f.tls)),
            Refusal::BadToken
        );
        let mut foreign = t.clone();
        foreign.ca_fingerprint[0] ^= 1;
        assert_eq!(
            refusal(
                f.ca_node
                    .handle(&join_req(&foreign, "vm-1"), &pool(), &f.tls)
            ),
            Refusal::BadToken
        );
        assert_eq!(
            refusal(f.ca_node.handle(&join_req(&t, "busy"), &pool(), &f.tls)),
            Refusal::NameTaken
        );
        // Refusals did not consume the token; the first good use does.
        match f.ca_node.handle(&join_req(&t, "vm-1"), &pool(), &f.tls) {
            Response::Issued {
                identity, seeds, ..
            } => {
                assert_eq!(identity, "spiffe://acme/cluster/east/node/vm-1");
                assert_eq!(seeds.len(), 1);
            }
            r => panic!("{r:?}"),
        }
        // Used up, also after a restart of the CA node.
        let reopened =
            CaNode::open(&f.settings, &f.dir.path().join("pki/ca.pem"), f.dir.path()).unwrap();
        assert_eq!(
            refusal(reopened.handle(&join_req(&t, "vm-2"), &pool(), &f.tls)),
            Refusal::UsedUp
        );
        // Expired (the store is authoritative, whatever the token claims).
        let t2 = reopened
            .create_token(Duration::from_secs(60), 5, None, false, &[])
            .unwrap();
        reopened
            .lock()
            .tokens
            .get_mut(&t2.id_hex())
            .unwrap()
            .expires = 1;
        assert_eq!(
            refusal(reopened.handle(&join_req(&t2, "vm-3"), &pool(), &f.tls)),
            Refusal::Expired
        );
        // Bounds.
        assert!(reopened
            .create_token(Duration::ZERO, 1, None, false, &[])
            .is_err());
        assert!(reopened
            .create_token(Duration::from_secs(60), 0, None, false, &[])
            .is_err());
        assert!(reopened
            .create_token(
                Duration::from_secs(60),
                1,
                Some("bad name".into()),
                false,
                &[]
            )
            .is_err());
    }

    #[test]
    fn cluster_pinned_tokens_and_gateway_tokens() {
        let f = fixture();
        let t = f
            .ca_node
            .create_token(Duration::from_secs(60), 3, Some("west".into()), true, &[])
            .unwrap();
        let key = NodeKey::generate().unwrap();
        let req = join_req_with(&t, "gw-1", Some("east"), &key);
        assert_eq!(
            refusal(f.ca_node.handle(&req, &pool(), &f.tls)),
            Refusal::Malformed
        );
        match f.ca_node.handle(&join_req(&t, "busy"), &pool(), &f.tls) {
            // "busy" is taken in east, not in west; no east seeds for a west node.
            Response::Issued {
                cert_pem, seeds, ..
            } => {
                let p = PeerCert::from_pem(&cert_pem).unwrap();
                assert_eq!(p.identity.cluster(), "west");
                assert!(p.is_gateway());
                assert!(seeds.is_empty());
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_tokens_services_are_in_the_joined_certificate_and_kept_at_renewal() {
        let f = fixture();
        let svc = vec!["web".to_string()];
        let t = f
            .ca_node
            .create_token(Duration::from_secs(60), 1, None, false, &svc)
            .unwrap();
        let key = NodeKey::generate().unwrap();
        let Response::Issued { cert_pem, .. } =
            f.ca_node
                .handle(&join_req_with(&t, "vm-1", None, &key), &pool(), &f.tls)
        else {
            panic!("join failed")
        };
        assert_eq!(PeerCert::from_pem(&cert_pem).unwrap().services, svc);
        let cert = meshnode_transport::pki::first_cert_der(&cert_pem).unwrap();
        let renew = Request::Renew {
            cert,
            csr: key.csr("vm-1").unwrap(),
        };
        let Response::Issued { cert_pem, .. } = f.ca_node.handle(&renew, &pool(), &f.tls) else {
            panic!("renewal failed")
        };
        assert_eq!(PeerCert::from_pem(&cert_pem).unwrap().services, svc);
        // Bad names are refused when the token is made, not at join.
        assert!(f
            .ca_node
            .create_token(Duration::from_secs(60), 1, None, false, &["a b".into()])
            .is_err());
    }

    #[test]
    fn renewal_needs_a_valid_certificate_and_the_same_key() {
        let f = fixture();
        let t = f
            .ca_node
            .create_token(Duration::from_secs(60), 1, None, false, &[])
            .unwrap();
        let key = NodeKey::generate().unwrap();
        let req = join_req_with(&t, "vm-1", None, &key);
        let Response::Issued { cert_pem, .. } = f.ca_node.handle(&req, &pool(), &f.tls) else {
            panic!("join failed")
        };
        let cert = meshnode_transport::pki::first_cert_der(&cert_pem).unwrap();
        let renew = |csr: Vec<u8>| Request::Renew {
            cert: cert.clone(),
            csr,
        };
        match f
            .ca_node
            .handle(&renew(key.csr("vm-1").unwrap()), &pool(), &f.tls)
        {
            Response::Issued { identity, .. } => {
                assert_eq!(identity, "spiffe://acme/cluster/east/node/vm-1")
            }
            r => panic!("{r:?}"),
        }
        // Another key: refused.
        let other = NodeKey::generate().unwrap().csr("vm-1").unwrap();
        assert_eq!(
            refusal(f.ca_node.handle(&renew(other), &pool(), &f.tls)),
            Refusal::Malformed
        );
        // After revocation: refused as revoked.
        let id = Identity::new("acme", "east", "vm-1").unwrap();
        let entry = f.ca_node.revoke(Some(&id), None, "test").unwrap();
        assert_eq!(
            entry.revocation.keys.len(),
            1,
            "both certificates share one key"
        );
        assert_eq!(entry.revocation.serials.len(), 2);
        f.tls.revocations().insert(entry, unix_now());
        assert_eq!(
            refusal(
                f.ca_node
                    .handle(&renew(key.csr("vm-1").unwrap()), &pool(), &f.tls)
            ),
            Refusal::Revoked
        );
        // Unknown serials are an error; known ones revoke that key.
        assert!(f.ca_node.revoke(None, Some("00ff"), "x").is_err());
    }

    #[test]
    fn one_identity_one_key_from_the_log_and_from_gossip_until_revoked() {
        let f = fixture();
        let t = f
            .ca_node
            .create_token(Duration::from_secs(60), 10, None, false, &[])
            .unwrap();
        let first = NodeKey::generate().unwrap();
        assert!(matches!(
            f.ca_node
                .handle(&join_req_with(&t, "vm-1", None, &first), &pool(), &f.tls),
            Response::Issued { .. }
        ));
        // A second key for the same name: refused, the token not spent.
        let Response::Refused { reason, message } =
            f.ca_node.handle(&join_req(&t, "vm-1"), &pool(), &f.tls)
        else {
            panic!("issued a second key")
        };
        assert_eq!(reason, Refusal::NameTaken);
        assert!(message.contains("cert revoke --node vm-1"), "{message}");
        // The same key again is not a conflict (a retry).
        assert!(matches!(
            f.ca_node
                .handle(&join_req_with(&t, "vm-1", None, &first), &pool(), &f.tls),
            Response::Issued { .. }
        ));
        // Also after a restart of the CA node (the log is on disk).
        let reopened =
            CaNode::open(&f.settings, &f.dir.path().join("pki/ca.pem"), f.dir.path()).unwrap();
        assert_eq!(
            refusal(reopened.handle(&join_req(&t, "vm-1"), &pool(), &f.tls)),
            Refusal::NameTaken
        );
        // A certificate this node never issued, carried by gossip.
        let ca = Ca::load(&f.dir.path().join("pki")).unwrap();
        let offline = ca
            .issue("east", "vm-2", Role::Node, Duration::from_secs(3600))
            .unwrap();
        let mut with_cert = pool();
        with_cert.certs = vec![meshnode_transport::pki::first_cert_der(&offline.cert_pem).unwrap()];
        assert_eq!(
            refusal(reopened.handle(&join_req(&t, "vm-2"), &with_cert, &f.tls)),
            Refusal::NameTaken
        );
        // ... but not one of another mesh's CA, nor one for another name.
        let stranger = Ca::generate("acme", DEFAULT_CA_VALIDITY)
            .unwrap()
            .issue("east", "vm-3", Role::Node, Duration::from_secs(3600))
            .unwrap();
        with_cert.certs =
            vec![meshnode_transport::pki::first_cert_der(&stranger.cert_pem).unwrap()];
        assert!(matches!(
            reopened.handle(&join_req(&t, "vm-3"), &with_cert, &f.tls),
            Response::Issued { .. }
        ));
        // The operator revokes vm-1: a new key may take the name.
        let id = Identity::new("acme", "east", "vm-1").unwrap();
        let entry = reopened.revoke(Some(&id), None, "replaced").unwrap();
        f.tls.revocations().insert(entry, unix_now());
        assert!(matches!(
            reopened.handle(&join_req(&t, "vm-1"), &pool(), &f.tls),
            Response::Issued { .. }
        ));
    }
}
