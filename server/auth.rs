//! Who is calling: a bearer token (`authorization: Bearer <token>`), else a client
//! certificate matched by `[[client_cert]]` rules, else on the unix socket the peer's uid
//! matched by `[[unix_peer]]` rules. Tokens are kept as SHA-256 digests, so the secrets are
//! not held in memory and never logged. The rules are swapped whole when the configuration is
//! reloaded; a call is judged by the rules current when it arrives.

use crate::config::{Config, Role, TokenConfig};
use crate::tls::CertIdentity;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use tonic::{Request, Status};

/// How a caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// A bearer token.
    Token,
    /// A client certificate, by a `[[client_cert]]` rule.
    Certificate,
    /// The uid of a unix-socket peer, by a `[[unix_peer]]` rule.
    UnixPeer,
}

impl Via {
    /// As `whoami` and the API say it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Via::Token => "token",
            Via::Certificate => "certificate",
            Via::UnixPeer => "unix_peer",
        }
    }
}

/// Who called, once authenticated (in the request's extensions).
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    /// The token's name, the certificate's CN (else first SAN), or the uid.
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) via: Via,
}

impl Caller {
    /// How jobs, audit lines and `whoami` name it: `token:ci`, `cert:ci.example.com`,
    /// `uid:1000`.
    pub(crate) fn identity(&self) -> String {
        let kind = match self.via {
            Via::Token => "token",
            Via::Certificate => "cert",
            Via::UnixPeer => "uid",
        };
        format!("{kind}:{}", self.name)
    }

    fn described(&self) -> String {
        match self.via {
            Via::Token => format!("token '{}'", self.name),
            Via::Certificate => format!("certificate '{}'", self.name),
            Via::UnixPeer => format!("uid {}", self.name),
        }
    }
}

/// The other end of a connection, as the listener saw it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Peer {
    /// `tcp:ADDR`, `tls:ADDR` or `unix`.
    pub(crate) address: String,
    /// Whether the connection is TLS.
    pub(crate) tls: bool,
    /// The client certificate, verified against `[tls] client_ca`.
    pub(crate) cert: Option<CertIdentity>,
    /// A unix-socket peer's uid.
    pub(crate) uid: Option<u32>,
    /// And its process's group.
    pub(crate) gid: Option<u32>,
    /// The client CA generation the certificate was verified against.
    pub(crate) ca_generation: u64,
}

/// `[[client_cert]]`: a role for certificates whose subject matches every field given.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertRule {
    /// `viewer` or `operator`.
    pub role: Role,
    /// The subject's common name, exactly.
    pub cn: Option<String>,
    /// One of the subject's organisations, exactly.
    pub o: Option<String>,
    /// One of the subject alternative names (DNS name, e-mail, URI), exactly; `*.example.com`
    /// matches DNS names one label below.
    pub san: Option<String>,
}

impl ClientCertRule {
    fn matches(&self, id: &CertIdentity) -> bool {
        // Exact: any alternative name. A wildcard: DNS names one label below, as TLS
        // wildcards go (an e-mail address or a URI never matches one).
        let san_ok = |want: &str| match want.strip_prefix("*.") {
            Some(parent) => id.dns.iter().any(|s| {
                s.split_once('.').is_some_and(|(label, rest)| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && rest.eq_ignore_ascii_case(parent)
                })
            }),
            None => id.sans.iter().any(|s| s.eq_ignore_ascii_case(want)),
        };
        self.cn
            .as_ref()
            .is_none_or(|cn| id.cn.as_deref() == Some(cn.as_str()))
            && self.o.as_ref().is_none_or(|o| id.o.iter().any(|x| x == o))
            && self.san.as_deref().is_none_or(san_ok)
    }
}

/// `[[unix_peer]]`: a role for unix-socket peers of a uid (or a user's uid), or of a group.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixPeerRule {
    /// `viewer` or `operator`.
    pub role: Role,
    /// The peer's uid.
    pub uid: Option<u32>,
    /// Or a user name, resolved to its uid when the configuration is loaded.
    pub user: Option<String>,
    /// Or a group: a peer whose process runs with it as its group, or a user listed as its
    /// member in the group database (resolved when the configuration is loaded, as a login
    /// session takes its groups when it starts).
    pub group: Option<String>,
}

/// Whom a `[[unix_peer]]` rule matches.
#[derive(Clone, Debug)]
enum PeerMatch {
    Uid(u32),
    Group {
        gid: u32,
        members: std::collections::HashSet<u32>,
    },
}

impl PeerMatch {
    fn matches(&self, uid: u32, gid: Option<u32>) -> bool {
        match self {
            PeerMatch::Uid(u) => *u == uid,
            PeerMatch::Group { gid: g, members } => gid == Some(*g) || members.contains(&uid),
        }
    }
}

