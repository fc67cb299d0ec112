//! SAML 2.0: the service provider logs people in with responses signed by
//! an identity provider key made here (signed with the real `xmlsec1`),
//! and refuses each kind of bad response with its own error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use gatehouse_e2e::Stack;

const IDP: &str = "https://idp.test/saml";

/// An IdP key and self-signed certificate, as PEM files.
struct IdpKey {
    key: std::path::PathBuf,
    cert_der_b64: String,
}

fn idp_key(dir: &std::path::Path, name: &str) -> IdpKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .or_else(|_| rcgen::KeyPair::generate())
        .unwrap();
    let params = rcgen::CertificateParams::new(vec!["idp.test".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, format!("{}{}", key.serialize_pem(), cert.pem())).unwrap();
    IdpKey {
        key: path,
        cert_der_b64: B64.encode(cert.der()),
    }
}

fn metadata(k: &IdpKey) -> String {
    format!(
        r#"<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" entityID="{IDP}"><md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol"><md:KeyDescriptor use="signing"><ds:KeyInfo xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:X509Data><ds:X509Certificate>{}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor><md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect" Location="https://idp.test/sso"/></md:IDPSSODescriptor></md:EntityDescriptor>"#,
        k.cert_der_b64
    )
}

fn ts(offset_secs: i64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + offset_secs;
    // RFC 3339 in UTC, computed without a date library.
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// What a response says; each field can be made wrong.
struct Resp {
    request_id: String,
    audience: String,
    acs: String,
    assertion_id: String,
    not_on_or_after: String,
    name_id: String,
}

fn assertion(r: &Resp, signature: bool) -> String {
    let sig = if signature {
        format!(
            r##"<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:SignedInfo><ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/><ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/><ds:Reference URI="#{}"><ds:Transforms><ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/><ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/></ds:Transforms><ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/><ds:DigestValue/></ds:Reference></ds:SignedInfo><ds:SignatureValue/></ds:Signature>"##,
            r.assertion_id
        )
    } else {
        String::new()
    };
    format!(
        r#"<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="{aid}" Version="2.0" IssueInstant="{now}"><saml:Issuer>{IDP}</saml:Issuer>{sig}<saml:Subject><saml:NameID Format="urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress">{name}</saml:NameID><saml:SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:bearer"><saml:SubjectConfirmationData InResponseTo="{rid}" Recipient="{acs}" NotOnOrAfter="{noa}"/></saml:SubjectConfirmation></saml:Subject><saml:Conditions NotBefore="{before}" NotOnOrAfter="{noa}"><saml:AudienceRestriction><saml:Audience>{aud}</saml:Audience></saml:AudienceRestriction></saml:Conditions><saml:AuthnStatement AuthnInstant="{now}"><saml:AuthnContext><saml:AuthnContextClassRef>urn:oasis:names:tc:SAML:2.0:ac:classes:Password</saml:AuthnContextClassRef></saml:AuthnContext></saml:AuthnStatement><saml:AttributeStatement><saml:Attribute Name="groups"><saml:AttributeValue>dba</saml:AttributeValue><saml:AttributeValue>eng</saml:AttributeValue></saml:Attribute><saml:Attribute Name="email"><saml:AttributeValue>{name}</saml:AttributeValue></saml:Attribute></saml:AttributeStatement></saml:Assertion>"#,
        aid = r.assertion_id,
        now = ts(0),
        before = ts(-60),
        name = r.name_id,
        rid = r.request_id,
        acs = r.acs,
        noa = r.not_on_or_after,
        aud = r.audience,
    )
}

fn response(r: &Resp, inner: &str) -> String {
    format!(
        r#"<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_r{}" Version="2.0" IssueInstant="{}" Destination="{}" InResponseTo="{}"><saml:Issuer>{IDP}</saml:Issuer><samlp:Status><samlp:StatusCode Value="urn:oasis:names:tc:SAML:2.0:status:Success"/></samlp:Status>{inner}</samlp:Response>"#,
        r.assertion_id,
        ts(0),
        r.acs,
        r.request_id
    )
}

/// Signs the assertion of `xml` with `key` using the real xmlsec1.
fn sign(dir: &std::path::Path, xml: &str, key: &IdpKey) -> String {
    let tmpl = dir.join("tmpl.xml");
    let out = dir.join("signed.xml");
    std::fs::write(&tmpl, xml).unwrap();
    let st = Command::new("xmlsec1")
        .args(["--sign", "--privkey-pem"])
        .arg(&key.key)
        .args([
            "--id-attr:ID",
            "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
            "--output",
        ])
        .arg(&out)
        .arg(&tmpl)
        .output()
        .expect("xmlsec1 (installed by scripts/deps.sh test)");
    assert!(
        st.status.success(),
        "xmlsec1: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read_to_string(out).unwrap()
}

fn web(s: &Stack) -> reqwest::Client {
    let ca = std::fs::read(&s.ca_file).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// SP-initiated: the login route's redirect to the IdP, and the request
/// id and RelayState it carries.
async fn start(c: &reqwest::Client, s: &Stack) -> (String, String) {
    start_at(c, s, "corp-saml").await
}

async fn start_at(c: &reqwest::Client, s: &Stack, issuer: &str) -> (String, String) {
    let r = c
        .get(format!("{}/saml/{issuer}/login", s.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302, "{:?}", r.text().await);
    let loc = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(loc.host_str(), Some("idp.test"));
    let q: std::collections::HashMap<String, String> = loc.query_pairs().into_owned().collect();
    let deflated = B64.decode(&q["SAMLRequest"]).unwrap();
    let mut xml = String::new();
    flate2::read::DeflateDecoder::new(&deflated[..])
        .read_to_string(&mut xml)
        .unwrap();
    let i = xml.find(" ID=\"").unwrap() + 5;
    let id = xml[i..i + xml[i..].find('"').unwrap()].to_string();
    (id, q["RelayState"].clone())
}

/// Posts a response to the ACS, waiting out the failed-login back-off as
/// a browser user retrying would.
async fn post(
    c: &reqwest::Client,
    s: &Stack,
    xml: &str,
    relay: &str,
) -> (u16, String, Option<String>) {
    for _ in 0..10 {
        let r = c
            .post(format!("{}/saml/corp-saml/acs", s.api))
            .form(&[
                ("SAMLResponse", B64.encode(xml)),
                ("RelayState", relay.to_string()),
            ])
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let cookie = r
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.text().await.unwrap();
        if status == 429 {
            let wait =
                gatehouse_e2e::retry_after(&body).unwrap_or(std::time::Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            continue;
        }
        return (status, body, cookie);
    }
    panic!("still throttled");
}

#[tokio::test(flavor = "multi_thread")]
async fn saml_logins_are_validated_and_each_bad_response_is_refused() {
    let (s, _) = Stack::start();
    let dir = s.tmp.path().join("saml");
    std::fs::create_dir_all(&dir).unwrap();
    let key = idp_key(&dir, "idp");
    let other = idp_key(&dir, "other");
    let md = dir.join("idp-metadata.xml");
    std::fs::write(&md, metadata(&key)).unwrap();
    s.cli_ok(&[
        "issuers",
        "add-saml",
        "corp-saml",
        "--metadata-file",
        md.to_str().unwrap(),
    ]);
    s.cli_ok(&[
        "rules",
        "create",
        "--subject",
        "group:dba",
        "--target",
        "db",
    ]);

    let c = web(&s);
    let sp_md = c
        .get(format!("{}/saml/corp-saml/metadata", s.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sp_entity = format!("{}/saml/corp-saml", s.api);
    let acs = format!("{}/saml/corp-saml/acs", s.api);
    assert!(
        sp_md.contains(&sp_entity) && sp_md.contains(&acs),
        "{sp_md}"
    );

    let (rid, relay) = start(&c, &s).await;
    let good = |aid: &str| Resp {
        request_id: rid.clone(),
        audience: sp_entity.clone(),
        acs: acs.clone(),
        assertion_id: aid.to_string(),
        not_on_or_after: ts(300),
        name_id: "erin@example.com".into(),
    };
    let signed = |r: &Resp, k: &IdpKey| sign(&dir, &response(r, &assertion(r, true)), k);

    // A good response logs erin in: token shown once and as a secure cookie.
    let ok = signed(&good("_a1"), &key);
    let (status, body, cookie) = post(&c, &s, &ok, &relay).await;
    assert_eq!(status, 200, "{body}");
    let token = body.lines().last().unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "{body}");
    let cookie = cookie.unwrap();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let (out, err, ok_psql) = s.psql_user(&token, "select 'saml'");
    assert!(ok_psql && out.contains("saml"), "{err}");
    let ev = s.audit_events(&["--identity", "user:corp-saml/erin@example.com"]);
    let start_ev = ev
        .iter()
        .find(|e| e["kind"] == "session_start" && e["decision"] == "allow")
        .unwrap();
    assert_eq!(start_ev["issuer"], IDP);
    assert_eq!(start_ev["groups"], serde_json::json!(["dba", "eng"]));

    // Each bad response is refused with its own error.
    let mut wrapped = good("_a3");
    wrapped.name_id = "mallory@example.com".into();
    let genuine = signed(&good("_a3"), &key);
    // Signature wrapping: the signed assertion moved into Extensions, an
    // unsigned one with the same ID and another subject in its place.
    let (sig_start, sig_end) = (
        genuine.find("<saml:Assertion").unwrap(),
        genuine.find("</saml:Assertion>").unwrap() + "</saml:Assertion>".len(),
    );
    let signed_assertion = &genuine[sig_start..sig_end];
    let xsw = response(
        &wrapped,
        &format!(
            "<samlp:Extensions>{signed_assertion}</samlp:Extensions>{}",
            assertion(&wrapped, false)
        ),
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad signature",
            signed(&good("_a2"), &other),
            "bad signature",
        ),
        ("signature wrapping", xsw, "bad signature"),
        (
            "wrong audience",
            signed(
                &Resp {
                    audience: "https://other.example/sp".into(),
                    ..good("_a4")
                },
                &key,
            ),
            "Audience",
        ),
        (
            "expired",
            signed(
                &Resp {
                    not_on_or_after: ts(-3600),
                    ..good("_a5")
                },
                &key,
            ),
            "expired",
        ),
        (
            "mismatched InResponseTo",
            signed(
                &Resp {
                    request_id: "_not-our-request".into(),
                    ..good("_a6")
                },
                &key,
            ),
            "InResponseTo",
        ),
        ("replayed assertion id", ok.clone(), "already used (replay)"),
    ];
    for (what, xml, needle) in &cases {
        let (status, body, cookie) = post(&c, &s, xml, &relay).await;
        eprintln!("{what}: {status} {}", body.trim());
        assert_eq!(status, 403, "{what} must be refused: {body}");
        assert!(cookie.is_none(), "{what}: no cookie");
        assert!(
            body.contains(needle),
            "{what}: expected {needle:?} in {body}"
        );
    }
    let all = s.audit_events(&[]);
    assert!(
        !all.iter()
            .any(|e| e["identity"] == "user:corp-saml/mallory@example.com"
                && e["decision"] == "allow"),
        "the wrapped assertion's subject never logged in"
    );
    let refusals = all
        .iter()
        .filter(|e| e["kind"] == "login" && e["decision"] == "deny")
        .filter(|e| e["detail"].as_str().unwrap_or("").contains("SAML login"))
        .count();
    assert_eq!(refusals, cases.len(), "each refusal is audited");
}

#[tokio::test(flavor = "multi_thread")]
async fn saml_metadata_can_be_fetched_from_the_idp() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (s, _) = Stack::start();
    let dir = s.tmp.path().join("saml");
    std::fs::create_dir_all(&dir).unwrap();
    let xml = metadata(&idp_key(&dir, "idp"));
    // The IdP's metadata endpoint, on loopback.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metadata", l.local_addr().unwrap());
    let served = xml.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf).await;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/samlmetadata+xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{served}",
                served.len()
            );
            let _ = c.write_all(reply.as_bytes()).await;
        }
    });
    s.cli_ok(&["issuers", "add-saml", "by-url", "--metadata-url", &url]);
    let list: serde_json::Value =
        serde_json::from_str(&s.cli_ok(&["issuers", "list", "-o", "json"])).unwrap();
    let i = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "by-url")
        .unwrap();
    assert_eq!(i["kind"], "saml");
    assert_eq!(
        i["issuer_url"], IDP,
        "the entity id comes from the fetched metadata"
    );
    // The login route works from it.
    let (id, _) = start_at(&web(&s), &s, "by-url").await;
    assert!(!id.is_empty());
    // A metadata address that does not answer is a clear error.
    let out = s.cli(&[
        "issuers",
        "add-saml",
        "gone",
        "--metadata-url",
        "http://127.0.0.1:1/md",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fetching the SAML metadata from"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TLS connection to the API port offering only `alpn`.
async fn api_tls(s: &Stack, alpn: &[u8]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&s.ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.api.trim_start_matches("https://"))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_port_serves_http1_and_closes_a_connection_that_sends_no_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (s, _) = Stack::start_opts(false, "", &["--handshake-timeout-secs", "2"]);
    // A browser speaking HTTP/1.1 (the SAML routes) is answered.
    let mut c = api_tls(&s, b"http/1.1").await;
    c.write_all(
        b"GET /saml/nobody/metadata HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    assert!(reply.contains("no SAML issuer named \"nobody\""), "{reply}");
    // A client that finishes TLS and then sends nothing is closed at the
    // stage deadline.
    let mut idle = api_tls(&s, b"http/1.1").await;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), idle.read(&mut buf)).await;
    let waited = started.elapsed();
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "the idle connection is closed, not answered: {r:?}"
    );
    assert!(
        waited >= std::time::Duration::from_millis(1500)
            && waited < std::time::Duration::from_secs(5),
        "closed at the 2 s deadline, after {waited:?}"
    );
}
