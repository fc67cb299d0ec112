//! The dependency rule of the workspace: control-plane and edge-agent crates
//! never depend on each other, lib crates depend only on lib crates, and the
//! agent does not link Raft or the API server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

fn metadata() -> serde_json::Value {
    // This machine's platform only: offline, cargo can resolve only the
    // packages a build here has downloaded.
    let host = Command::new("rustc").arg("-vV").output().unwrap();
    let host = String::from_utf8(host.stdout).unwrap();
    let triple = host
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap()
        .to_string();
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &triple])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn workspace_dependency_rule_holds() {
    let m = metadata();
    let root = m["workspace_root"].as_str().unwrap().to_string();
    let mut area: BTreeMap<String, String> = BTreeMap::new();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut all: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Without optional dependencies: what a crate links unless a feature it
    // asks for adds more (the SSH crate asks the proto crate for russh).
    let mut required: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in m["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap().to_string();
        let d: Vec<String> = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        all.insert(name.clone(), d.iter().cloned().collect());
        required.insert(
            name.clone(),
            p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null() && d["optional"] != true)
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect(),
        );
        let manifest = p["manifest_path"].as_str().unwrap();
        if let Some(rel) = manifest.strip_prefix(&root) {
            let first = rel
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap()
                .to_string();
            area.insert(name.clone(), first);
            deps.insert(name, d);
        }
    }
    for (pkg, ds) in &deps {
        for d in ds.iter().filter(|d| area.contains_key(*d)) {
            let (from, to) = (&area[pkg], &area[d]);
            match from.as_str() {
                "lib" => assert_eq!(to, "lib", "{pkg} (lib) depends on {d} ({to})"),
                "control-plane" => assert_ne!(to, "edge-agent", "{pkg} depends on {d}"),
                "edge-agent" => assert_ne!(to, "control-plane", "{pkg} depends on {d}"),
                _ => {}
            }
        }
    }
    // The agent's whole normal-dependency closure.
    let mut seen = BTreeSet::new();
    let mut stack = vec!["gatehouse-agent".to_string()];
    while let Some(p) = stack.pop() {
        if seen.insert(p.clone()) {
            stack.extend(all.get(&p).into_iter().flatten().cloned());
        }
    }
    for banned in [
        "openraft",
        "redb",
        "gatehouse-cp-raft",
        "gatehouse-cp-server",
        "openidconnect",
        "samael",
    ] {
        assert!(!seen.contains(banned), "the agent links {banned}");
    }
    // A crate per protocol over a shared core: the core links no protocol
    // (nor a protocol's wire library), and no protocol links another.
    let closure = |root: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![root.to_string()];
        while let Some(p) = stack.pop() {
            if seen.insert(p.clone()) {
                stack.extend(required.get(&p).into_iter().flatten().cloned());
            }
        }
        seen
    };
    // Messages name the crates, so each assertion says which side broke.
    let crate_rule = |core: &str, protocols: &[&str], wire: &[&str]| {
        let on_core = closure(core);
        for banned in protocols.iter().chain(wire) {
            assert!(!on_core.contains(*banned), "{core} links {banned}");
        }
        for p in protocols {
            let c = closure(p);
            assert!(c.contains(core), "{p} is not on {core}");
            for other in protocols.iter().filter(|o| *o != p) {
                assert!(!c.contains(*other), "{p} links {other}");
            }
        }
    };
    crate_rule(
        "gatehouse-agent-core",
        &["gatehouse-agent-pg", "gatehouse-agent-ssh"],
        &["russh", "pgwire", "gatehouse-pgwire-inspect"],
    );
    assert!(
        !closure("gatehouse-agent-ssh").contains("gatehouse-pgwire-inspect"),
        "the SSH crate links PostgreSQL's inspector"
    );
    // The same on the control plane: the server core links no ingress
    // crate and no PostgreSQL wire library.
    crate_rule(
        "gatehouse-cp-server",
        &["gatehouse-cp-ingress-pg", "gatehouse-cp-ingress-ssh"],
        &["pgwire", "gatehouse-pgwire-inspect"],
    );
}