impl UnixPeerRule {
    fn resolve(&self) -> Result<PeerMatch, String> {
        match (&self.uid, &self.user, &self.group) {
            (Some(uid), None, None) => Ok(PeerMatch::Uid(*uid)),
            (None, Some(u), None) => match nix::unistd::User::from_name(u) {
                Ok(Some(user)) => Ok(PeerMatch::Uid(user.uid.as_raw())),
                _ => Err(format!("[[unix_peer]]: no user '{u}' on this machine")),
            },
            (None, None, Some(g)) => match nix::unistd::Group::from_name(g) {
                Ok(Some(group)) => Ok(PeerMatch::Group {
                    gid: group.gid.as_raw(),
                    members: group
                        .mem
                        .iter()
                        .filter_map(|m| nix::unistd::User::from_name(m).ok().flatten())
                        .map(|u| u.uid.as_raw())
                        .collect(),
                }),
                _ => Err(format!("[[unix_peer]]: no group '{g}' on this machine")),
            },
            _ => Err("[[unix_peer]]: give exactly one of uid, user and group".into()),
        }
    }
}

/// Checks rule shapes the schema cannot.
pub(crate) fn check_rules(certs: &[ClientCertRule], peers: &[UnixPeerRule]) -> Result<(), String> {
    for (i, r) in certs.iter().enumerate() {
        if r.cn.is_none() && r.o.is_none() && r.san.is_none() {
            return Err(format!(
                "[[client_cert]] #{}: give at least one of cn, o, san (a rule that matches every certificate the CA signs is too easy to write by mistake)",
                i + 1
            ));
        }
    }
    for r in peers {
        r.resolve()?;
    }
    Ok(())
}

/// Everything calls are judged by, swapped whole on reload.
struct Rules {
    tokens: HashMap<[u8; 32], Caller>,
    certs: Vec<ClientCertRule>,
    /// Unix peers to roles, the first match wins.
    peers: Vec<(PeerMatch, Role)>,
    /// Reflection answers without credentials.
    public_reflection: bool,
}

/// The rules, as an interceptor. `discovery` marks the copy guarding server reflection,
/// which answers without credentials unless `reflection = "authenticated"`.
#[derive(Clone)]
pub(crate) struct Auth {
    rules: Arc<RwLock<Arc<Rules>>>,
    discovery: bool,
    /// The listener's client CA generation, when it has TLS.
    ca_generation: Arc<std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>>,
}

/// Rules checked and ready to swap in.
pub(crate) struct Prepared(Rules);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.rules.read().expect("auth lock");
        write!(
            f,
            "Auth({} tokens, {} certificate rules)",
            r.tokens.len(),
            r.certs.len()
        )
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn rules(config: &Config) -> Result<Rules, String> {
    let mut tokens = HashMap::new();
    for t in &config.tokens {
        let secret = read_secret(t)?;
        if secret.len() < 16 {
            return Err(format!("token '{}' is shorter than 16 characters", t.name));
        }
        tokens.insert(
            digest(&secret),
            Caller {
                name: t.name.clone(),
                role: t.role,
                via: Via::Token,
            },
        );
    }
    if tokens.is_empty() {
        let secret = generated_token(&config.data_dir.join("operator.token"))?;
        tokens.insert(
            digest(&secret),
            Caller {
                name: "operator.token".into(),
                role: Role::Operator,
                via: Via::Token,
            },
        );
    }
    let peers = config
        .unix_peers
        .iter()
        .map(|r| Ok((r.resolve()?, r.role)))
        .collect::<Result<_, String>>()?;
    Ok(Rules {
        tokens,
        certs: config.client_certs.clone(),
        peers,
        public_reflection: config.reflection == crate::config::Reflection::Public,
    })
}

impl Auth {
    /// Loads the configured tokens and rules; with no token, generates (or reuses) an
    /// operator token in `<data dir>/operator.token`, mode 0600.
    pub(crate) fn load(config: &Config) -> Result<Auth, String> {
        Ok(Auth {
            rules: Arc::new(RwLock::new(Arc::new(rules(config)?))),
            discovery: false,
            ca_generation: Arc::new(std::sync::OnceLock::new()),
        })
    }

    /// Follows the listener's client CA: a certificate verified against an older one is
    /// refused (its client reconnects and is verified again).
    pub(crate) fn follow_ca(&self, generation: Arc<std::sync::atomic::AtomicU64>) {
        let _ = self.ca_generation.set(generation);
    }

    /// The rules of a new configuration, checked (tokens readable, users known).
    pub(crate) fn prepare(config: &Config) -> Result<Prepared, String> {
        rules(config).map(Prepared)
    }

    /// Replaces the rules (calls in flight keep theirs).
    pub(crate) fn install(&self, p: Prepared) {
        *self.rules.write().expect("auth lock") = Arc::new(p.0);
    }

    /// The interceptor for server reflection.
    pub(crate) fn discovery(&self) -> Auth {
        Auth {
            rules: self.rules.clone(),
            discovery: true,
            ca_generation: self.ca_generation.clone(),
        }
    }

