//! Who may do what. Three credentials, each off until configured:
//!
//! - the join token: lets a machine register;
//! - API keys: let clients use the LLM routes;
//! - the admin token: lets an operator register, update, drain and delete
//!   any agent.
//!
//! With either the join token or the admin token configured, each agent
//! identity `(machine_name, port)` gets a per-agent secret when it is first
//! registered: that secret alone works for the agent's heartbeats, updates,
//! drain and delete, and registering the identity again needs it (or the
//! admin token), so that no one can take over a node that is not theirs.
//!
//! Only SHA-256 digests of credentials are held, and digests are compared in
//! constant time. Hashing first also hides a token's length. Secrets are
//! never logged: [`Secret`]'s `Debug` prints a placeholder.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// A credential as configured: its text is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Secret(text.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a credential must not be empty".to_owned());
        }
        Ok(Secret(text.to_owned()))
    }
}

/// The SHA-256 of a credential: what the router keeps and compares.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    pub fn of(token: &[u8]) -> Self {
        TokenDigest(Sha256::digest(token).into())
    }

    /// Constant-time equality: how long it takes says nothing of where two
    /// digests differ.
    pub fn matches(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(TokenDigest(bytes))
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("TokenDigest(..)")
    }
}

/// A new per-agent secret: 256 random bits, as text. The router keeps only
/// its digest. `thread_rng` is a cryptographically secure generator seeded
/// (and periodically reseeded) from the operating system's, without a
/// system call per registration.
pub fn new_agent_secret() -> (Secret, TokenDigest) {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let secret = format!("llmr_agent_{}", hex::encode(bytes));
    let digest = TokenDigest::of(secret.as_bytes());
    (Secret(secret), digest)
}

/// The credentials the router was started with, as digests.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    join_token: Option<TokenDigest>,
    api_keys: Vec<TokenDigest>,
    admin_token: Option<TokenDigest>,
    /// Listings, `/metrics` and the dashboard's data need a credential.
    protect_listings: bool,
}

/// How a listing request is let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingAccess {
    /// Listings are open, or an admin token or API key was presented.
    Allowed,
    /// An unknown token: only an agent's own record may take it, if it is
    /// that agent's secret.
    MustBeAgent(TokenDigest),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credential, or one the router does not know (401).
    Unauthenticated,
    /// A credential the router knows, but not one for this (403).
    Forbidden,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => "unauthorized",
            Refusal::Forbidden => "forbidden",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::Unauthenticated => {
                "a valid credential is required: send it as 'Authorization: Bearer <token>'"
            }
            Refusal::Forbidden => "this credential does not allow this request",
        }
    }
}

/// What an agent route accepts, besides the agent's own secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRoute {
    /// Heartbeats: the agent's own secret only.
    SelfOnly,
    /// Update, drain, delete: the agent's own secret, or the admin token.
    SelfOrAdmin,
}

/// How a registration is let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinAccess {
    /// With the join token, or with none needed: a new identity may be
    /// registered; a known one needs its secret too.
    Joined,
    /// With the admin token: any identity, known or new.
    Admin,
}

/// How an agent route's request is let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentAccess {
    /// Nothing is configured that guards this route.
    Open,
    /// The admin token was presented.
    Admin,
    /// The caller must prove it is the agent: its secret's digest must match
    /// the one the registry holds for that id.
    MustBeAgent(TokenDigest),
}

impl Credentials {
    pub fn new(
        join_token: Option<&Secret>,
        api_keys: &[Secret],
        admin_token: Option<&Secret>,
    ) -> Self {
        let digest = |secret: &Secret| TokenDigest::of(secret.0.as_bytes());
        Credentials {
            join_token: join_token.map(digest),
            api_keys: api_keys.iter().map(digest).collect(),
            admin_token: admin_token.map(digest),
            protect_listings: false,
        }
    }

    /// Requires a credential for the listings (`GET /api/agents...`),
    /// `/metrics` and the dashboard's data: the admin token or an API key,
    /// or for an agent's own record its secret. Refused when neither an
    /// admin token nor an API key is configured, since nobody could read.
    pub fn protecting_listings(mut self) -> anyhow::Result<Self> {
        if self.admin_token.is_none() && self.api_keys.is_empty() {
            anyhow::bail!(
                "--protect-listings needs a credential to read them with: configure --admin-token or --api-keys too"
            );
        }
        self.protect_listings = true;
        Ok(self)
    }

    /// `GET /api/agents`, `GET /api/agents/:id`, `/metrics`.
    pub fn check_listing(&self, authorization: Option<&[u8]>) -> Result<ListingAccess, Refusal> {
        if !self.protect_listings {
            return Ok(ListingAccess::Allowed);
        }
        let presented = presented_digest(authorization)?;
        let mut reader = subtle::Choice::from(0);
        for digest in self.api_keys.iter().chain(&self.admin_token) {
            reader |= digest.0.ct_eq(&presented.0);
        }
        if reader.into() {
            return Ok(ListingAccess::Allowed);
        }
        if self.knows(&presented) {
            return Err(Refusal::Forbidden);
        }
        Ok(ListingAccess::MustBeAgent(presented))
    }

    /// Whether registration needs the join token.
    pub fn registration_guarded(&self) -> bool {
        self.join_token.is_some()
    }

