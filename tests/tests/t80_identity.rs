//! Identity: people log in at a real OpenID Provider (authorization code
//! with PKCE, and the device flow), workloads exchange their own tokens,
//! and every token the provider signs is validated completely.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use gatehouse_e2e::oidc::{self, OidcProvider};
use gatehouse_e2e::{Stack, secret_file};

/// The stack, and the provider trusted as issuer `corp`.
fn setup(accounts: &[(&str, &str, &[&str])]) -> (Stack, OidcProvider) {
    setup_with(accounts, &[])
}

fn setup_with(accounts: &[(&str, &str, &[&str])], server_args: &[&str]) -> (Stack, OidcProvider) {
    let (s, _) = Stack::start_opts(false, "", server_args);
    let p = OidcProvider::start(&s.tmp.path().join("idp"), accounts);
    let secret = secret_file(s.tmp.path(), "client.secret", oidc::CLIENT_SECRET);
    s.cli_ok(&[
        "issuers",
        "add-oidc",
        "corp",
        "--issuer-url",
        &p.issuer(),
        "--client-id",
        oidc::CLIENT_ID,
        "--client-secret-file",
        secret.to_str().unwrap(),
    ]);
    (s, p)
}

/// `gatehouse` as a person: no credential but the token file.
fn person(s: &Stack, token_file: &std::path::Path, args: &[&str]) -> Command {
    let mut c = s.cli_cmd("", args);
    c.env_remove("GATEHOUSE_TOKEN")
        .env("GATEHOUSE_TOKEN_FILE", token_file);
    c
}