    fn authenticate(&self, header: Option<&str>, peer: Option<&Peer>) -> Result<Caller, Status> {
        let rules = self.rules.read().expect("auth lock").clone();
        if let Some(header) = header {
            let secret = header
                .strip_prefix("Bearer ")
                .or_else(|| header.strip_prefix("bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization header must be `Bearer <token>`")
                })?;
            return rules
                .tokens
                .get(&digest(secret.trim()))
                .cloned()
                .ok_or_else(|| Status::unauthenticated("unknown token"));
        }
        if let Some(p) = peer
            && let Some(id) = &p.cert
        {
            if crate::job::now_ms() / 1000 > id.not_after {
                return Err(Status::unauthenticated(format!(
                    "the client certificate '{}' has expired: renew it and connect again",
                    id.name()
                )));
            }
            if let Some(g) = self.ca_generation.get()
                && g.load(std::sync::atomic::Ordering::SeqCst) != p.ca_generation
            {
                return Err(Status::unauthenticated(
                    "the daemon's client CA changed since this connection was made: connect again to be verified against it",
                ));
            }
            return match rules.certs.iter().find(|r| r.matches(id)) {
                Some(r) => Ok(Caller {
                    name: id.name(),
                    role: r.role,
                    via: Via::Certificate,
                }),
                None => Err(Status::unauthenticated(format!(
                    "the client certificate '{}' matches no [[client_cert]] rule: send a token, or use a certificate a rule names",
                    id.name()
                ))),
            };
        }
        if let Some(p) = peer
            && let Some(uid) = p.uid
            && let Some((_, role)) = rules.peers.iter().find(|(m, _)| m.matches(uid, p.gid))
        {
            return Ok(Caller {
                name: uid.to_string(),
                role: *role,
                via: Via::UnixPeer,
            });
        }
        Err(Status::unauthenticated(
            "no credentials: send the header `authorization: Bearer <token>`",
        ))
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if self.discovery && self.rules.read().expect("auth lock").public_reflection {
            return Ok(req);
        }
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let peer = peer_of(&req);
        let caller = self.authenticate(header, peer.as_deref())?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The authenticated caller of a request.
pub(crate) fn caller_of<T>(req: &Request<T>) -> Option<&Caller> {
    req.extensions().get::<Caller>()
}

/// The connection's peer of a request.
pub(crate) fn peer_of<T>(req: &Request<T>) -> Option<Arc<Peer>> {
    req.extensions()
        .get::<crate::listen::Activity>()
        .map(|a| a.peer.clone())
}

/// Refuses a caller below `role` for `rpc`.
pub(crate) fn require<T>(req: &Request<T>, role: Role, rpc: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role >= role => {
            if role == Role::Operator {
                // The audit trail: who changed what from where (the job it starts records
                // the same identity as submitted_by).
                let peer = peer_of(req).map(|p| p.address.clone()).unwrap_or_default();
                tracing::info!(target: "stately::audit", "{} calls {rpc} from {peer}", c.identity());
            }
            Ok(())
        }
        Some(c) => Err(Status::permission_denied(format!(
            "{} has role {:?}; {rpc} needs {:?}",
            c.described(),
            c.role,
            role
        ))),
        None => Err(Status::unauthenticated("no credentials")),
    }
}

fn read_secret(t: &TokenConfig) -> Result<String, String> {
    match (&t.value, &t.file) {
        (Some(v), _) => Ok(v.trim().to_owned()),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("token '{}': {}: {e}", t.name, f.display())),
        (None, None) => Err(format!("token '{}' has neither value nor file", t.name)),
    }
}

fn generated_token(path: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(s) = std::fs::read_to_string(path) {
        let s = s.trim().to_owned();
        if s.len() >= 16 {
            return Ok(s);
        }
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let tmp = path.with_extension("token.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    writeln!(f, "{secret}")
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(
        "no tokens configured: wrote an operator token to {}",
        path.display()
    );
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cn: &str, dns: &[&str], other: &[&str]) -> CertIdentity {
        CertIdentity {
            cn: Some(cn.into()),
            o: vec!["ops".into()],
            sans: dns.iter().chain(other).map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            not_after: i64::MAX,
        }
    }

    fn rule(san: &str) -> ClientCertRule {
        ClientCertRule {
            role: Role::Viewer,
            cn: None,
            o: None,
            san: Some(san.into()),
        }
    }

    #[test]
    fn a_wildcard_matches_dns_names_one_label_below_and_nothing_else() {
        let r = rule("*.example.com");
        assert!(r.matches(&id("a", &["web.example.com"], &[])));
        assert!(!r.matches(&id("a", &["a.b.example.com"], &[])));
        assert!(!r.matches(&id("a", &["example.com"], &[])));
        assert!(!r.matches(&id("a", &[], &["mallory@x.example.com"])));
        assert!(!r.matches(&id("a", &[], &["https://a.example.com"])));
        assert!(!r.matches(&id("a", &["a_b.example.com"], &[])));
        assert!(rule("ci@example.com").matches(&id("a", &[], &["ci@example.com"])));
    }

    #[test]
    fn every_field_of_a_rule_must_match() {
        let r = ClientCertRule {
            role: Role::Operator,
            cn: Some("ci".into()),
            o: Some("ops".into()),
            san: None,
        };
        assert!(r.matches(&id("ci", &[], &[])));
        assert!(!r.matches(&id("cd", &[], &[])));
        let mut other_o = id("ci", &[], &[]);
        other_o.o = vec!["dev".into()];
        assert!(!r.matches(&other_o));
    }
}
