//! Identity entities: trusted issuers, the token-signing keys, people seen
//! at login, static groups, workload bindings and role grants.

use serde::{Deserialize, Serialize};

/// A trusted identity provider.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issuer {
    pub name: String,
    /// "oidc".
    pub kind: String,
    /// The issuer identifier, exactly as tokens carry it in `iss`.
    pub issuer_url: String,
    pub client_id: String,
    /// Sealed with the key-encryption key; empty for a public client.
    pub client_secret_sealed: String,
    pub groups_claim: String,
    pub algorithms: Vec<String>,
    /// Audiences trusted next to the client id.
    pub audiences: Vec<String>,
    pub scopes: Vec<String>,
    pub created_ms: i64,
    /// SAML: the IdP's metadata (entity id, SSO location, signing
    /// certificates).
    #[serde(default)]
    pub metadata_xml: String,
    /// SAML: where the metadata came from, when it was fetched.
    #[serde(default)]
    pub metadata_url: String,
}

/// A key that signs Gatehouse access tokens (ECDSA P-256), or the SSH CA's
/// key (Ed25519; `public_pem` then holds its OpenSSH public key line and
/// `private_sealed` its OpenSSH private key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    pub kid: String,
    /// SubjectPublicKeyInfo, PEM.
    pub public_pem: String,
    /// PKCS#8, PEM, sealed with the key-encryption key.
    pub private_sealed: String,
    pub created_ms: i64,
}

/// A person as last seen at login.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `user:<issuer name>/<subject>`.
    pub identity: String,
    pub issuer: String,
    pub subject: String,
    pub email: String,
    /// Groups the provider gave at the last login.
    pub groups: Vec<String>,
    pub last_login_ms: i64,
}

/// Which external tokens act as a service account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadBinding {
    /// A trusted issuer's name.
    pub issuer: String,
    /// Glob on `sub`; `*` matches any run of characters.
    pub subject: String,
    pub audience: String,
    /// Claims that must equal these values (or contain them, for arrays).
    pub claims: Vec<(String, String)>,
}

/// A role on the API, granted to an identity or a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleGrant {
    pub role: String,
    /// `user:<issuer>/<subject>`, `sa:<name>` or `group:<name>`.
    pub principal: String,
    pub created_ms: i64,
}

pub(crate) mod key {
    pub fn issuer(name: &str) -> String {
        format!("issuer/{name}")
    }
    pub fn signing_key(kid: &str) -> String {
        format!("signing_key/{kid}")
    }
    pub fn ssh_ca(kid: &str) -> String {
        format!("ssh_ca/{kid}")
    }
    pub fn user(identity: &str) -> String {
        format!("user/{identity}")
    }
    pub fn static_groups(identity: &str) -> String {
        format!("static_groups/{identity}")
    }
    pub fn binding(sa: &str, n: usize) -> String {
        format!("binding/{sa}/{n:06}")
    }
    pub fn assertion(issuer: &str, id: &str) -> String {
        format!("assertion/{issuer}/{id}")
    }
    pub fn grant(role: &str, principal: &str) -> String {
        format!("grant/{role}/{principal}")
    }
}

/// `*` matches any run of characters (including none); everything else
/// matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match(
            "repo:acme/*:ref:refs/heads/main",
            "repo:acme/api:ref:refs/heads/main"
        ));
        assert!(!glob_match(
            "repo:acme/*:ref:refs/heads/main",
            "repo:acme/api:ref:refs/heads/dev"
        ));
        assert!(glob_match("ci-runner", "ci-runner"));
        assert!(!glob_match("ci-runner", "ci-runner2"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