/// Runs `gatehouse login …`, hands the address it prints to `browser`,
/// and returns the command's output once it ends.
async fn login_via<F, Fut>(mut cmd: Command, pick: &str, browser: F) -> std::process::Output
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut printed = String::new();
    let url = loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "login printed no address: {printed}"
        );
        printed.push_str(&line);
        if let Some(i) = line.find(pick) {
            let rest = &line[i..];
            break rest.split([' ', ')', '\n']).next().unwrap().to_string();
        }
    };
    browser(url).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    assert!(
        out.status.success(),
        "login failed: {printed}{rest}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn redirect_uri_of(auth_url: &str) -> String {
    url::Url::parse(auth_url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "redirect_uri")
        .map(|(_, v)| v.into_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn people_log_in_at_the_provider_and_its_groups_decide_access() {
    let (s, p) = setup(&[("carol", "carol@example.com", &["dba", "eng"])]);
    s.cli_ok(&[
        "rules",
        "create",
        "--subject",
        "group:dba",
        "--target",
        "db",
    ]);
    let token_file = s.tmp.path().join("carol").join("token.json");

    // Authorization code + PKCE, the redirect to the CLI's loopback port.
    // A local connection that never sends a request is open on that port
    // the whole time: it does not hold up the provider's redirect.
    let out = login_via(
        person(&s, &token_file, &["login", "--no-browser"]),
        "http://127.0.0.1",
        |url| async move {
            let stop = redirect_uri_of(&url);
            let port = url::Url::parse(&stop).unwrap().port().unwrap();
            let _stalled = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            oidc::browse(&url, "carol", Some(&stop)).await
        },
    )
    .await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("logged in as user:corp/carol"), "{said}");
    assert!(said.contains("dba"), "{said}");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is owner-only");

    let tok = person(&s, &token_file, &["token"]).output().unwrap();
    assert!(
        tok.status.success(),
        "{}",
        String::from_utf8_lossy(&tok.stderr)
    );
    let token = String::from_utf8(tok.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let (out, err, ok) = s.psql_user(&token, "select current_user");
    assert!(ok, "the group rule admits carol: {err}");
    assert!(out.contains("gatehouse_agent"), "{out}");

    let events = s.audit_events(&["--identity", "user:corp/carol"]);
    let start = events
        .iter()
        .find(|e| e["kind"] == "session_start" && e["decision"] == "allow")
        .unwrap_or_else(|| panic!("no session start for carol: {events:?}"));
    assert_eq!(start["issuer"], p.issuer());
    let groups: Vec<&str> = start["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    assert_eq!(groups, ["dba", "eng"]);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "login" && e["decision"] == "allow"),
        "the login is an audit event: {events:?}"
    );
    let users = s.cli_ok(&["users", "list", "-o", "json"]);
    assert!(users.contains("carol@example.com"), "{users}");

    // Carol leaves the group at the provider and logs in again, this time
    // with the device flow: the rule no longer admits her.
    p.set_accounts(&[("carol", "carol@example.com", &["eng"])]);
    let mut child = person(&s, &token_file, &["login", "--device"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let complete = loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0);
        if let Some(i) = line.find("(or open ") {
            break line[i + 9..].trim().trim_end_matches(')').to_string();
        }
    };
    let pages = oidc::browse(&complete, "carol", None).await;
    assert!(!pages.is_empty());
    let done = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(done.status.success(), "device login failed");
    let said = String::from_utf8_lossy(&done.stdout);
    assert!(said.contains("user:corp/carol"), "{said}");
    assert!(
        !said.contains("dba"),
        "groups come from the new login: {said}"
    );
    let token = String::from_utf8(person(&s, &token_file, &["token"]).output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let (_, err, ok) = s.psql_user(&token, "select 1");
    assert!(!ok, "carol is no longer in dba");
    assert!(
        err.contains("user:corp/carol may not use a target named \"db\""),
        "{err}"
    );

    // An admin adds carol to dba as a static group: it counts at the next
    // decision, with the same token; removed again, she is refused.
    s.cli_ok(&["users", "set-groups", "user:corp/carol", "--group", "dba"]);
    let (_, err, ok) = s.psql_user(&token, "select 1");
    assert!(ok, "the static group admits carol: {err}");
    s.cli_ok(&["users", "set-groups", "user:corp/carol"]);
    let (_, _, ok) = s.psql_user(&token, "select 1");
    assert!(!ok, "without the static group carol is refused again");

    // The agent learned the cluster's token-signing key from its hello.
    let agent_log = std::fs::read_to_string(s.tmp.path().join("agent.log")).unwrap();
    // Without the terminal colours tracing may add around field names.
    let mut plain = String::new();
    let mut in_escape = false;
    for ch in agent_log.chars() {
        match (in_escape, ch) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    assert!(
        plain.contains("serving sessions high_water=0 token_keys=1"),
        "{plain}"
    );

    // Revoking carol's tokens ends her running session at once and refuses
    // the token for new ones.
    s.cli_ok(&["users", "set-groups", "user:corp/carol", "--group", "dba"]);
    let client = s.driver(&token).await;
    client.simple_query("select 1").await.unwrap();
    let out = s.cli_ok(&[
        "identities",
        "revoke",
        "user:corp/carol",
        "--reason",
        "laptop stolen",
    ]);
    assert!(out.contains("1 running session(s) ended"), "{out}");
    assert!(client.simple_query("select 1").await.is_err());
    let (_, err, ok) = s.psql_user(&token, "select 1");
    assert!(!ok, "a revoked token opens no session");
    assert!(err.contains("revoked"), "{err}");
    let sessions = s.cli_ok(&[
        "sessions",
        "list",
        "--identity",
        "user:corp/carol",
        "-o",
        "json",
    ]);
    assert!(
        sessions.contains("user:corp/carol revoked by") && sessions.contains("laptop stolen"),
        "{sessions}"
    );
    s.cli_ok(&["users", "set-groups", "user:corp/carol"]);

    let out = person(&s, &token_file, &["logout"]).output().unwrap();
    assert!(out.status.success());
    assert!(!token_file.exists());
    let out = person(&s, &token_file, &["token"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("gatehouse login"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ci_job_exchanges_its_provider_token_through_a_binding() {
    let (s, p) = setup(&[]);
    s.create_account("deployer", &["ci"]);
    s.create_account("other", &[]);
    s.cli_ok(&[
        "rules",
        "create",
        "--subject",
        "sa:deployer",
        "--target",
        "db",
    ]);
    s.cli_ok(&["rules", "create", "--subject", "sa:other", "--target", "db"]);
    for (sa, subject) in [("deployer", "ci-*"), ("other", "release-bot")] {
        s.cli_ok(&[
            "service-accounts",
            "bind",
            sa,
            "--issuer",
            "corp",
            "--subject",
            subject,
            "--audience",
            oidc::RESOURCE,
            "--claim",
            "scope=gatehouse",
        ]);
    }
    let jwt = p.client_credentials().await;
    let jwt_file = secret_file(s.tmp.path(), "ci.jwt", &jwt);
    let token_file = s.tmp.path().join("ci").join("token.json");
    let out = person(
        &s,
        &token_file,
        &[
            "login",
            "--workload-token-file",
            jwt_file.to_str().unwrap(),
            "--service-account",
            "deployer",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("logged in as sa:deployer"), "{said}");
    let token = String::from_utf8(person(&s, &token_file, &["token"]).output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let (out, err, ok) = s.psql_user(&token, "select 'from ci'");
    assert!(ok, "{err}");
    assert!(out.contains("from ci"));
    let events = s.audit_events(&["--identity", "sa:deployer"]);
    let login = events
        .iter()
        .find(|e| e["kind"] == "login" && e["decision"] == "allow")
        .unwrap_or_else(|| panic!("no login event: {events:?}"));
    assert_eq!(login["issuer"], p.issuer(), "the workload's issuer vouched");
    assert!(events.iter().any(|e| e["kind"] == "session_start"
        && e["decision"] == "allow"
        && e["issuer"] == p.issuer()));

    // The same token does not match the other account's binding.
    let out = person(
        &s,
        &token_file,
        &[
            "login",
            "--workload-token-file",
            jwt_file.to_str().unwrap(),
            "--service-account",
            "other",
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("subject \"ci-runner\" does not match the binding's \"release-bot\""),
        "{err}"
    );
    let refused = s.audit_events(&["--identity", "sa:other"]);
    assert!(
        refused
            .iter()
            .any(|e| e["kind"] == "login" && e["decision"] == "deny"),
        "the refusal is audited: {refused:?}"
    );
}

/// A JWT signed by `sign` over `header` and `claims`.
fn jwt(
    header: serde_json::Value,
    claims: &serde_json::Value,
    sign: impl Fn(&[u8]) -> Vec<u8>,
) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", B64.encode(sig))
}

fn rs256(pem: &str) -> impl Fn(&[u8]) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(&der).unwrap();
    move |msg| {
        let mut sig = vec![0; key.public_modulus_len()];
        key.sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            msg,
            &mut sig,
        )
        .unwrap();
        sig
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_tokens_are_validated_completely() {
    let (s, mut p) = setup(&[]);
    s.cli_ok(&[
        "rules",
        "create",
        "--subject",
        "group:dba",
        "--target",
        "db",
    ]);
    let dir = s.tmp.path().join("negatives");
    std::fs::create_dir_all(&dir).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let iss = p.issuer();
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = serde_json::json!({
            "iss": iss, "sub": "dave", "aud": oidc::CLIENT_ID,
            "iat": now, "exp": now + 300, "email": "dave@example.com", "groups": ["dba"],
        });
        f(&mut c);
        c
    };
    let key = p.key();
    let header = |kid: &str| serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    // Failures from one address back off; like a real client, wait out
    // the back-off the refusal names and try again (bounded).
    let try_login = |name: &str, token: &str| {
        let f = secret_file(&dir, name, token);
        for _ in 0..10 {
            let out = person(
                &s,
                &dir.join(format!("{name}.token")),
                &["login", "--id-token-file", f.to_str().unwrap()],
            )
            .output()
            .unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            if let Some(wait) = gatehouse_e2e::retry_after(&err) {
                std::thread::sleep(wait);
                continue;
            }
            return (out.status.success(), err);
        }
        panic!("{name}: still throttled after 10 tries");
    };

    // The control: a well-formed token signed by the provider's key.
    let good = jwt(header(&key.kid), &claims(&|_| {}), rs256(&key.pem));
    let (ok, err) = try_login("good", &good);
    assert!(ok, "a valid ID token logs in: {err}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            jwt(
                header(&key.kid),
                &claims(&|c| {
                    c["iat"] = (now - 7200).into();
                    c["exp"] = (now - 3600).into();
                }),
                rs256(&key.pem),
            ),
            "expired",
        ),
        (
            "wrong-issuer",
            jwt(
                header(&key.kid),
                &claims(&|c| c["iss"] = "http://127.0.0.1:1".into()),
                rs256(&key.pem),
            ),
            "wrong issuer",
        ),
        (
            "wrong-audience",
            jwt(
                header(&key.kid),
                &claims(&|c| c["aud"] = "someone-else".into()),
                rs256(&key.pem),
            ),
            "wrong audience",
        ),
        (
            "untrusted-extra-audience",
            jwt(
                header(&key.kid),
                &claims(&|c| c["aud"] = serde_json::json!([oidc::CLIENT_ID, "evil"])),
                rs256(&key.pem),
            ),
            "`evil` is not a trusted audience",
        ),
        (
            "alg-none",
            format!(
                "{}.{}.",
                B64.encode(serde_json::json!({"alg": "none", "kid": key.kid}).to_string()),
                B64.encode(claims(&|_| {}).to_string())
            ),
            "No signature",
        ),
        (
            "hs256-with-public-key",
            jwt(
                serde_json::json!({"alg": "HS256", "kid": key.kid}),
                &claims(&|_| {}),
                |m| {
                    let k = aws_lc_rs::hmac::Key::new(
                        aws_lc_rs::hmac::HMAC_SHA256,
                        key.public_pem.as_bytes(),
                    );
                    aws_lc_rs::hmac::sign(&k, m).as_ref().to_vec()
                },
            ),
            "algorithm not allowed",
        ),
        (
            "unknown-kid",
            jwt(header("no-such-key"), &claims(&|_| {}), rs256(&key.pem)),
            "no key of the provider matches",
        ),
        (
            "future-iat",
            jwt(
                header(&key.kid),
                &claims(&|c| c["iat"] = (now + 3600).into()),
                rs256(&key.pem),
            ),
            "issued in the future",
        ),
        (
            "not-yet-valid",
            jwt(
                header(&key.kid),
                &claims(&|c| c["nbf"] = (now + 3600).into()),
                rs256(&key.pem),
            ),
            "not valid before",
        ),
    ];
    for (name, token, why) in &cases {
        let (ok, err) = try_login(name, token);
        assert!(!ok, "{name} must be refused");
        assert!(err.contains(why), "{name}: expected {why:?} in: {err}");
    }

    // Key rotation: the provider now signs with key-2 only. A token with
    // the new key id makes the server fetch the keys again; afterwards a
    // token from the rotated-out key is refused.
    let old = key;
    p.keygen("key-2");
    p.launch();
    let new = p.key();
    let fresh = jwt(header(&new.kid), &claims(&|_| {}), rs256(&new.pem));
    let (ok, err) = try_login("rotated-new", &fresh);
    assert!(
        ok,
        "a token from the new key is accepted after the refresh: {err}"
    );
    let stale = jwt(header(&old.kid), &claims(&|_| {}), rs256(&old.pem));
    let (ok, err) = try_login("rotated-old", &stale);
    assert!(!ok, "a token from the rotated-out key is refused");
    assert!(err.contains("no key of the provider matches"), "{err}");

    // Each refusal is a login audit event naming the check.
    let denied: Vec<String> = s
        .audit_events(&[])
        .into_iter()
        .filter(|e| e["kind"] == "login" && e["decision"] == "deny")
        .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(denied.len() > cases.len(), "{denied:#?}");
    assert!(denied.iter().any(|d| d.contains("expired")), "{denied:#?}");
}

/// The login service from source address `ip`.
async fn identity_from(
    s: &Stack,
    ip: [u8; 4],
) -> gatehouse_proto::v1::identity_client::IdentityClient<tonic::transport::Channel> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let ca = std::fs::read_to_string(&s.ca_file).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("127.0.0.1");
    let ch = Channel::from_shared(s.api.clone())
        .unwrap()
        .local_address(Some(std::net::IpAddr::from(ip)))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    gatehouse_proto::v1::identity_client::IdentityClient::new(ch)
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_from_one_address_are_throttled_and_do_not_lock_out_another() {
    use futures::StreamExt;
    use gatehouse_proto::v1::ExchangeTokenRequest;
    let (s, p) = setup(&[]);
    s.create_account("deployer", &[]);
    s.cli_ok(&[
        "service-accounts",
        "bind",
        "deployer",
        "--issuer",
        "corp",
        "--subject",
        "ci-*",
        "--audience",
        oidc::RESOURCE,
    ]);
    let good = p.client_credentials().await;
    // The same token with its signature broken: it names the trusted
    // issuer and the account, so every attempt counts against both.
    let (head, _) = good.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", B64.encode([7u8; 256]));
    let exchange = |token: String| ExchangeTokenRequest {
        subject_token: token,
        subject_token_type: "urn:ietf:params:oauth:token-type:jwt".into(),
        service_account: "deployer".into(),
    };

    let attacker = identity_from(&s, [127, 0, 0, 1]).await;
    let started = std::time::Instant::now();
    let codes: Vec<tonic::Code> = futures::stream::iter(0..2000)
        .map(|_| {
            let mut c = attacker.clone();
            let req = exchange(forged.clone());
            async move { c.exchange_token(req).await.unwrap_err().code() }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let spent = started.elapsed();
    let checked = codes
        .iter()
        .filter(|c| **c == tonic::Code::Unauthenticated)
        .count();
    let throttled = codes
        .iter()
        .filter(|c| **c == tonic::Code::ResourceExhausted)
        .count();
    assert_eq!(
        checked + throttled,
        2000,
        "every forged login failed: {codes:?}"
    );
    assert!(
        throttled > 1500,
        "most attempts are refused unchecked once the source backs off ({checked} checked)"
    );
    assert!(
        spent < std::time::Duration::from_secs(120),
        "bounded: {spent:?}"
    );

    // A valid login from another address succeeds at once.
    let mut legit = identity_from(&s, [127, 0, 0, 2]).await;
    let t = std::time::Instant::now();
    let r = legit.exchange_token(exchange(good)).await;
    let took = t.elapsed();
    assert!(r.is_ok(), "{r:?}");
    assert!(
        took < std::time::Duration::from_secs(1),
        "not slowed: {took:?}"
    );

    // Both the refusals and the throttling are evidence.
    let events = s.audit_events(&[]);
    let refused = events
        .iter()
        .filter(|e| e["kind"] == "login" && e["decision"] == "deny")
        .count();
    assert!(
        refused >= checked,
        "every checked refusal is audited ({refused} of {checked})"
    );
    let throttle = events
        .iter()
        .find(|e| e["kind"] == "login_throttled")
        .unwrap_or_else(|| panic!("no login_throttled event"));
    assert!(
        throttle["detail"].as_str().unwrap().contains("127.0.0.1"),
        "{throttle}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_refreshed_by_logging_in_again_the_same_way() {
    // Tokens live 60 s, and one that expires within a minute counts as
    // expired: every `gatehouse token` refreshes.
    let (s, _p) = setup_with(
        &[("frank", "frank@example.com", &["dba"])],
        &["--token-ttl-secs", "60"],
    );
    s.cli_ok(&[
        "rules",
        "create",
        "--subject",
        "group:dba",
        "--target",
        "db",
    ]);
    let token_file = s.tmp.path().join("frank").join("token.json");
    let browse_at = |url: String| async move {
        let stop = redirect_uri_of(&url);
        oidc::browse(&url, "frank", Some(&stop)).await
    };
    login_via(
        person(&s, &token_file, &["login", "--no-browser"]),
        "http://127.0.0.1",
        browse_at,
    )
    .await;
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&token_file).unwrap()).unwrap();
    // `gatehouse token` logs in again at the same issuer (instructions on
    // stderr), then prints only the new token.
    let out = login_via(
        person(&s, &token_file, &["token"]),
        "http://127.0.0.1",
        browse_at,
    )
    .await;
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_ne!(
        token,
        first["access_token"].as_str().unwrap(),
        "a new token"
    );
    assert_eq!(
        token.split('.').count(),
        3,
        "only the token on stdout: {token}"
    );
    let (_, err, ok) = s.psql_user(&token, "select 1");
    assert!(ok, "{err}");
}