    /// Whether agents get secrets and must prove them: whenever any agent
    /// credential is configured. With an admin token alone, anyone may add
    /// a node, but no one may speak for a node that is not theirs.
    pub fn agents_have_secrets(&self) -> bool {
        self.join_token.is_some() || self.admin_token.is_some()
    }

    /// Whether the LLM routes need an API key.
    pub fn clients_authenticated(&self) -> bool {
        !self.api_keys.is_empty()
    }

    /// `POST /api/agents/register`: who may register, and as what.
    pub fn check_join(&self, authorization: Option<&[u8]>) -> Result<JoinAccess, Refusal> {
        let presented = bearer_token(authorization).map(TokenDigest::of);
        if let (Some(admin), Some(presented)) = (&self.admin_token, &presented) {
            if admin.matches(presented) {
                return Ok(JoinAccess::Admin);
            }
        }
        let Some(join_token) = &self.join_token else {
            return Ok(JoinAccess::Joined);
        };
        let presented = presented.ok_or(Refusal::Unauthenticated)?;
        if join_token.matches(&presented) {
            return Ok(JoinAccess::Joined);
        }
        Err(self.refusal_for(&presented))
    }

    /// The LLM routes.
    pub fn check_client(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if self.api_keys.is_empty() {
            return Ok(());
        }
        let presented = presented_digest(authorization)?;
        // Every key is compared, matched or not, so that the time taken does
        // not say which key matched.
        let matched = self
            .api_keys
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.0.ct_eq(&presented.0)
            });
        if matched.into() {
            return Ok(());
        }
        Err(self.refusal_for(&presented))
    }

    /// An agent route: decides what the caller must prove. The registry
    /// then checks an agent's secret against the id (see
    /// `Registry::verify_agent_secret`).
    pub fn check_agent_route(
        &self,
        authorization: Option<&[u8]>,
        route: AgentRoute,
    ) -> Result<AgentAccess, Refusal> {
        let admin = match route {
            AgentRoute::SelfOrAdmin => self.admin_token.as_ref(),
            AgentRoute::SelfOnly => None,
        };
        if !self.agents_have_secrets() {
            return Ok(AgentAccess::Open);
        }
        let presented = presented_digest(authorization)?;
        if admin.is_some_and(|admin| admin.matches(&presented)) {
            return Ok(AgentAccess::Admin);
        }
        // Whether it is this agent's secret only the registry can say. Any
        // other credential the router knows is the wrong kind.
        if self.knows(&presented) {
            return Err(Refusal::Forbidden);
        }
        Ok(AgentAccess::MustBeAgent(presented))
    }

    /// A wrong credential is 403 when it is one the router knows (valid, but
    /// not for this) and 401 otherwise.
    fn refusal_for(&self, presented: &TokenDigest) -> Refusal {
        if self.knows(presented) {
            Refusal::Forbidden
        } else {
            Refusal::Unauthenticated
        }
    }

    fn knows(&self, presented: &TokenDigest) -> bool {
        let mut known = subtle::Choice::from(0);
        for digest in self
            .join_token
            .iter()
            .chain(&self.api_keys)
            .chain(&self.admin_token)
        {
            known |= digest.0.ct_eq(&presented.0);
        }
        known.into()
    }
}

/// The digest of the `Authorization: Bearer` token, or 401 when there is none.
fn presented_digest(authorization: Option<&[u8]>) -> Result<TokenDigest, Refusal> {
    bearer_token(authorization)
        .map(TokenDigest::of)
        .ok_or(Refusal::Unauthenticated)
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any case).
pub fn bearer_token(authorization: Option<&[u8]>) -> Option<&[u8]> {
    let value = authorization?;
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Reads a credential file: its text, trimmed.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading credential file {}", path.display()))?;
    text.parse::<Secret>()
        .map_err(|problem| anyhow::anyhow!("{}: {problem}", path.display()))
}

/// Reads an API key file: one key per line (or comma-separated); blank lines
/// and lines starting with `#` are skipped.
pub fn read_api_key_file(path: &PathBuf) -> anyhow::Result<Vec<Secret>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading API key file {}", path.display()))?;
    let keys: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .flat_map(|line| line.split(','))
        .filter_map(|key| key.parse().ok())
        .collect();
    if keys.is_empty() {
        anyhow::bail!("{}: no API key in the file", path.display());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(authorization: &str) -> Option<Vec<u8>> {
        bearer_token(Some(authorization.as_bytes())).map(<[u8]>::to_vec)
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_token_is_trimmed() {
        assert_eq!(bearer("Bearer abc"), Some(b"abc".to_vec()));
        assert_eq!(bearer("bearer  abc "), Some(b"abc".to_vec()));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer_token(None), None);
    }

    #[test]
    fn agent_secrets_are_long_random_and_only_their_digest_matches() {
        let (first, first_digest) = new_agent_secret();
        let (second, _) = new_agent_secret();
        assert_ne!(first, second);
        // 256 random bits as 64 hex digits, after the prefix.
        assert_eq!(first.expose().len(), "llmr_agent_".len() + 64);
        assert!(first_digest.matches(&TokenDigest::of(first.expose().as_bytes())));
        assert!(!first_digest.matches(&TokenDigest::of(second.expose().as_bytes())));
        let hex = first_digest.to_hex();
        assert_eq!(TokenDigest::from_hex(&hex), Some(first_digest));
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let secret: Secret = "top-secret-value".parse().expect("parses");
        assert!(!format!("{secret:?}").contains("top-secret"));
    }
}
