//! Bearer-token authentication: every RPC but health carries `authorization: Bearer <token>`.
//! Tokens are kept as SHA-256 digests, so the secrets are not held in memory and never logged.

use crate::config::{Config, Role, TokenConfig};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tonic::{Request, Status};

/// Who called, once authenticated (in the request's extensions).
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: Role,
}

/// The configured tokens, as an interceptor.
#[derive(Clone)]
pub(crate) struct Auth {
    tokens: Arc<HashMap<[u8; 32], Caller>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth({} tokens)", self.tokens.len())
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Auth {
    /// Loads the configured tokens; with none, generates (or reuses) an operator token in
    /// `<data dir>/operator.token`, mode 0600.
    pub(crate) fn load(config: &Config) -> Result<Auth, String> {
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
                },
            );
        }
        Ok(Auth {
            tokens: Arc::new(tokens),
        })
    }

    fn authenticate(&self, header: Option<&str>) -> Result<Caller, Status> {
        let header = header.ok_or_else(|| {
            Status::unauthenticated(
                "no credentials: send the header `authorization: Bearer <token>`",
            )
        })?;
        let secret = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization header must be `Bearer <token>`")
            })?;
        self.tokens
            .get(&digest(secret.trim()))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = self.authenticate(header)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// Refuses a caller below `role` for `rpc`.
pub(crate) fn require<T>(req: &Request<T>, role: Role, rpc: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role >= role => Ok(()),
        Some(c) => Err(Status::permission_denied(format!(
            "token '{}' has role {:?}; {rpc} needs {:?}",
            c.name, c.role, role
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
