//! A real OpenID Provider (npm `oidc-provider`, run with Node on a
//! loopback port) and a scripted browser that logs in at it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, free_port, wait_until};

/// The client Gatehouse logs people in with.
pub const CLIENT_ID: &str = "gatehouse";
pub const CLIENT_SECRET: &str = "gatehouse-client-secret";
/// A CI job's client (client-credentials grant).
pub const CI_CLIENT_ID: &str = "ci-runner";
pub const CI_CLIENT_SECRET: &str = "ci-runner-secret";
/// The resource (audience) of workload access tokens.
pub const RESOURCE: &str = "https://gatehouse.test";

pub struct OidcProvider {
    pub proc: Option<Proc>,
    pub port: u16,
    pub dir: PathBuf,
    pub accounts: PathBuf,
    pub keys: PathBuf,
}

fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// One signing key of the provider.
pub struct ProviderKey {
    pub kid: String,
    /// PKCS#8 PEM.
    pub pem: String,
    pub public_pem: String,
}

impl OidcProvider {
    /// Starts the provider with people `accounts` (id → e-mail, groups).
    pub fn start(dir: &Path, accounts: &[(&str, &str, &[&str])]) -> Self {
        assert!(
            script_dir().join("node_modules/oidc-provider").exists(),
            "the test OpenID Provider is not installed: run `bash scripts/deps.sh test`"
        );
        std::fs::create_dir_all(dir).unwrap();
        let mut p = Self {
            proc: None,
            port: free_port(),
            dir: dir.to_path_buf(),
            accounts: dir.join("accounts.json"),
            keys: dir.join("keys.json"),
        };
        p.set_accounts(accounts);
        p.keygen("key-1");
        p.launch();
        p
    }

    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the people (read again at every login).
    pub fn set_accounts(&self, accounts: &[(&str, &str, &[&str])]) {
        let mut m = serde_json::Map::new();
        for (id, email, groups) in accounts {
            m.insert(
                id.to_string(),
                serde_json::json!({"email": email, "groups": groups}),
            );
        }
        std::fs::write(&self.accounts, serde_json::Value::Object(m).to_string()).unwrap();
    }

    /// A new signing key `kid` replaces the old ones (takes effect at the
    /// next launch).
    pub fn keygen(&self, kid: &str) {
        // Bounded: a node process that does not finish is killed and run
        // again (once seen hanging at exit on a fresh machine).
        for _ in 0..3 {
            let mut child = Command::new("node")
                .arg(script_dir().join("keygen.mjs"))
                .arg(kid)
                .arg(&self.keys)
                .spawn()
                .unwrap();
            let t0 = std::time::Instant::now();
            while t0.elapsed() < std::time::Duration::from_secs(30) {
                if let Some(st) = child.try_wait().unwrap() {
                    assert!(st.success(), "key generation failed");
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("key generation did not finish in three tries of 30 s");
    }

    pub fn key(&self) -> ProviderKey {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&self.keys).unwrap()).unwrap();
        let k = &v[0];
        ProviderKey {
            kid: k["kid"].as_str().unwrap().to_string(),
            pem: k["pem"].as_str().unwrap().to_string(),
            public_pem: k["public_pem"].as_str().unwrap().to_string(),
        }
    }

    /// (Re)starts the process on the same port with the current keys.
    pub fn launch(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        let cfg = serde_json::json!({
            "port": self.port,
            "keys": self.keys,
            "accounts": self.accounts,
            "resource": RESOURCE,
            "clients": [
                {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                 "redirect_uris": ["http://127.0.0.1/callback"], "application_type": "native",
                 "grant_types": ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
                 "response_types": ["code"], "token_endpoint_auth_method": "client_secret_basic"},
                {"client_id": CI_CLIENT_ID, "client_secret": CI_CLIENT_SECRET,
                 "redirect_uris": [], "response_types": [], "grant_types": ["client_credentials"],
                 "token_endpoint_auth_method": "client_secret_basic"}
            ]
        });
        let cfg_path = self.dir.join("provider.json");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let proc = Proc::spawn(
            Path::new("node"),
            &[
                script_dir().join("provider.mjs").display().to_string(),
                cfg_path.display().to_string(),
            ],
            &self.dir.join("provider.log"),
        );
        let log = proc.log.clone();
        self.proc = Some(proc);
        wait_until(
            "the OpenID Provider listens",
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("listening")
                    .then_some(())
            },
        );
    }

    /// A client-credentials access token (JWT) for the CI client.
    pub async fn client_credentials(&self) -> String {
        let c = reqwest::Client::new();
        let r: serde_json::Value = c
            .post(format!("{}/token", self.issuer()))
            .basic_auth(CI_CLIENT_ID, Some(CI_CLIENT_SECRET))
            .form(&[("grant_type", "client_credentials"), ("scope", "gatehouse")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token: {r}"))
            .to_string()
    }
}

/// A browser that follows redirects, keeps cookies, and submits the
/// provider's login and consent forms as person `login`. Stops at the
/// first redirect to `stop_at` (the CLI's loopback listener), which it
/// then requests, as a browser would. Returns the pages' text seen.
pub async fn browse(start: &str, login: &str, stop_at: Option<&str>) -> String {
    let c = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut seen = String::new();
    let mut req = c.get(start);
    for _ in 0..20 {
        let r = req.send().await.unwrap();
        let url = r.url().clone();
        if let Some(loc) = r.headers().get("location") {
            let next = url.join(loc.to_str().unwrap()).unwrap();
            if stop_at.is_some_and(|s| next.as_str().starts_with(s)) {
                let page = c.get(next).send().await.unwrap().text().await.unwrap();
                seen.push_str(&page);
                return seen;
            }
            req = c.get(next);
            continue;
        }
        let page = r.text().await.unwrap();
        seen.push_str(&page);
        let Some(action) = attr(&page, "<form", "action") else {
            return seen;
        };
        let mut fields: Vec<(String, String)> = Vec::new();
        for input in page.split("<input").skip(1) {
            let name = attr(input, "", "name");
            let value = attr(input, "", "value").unwrap_or_default();
            match name.as_deref() {
                Some("login") => fields.push(("login".into(), login.into())),
                Some("password") => fields.push(("password".into(), "any".into())),
                Some(n) => fields.push((n.to_string(), value)),
                None => {}
            }
        }
        let target = url.join(&action).unwrap();
        req = c.post(target).form(&fields);
    }
    panic!("the login did not finish in 20 steps; pages seen:\n{seen}");
}

/// The value of attribute `name` in the first tag after `after`.
fn attr(html: &str, after: &str, name: &str) -> Option<String> {
    let start = if after.is_empty() {
        0
    } else {
        html.find(after)?
    };
    let tag_end = html[start..].find('>').map(|i| start + i)?;
    let tag = &html[start..tag_end];
    let key = format!("{name}=\"");
    let i = tag.find(&key)? + key.len();
    let j = tag[i..].find('"')? + i;
    Some(tag[i..j].replace("&amp;", "&"))
}
