//! Roles on the API: every call of the Admin and Reviews services, made by
//! an identity holding each role (and none, and the break-glass token).
//! What a role is not granted is refused with PERMISSION_DENIED naming the
//! caller's roles, the refusal is audited, and nothing changes; the
//! auditor reads everything and each of its reads is an audit event.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use gatehouse_cli::client::{Client, ReviewsClient, connect, connect_reviews};
use gatehouse_e2e::Stack;
use gatehouse_proto::v1::*;
use tonic::{Code, Status};

/// Every RPC, called once with harmless arguments; the outcome of each.
async fn call_all(
    a: &mut Client,
    r: &mut ReviewsClient,
    tag: &str,
) -> Vec<(&'static str, Result<(), Status>)> {
    macro_rules! call {
        ($out:ident, $name:literal, $e:expr) => {
            $out.push(($name, $e.await.map(|_| ())));
        };
    }
    let mut out = Vec::new();
    let name = |what: &str| format!("{what}-{tag}");
    call!(
        out,
        "CreateServiceAccount",
        a.create_service_account(CreateServiceAccountRequest {
            name: name("sa"),
            groups: vec![]
        })
    );
    call!(
        out,
        "ListServiceAccounts",
        a.list_service_accounts(ListRequest {})
    );
    call!(
        out,
        "CreateTarget",
        a.create_target(CreateTargetRequest {
            name: name("t"),
            kind: "postgres".into(),
            agent: "edge-1".into(),
            default_db_user: String::new()
        })
    );
    call!(out, "ListTargets", a.list_targets(ListRequest {}));
    call!(
        out,
        "CreateRule",
        a.create_rule(CreateRuleRequest {
            subject: format!("sa:{}", name("nobody")),
            target: "db".into(),
            ..Default::default()
        })
    );
    call!(out, "ListRules", a.list_rules(ListRequest {}));
    call!(out, "ApplyPolicy", a.apply_policy(ApplyPolicyRequest { yaml: format!("guardrails:\n  default: allow\n  rules:\n    - name: r-{tag}\n      action: deny\n      kinds: [ddl]\n") }));
    call!(
        out,
        "GetPolicy",
        a.get_policy(GetPolicyRequest {
            seq: 0,
            doc_version: String::new()
        })
    );
    call!(out, "ListPolicies", a.list_policies(ListRequest {}));
    call!(
        out,
        "CreateEnrollmentToken",
        a.create_enrollment_token(CreateEnrollmentTokenRequest {
            agent: name("agent"),
            ttl_seconds: 60
        })
    );
    call!(out, "ListAgents", a.list_agents(ListRequest {}));
    call!(
        out,
        "ListSessions",
        a.list_sessions(ListSessionsRequest::default())
    );
    call!(
        out,
        "GetRecording",
        a.get_recording(GetRecordingRequest {
            session_id: "no-such-session".into()
        })
    );
    call!(
        out,
        "VerifyRecordings",
        a.verify_recordings(VerifyRecordingsRequest {
            session_id: "no-such-session".into(),
            all: false
        })
    );
    call!(
        out,
        "CheckTarget",
        a.check_target(CheckTargetRequest {
            target: "no-such-target".into(),
            database: String::new()
        })
    );
    call!(
        out,
        "DeleteRule",
        a.delete_rule(DeleteRuleRequest {
            id: "no-such-rule".into()
        })
    );
    call!(
        out,
        "RevokeIdentity",
        a.revoke_identity(RevokeIdentityRequest {
            identity: "sa:no-such-account".into(),
            reason: "r".into(),
            key_id: String::new()
        })
    );
    call!(
        out,
        "WatchSession",
        a.watch_session(WatchSessionRequest {
            session_id: "no-such-session".into()
        })
    );
    call!(
        out,
        "KillSession",
        a.kill_session(KillSessionRequest {
            session_id: "no-such-session".into(),
            reason: "r".into()
        })
    );
    call!(
        out,
        "SetLegalHold",
        a.set_legal_hold(SetLegalHoldRequest {
            session_id: "no-such-session".into(),
            hold: true,
            reason: "r".into()
        })
    );
    call!(
        out,
        "ListAuditEvents",
        a.list_audit_events(ListAuditEventsRequest {
            limit: 1,
            ..Default::default()
        })
    );
    call!(out, "Status", a.status(ListRequest {}));
    call!(
        out,
        "CreateJoinToken",
        a.create_join_token(CreateJoinTokenRequest {
            node_id: 9,
            ttl_seconds: 60
        })
    );
    call!(out, "ClusterStatus", a.cluster_status(ListRequest {}));
    call!(
        out,
        "RemoveNode",
        a.remove_node(RemoveNodeRequest { node_id: 99 })
    );
    call!(out, "StateDigest", a.state_digest(ListRequest {}));
    call!(
        out,
        "PutIssuer",
        a.put_issuer(PutIssuerRequest {
            issuer: Some(Issuer {
                name: name("idp"),
                kind: "oidc".into(),
                issuer_url: "https://idp.example.com".into(),
                client_id: "gh".into(),
                ..Default::default()
            })
        })
    );
    call!(out, "ListIssuers", a.list_issuers(ListRequest {}));
    call!(
        out,
        "DeleteIssuer",
        a.delete_issuer(DeleteIssuerRequest {
            name: "no-such-issuer".into()
        })
    );
    call!(
        out,
        "AddWorkloadBinding",
        a.add_workload_binding(AddWorkloadBindingRequest {
            service_account: "alice".into(),
            binding: Some(WorkloadBinding {
                issuer: "no-such-issuer".into(),
                subject: "x".into(),
                audience: "y".into(),
                claims: Default::default()
            })
        })
    );
    call!(out, "ListUsers", a.list_users(ListRequest {}));
    call!(
        out,
        "SetStaticGroups",
        a.set_static_groups(SetStaticGroupsRequest {
            identity: format!("sa:{}", name("nobody")),
            groups: vec!["g".into()]
        })
    );
    call!(
        out,
        "GrantRole",
        a.grant_role(RoleGrant {
            role: "user".into(),
            principal: format!("sa:{}", name("nobody")),
            created_ms: 0
        })
    );
    call!(
        out,
        "RevokeRole",
        a.revoke_role(RoleGrant {
            role: "user".into(),
            principal: "sa:no-such-account".into(),
            created_ms: 0
        })
    );
    call!(out, "ListRoleGrants", a.list_role_grants(ListRequest {}));
    call!(out, "WhoAmI", a.who_am_i(ListRequest {}));
    call!(
        out,
        "IssueSshCertificate",
        a.issue_ssh_certificate(IssueSshCertificateRequest {
            public_key: "not a key".into(),
            ttl_secs: 60
        })
    );
    call!(out, "GetSshSetup", a.get_ssh_setup(ListRequest {}));
    call!(
        out,
        "ListAccessRequests",
        r.list_access_requests(ListAccessRequestsRequest::default())
    );
    call!(
        out,
        "ReviewAccessRequest",
        r.review_access_request(ReviewAccessRequestRequest {
            id: "no-such-request".into(),
            approve: true,
            reason: String::new()
        })
    );
    out
}

/// The specification: which calls each role may make.
fn granted(role: &str, rpc: &str) -> bool {
    const CONFIG: &[&str] = &[
        "CreateServiceAccount",
        "CreateTarget",
        "CreateRule",
        "DeleteRule",
        "RevokeIdentity",
        "ApplyPolicy",
        "CreateEnrollmentToken",
        "SetLegalHold",
        "CreateJoinToken",
        "RemoveNode",
        "PutIssuer",
        "DeleteIssuer",
        "AddWorkloadBinding",
        "SetStaticGroups",
        "GrantRole",
        "RevokeRole",
    ];
    const CONFIG_READ: &[&str] = &[
        "ListServiceAccounts",
        "ListTargets",
        "ListRules",
        "GetPolicy",
        "ListPolicies",
        "ListAgents",
        "Status",
        "ClusterStatus",
        "StateDigest",
        "ListIssuers",
        "ListUsers",
        "ListRoleGrants",
        "VerifyRecordings",
        "CheckTarget",
    ];
    const BREAK_GLASS: &[&str] = &[
        "CreateServiceAccount",
        "GrantRole",
        "RevokeRole",
        "PutIssuer",
        "CreateJoinToken",
        "RemoveNode",
        "ListRoleGrants",
        "ListIssuers",
        "Status",
        "ClusterStatus",
        "WhoAmI",
    ];
    if rpc == "WhoAmI" {
        return true;
    }
    // Any identity may hold an SSH certificate; break-glass may not.
    if rpc == "IssueSshCertificate" || rpc == "GetSshSetup" {
        return role != "break-glass";
    }
    match role {
        "admin" => {
            CONFIG.contains(&rpc)
                || CONFIG_READ.contains(&rpc)
                || [
                    "ListSessions",
                    "ListAccessRequests",
                    "KillSession",
                    "WatchSession",
                ]
                .contains(&rpc)
        }
        "auditor" => {
            CONFIG_READ.contains(&rpc)
                || [
                    "ListSessions",
                    "GetRecording",
                    "ListAuditEvents",
                    "ListAccessRequests",
                    "WatchSession",
                ]
                .contains(&rpc)
        }
        "reviewer" => [
            "ListAccessRequests",
            "ReviewAccessRequest",
            "KillSession",
            "WatchSession",
        ]
        .contains(&rpc),
        "user" => ["ListSessions", "GetRecording", "ListAccessRequests"].contains(&rpc),
        "break-glass" => BREAK_GLASS.contains(&rpc),
        _ => false,
    }
}

/// What the configuration looks like, as the harness's admin reads it.
async fn config(a: &mut Client) -> String {
    let mut s = String::new();
    s += &format!(
        "{:?}",
        a.list_service_accounts(ListRequest {})
            .await
            .unwrap()
            .into_inner()
    );
    s += &format!(
        "{:?}",
        a.list_targets(ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .targets
            .iter()
            .map(|t| &t.name)
            .collect::<Vec<_>>()
    );
    s += &format!(
        "{:?}",
        a.list_rules(ListRequest {}).await.unwrap().into_inner()
    );
    s += &format!(
        "{:?}",
        a.list_policies(ListRequest {}).await.unwrap().into_inner()
    );
    s += &format!(
        "{:?}",
        a.list_role_grants(ListRequest {})
            .await
            .unwrap()
            .into_inner()
    );
    s += &format!(
        "{:?}",
        a.list_issuers(ListRequest {}).await.unwrap().into_inner()
    );
    s += &format!(
        "{:?}",
        a.list_users(ListRequest {}).await.unwrap().into_inner()
    );
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_is_authorized_by_role_and_the_rest_is_denied_and_audited() {
    let (s, _) = Stack::start();
    let ca = std::fs::read_to_string(&s.ca_file).unwrap();
    let mut root = connect(&s.api, &s.token, &ca).await.unwrap();
    let mut callers: Vec<(String, String)> = Vec::new();
    for role in ["admin", "auditor", "reviewer", "user", "none"] {
        let name = format!("as-{role}");
        let key = s.create_account(&name, &[]);
        if role != "none" {
            s.cli_ok(&["roles", "grant", role, &format!("sa:{name}")]);
        }
        callers.push((role.to_string(), key));
    }
    callers.push(("break-glass".into(), s.break_glass.clone()));

    for (role, key) in &callers {
        let mut a = connect(&s.api, key, &ca).await.unwrap();
        let mut r = connect_reviews(&s.api, key, &ca).await.unwrap();
        let before = config(&mut root).await;
        let results = call_all(&mut a, &mut r, role).await;
        assert_eq!(results.len(), 40, "every RPC of both services is called");
        let mut denied = BTreeSet::new();
        for (rpc, res) in &results {
            let refused = matches!(res, Err(st) if st.code() == Code::PermissionDenied);
            if granted(role, rpc) {
                assert!(!refused, "{role} may call {rpc}: {res:?}");
            } else {
                let st = res
                    .as_ref()
                    .err()
                    .unwrap_or_else(|| panic!("{role} must not call {rpc}"));
                assert_eq!(st.code(), Code::PermissionDenied, "{role} {rpc}: {st:?}");
                let held = match role.as_str() {
                    "none" => "has no role".to_string(),
                    "break-glass" => "break-glass admin token".to_string(),
                    r => format!("has role {r}"),
                };
                assert!(
                    st.message().contains(&held) && st.message().contains(rpc),
                    "{role} {rpc}: {}",
                    st.message()
                );
                denied.insert(*rpc);
            }
        }
        if role != "admin" && role != "break-glass" {
            assert_eq!(
                before,
                config(&mut root).await,
                "{role}'s refused calls changed nothing"
            );
        }
        // Each refusal is an audit event naming the call.
        let identity = if role == "break-glass" {
            "break-glass".to_string()
        } else {
            format!("sa:as-{role}")
        };
        let events = s.audit_events(&["--identity", &identity]);
        for rpc in &denied {
            assert!(
                events.iter().any(|e| e["kind"] == "api_call"
                    && e["decision"] == "deny"
                    && e["detail"]
                        .as_str()
                        .unwrap()
                        .contains(&format!("{rpc} needs"))),
                "the refusal of {rpc} for {role} is audited"
            );
        }
        match role.as_str() {
            "auditor" => {
                // Health reads (status, membership, the state digest),
                // WhoAmI and the SSH calls (a credential of its own, which
                // is a login event) are not evidence reads.
                let health = [
                    "Status",
                    "ClusterStatus",
                    "StateDigest",
                    "WhoAmI",
                    "IssueSshCertificate",
                    "GetSshSetup",
                ];
                for (rpc, _) in results
                    .iter()
                    .filter(|(rpc, _)| granted("auditor", rpc) && !health.contains(rpc))
                {
                    assert!(
                        events.iter().any(|e| e["kind"] == "api_call"
                            && e["decision"] == "allow"
                            && e["detail"]
                                .as_str()
                                .unwrap()
                                .contains(&format!("auditor read: {rpc} "))),
                        "the auditor's {rpc} is an audit event"
                    );
                }
            }
            "break-glass" => {
                let uses = events
                    .iter()
                    .filter(|e| e["kind"] == "api_call" && e["decision"] == "allow")
                    .count();
                // 11 here, 3 by the harness creating its admin.
                assert_eq!(uses, 11 + 3, "each break-glass use is an audit event");
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_sees_only_its_own_sessions_and_the_auditor_sees_all() {
    let (s, alice) = Stack::start();
    let bob = s.create_account("bob", &[]);
    s.cli_ok(&["rules", "create", "--subject", "sa:bob", "--target", "db"]);
    for p in ["sa:alice", "sa:bob"] {
        s.cli_ok(&["roles", "grant", "user", p]);
    }
    assert!(s.psql_user(&alice, "select 1").2);
    assert!(s.psql_user(&bob, "select 2").2);
    let ca = std::fs::read_to_string(&s.ca_file).unwrap();
    let sessions = |key: String| {
        let api = s.api.clone();
        let ca = ca.clone();
        async move {
            let mut c = connect(&api, &key, &ca).await.unwrap();
            c.list_sessions(ListSessionsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .sessions
                .into_iter()
                .map(|x| x.identity)
                .collect::<BTreeSet<_>>()
        }
    };
    assert_eq!(
        sessions(alice.clone()).await,
        BTreeSet::from(["sa:alice".to_string()])
    );
    assert_eq!(
        sessions(bob.clone()).await,
        BTreeSet::from(["sa:bob".to_string()])
    );
    assert_eq!(
        sessions(s.token.clone()).await,
        BTreeSet::from(["sa:alice".to_string(), "sa:bob".to_string()])
    );
    // Bob cannot read alice's recording.
    let mut c = connect(&s.api, &bob, &ca).await.unwrap();
    let mut root = connect(&s.api, &s.token, &ca).await.unwrap();
    let alices = root
        .list_sessions(ListSessionsRequest {
            identity: "sa:alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions[0]
        .id
        .clone();
    let Err(err) = c
        .get_recording(GetRecordingRequest { session_id: alices })
        .await
    else {
        panic!("bob may not read alice's recording");
    };
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("its own sessions"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_api_credential_is_refused_and_audited() {
    let (s, _) = Stack::start();
    let ca = std::fs::read_to_string(&s.ca_file).unwrap();
    for bad in ["ghk_0000_notakey", "eyJhbGciOiJFUzI1NiJ9.e30.c2ln"] {
        let mut c = connect(&s.api, bad, &ca).await.unwrap();
        let err = c.list_targets(ListRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let events = s.audit_events(&[]);
    let refused: Vec<_> = events
        .iter()
        .filter(|e| {
            e["kind"] == "login"
                && e["decision"] == "deny"
                && e["detail"]
                    .as_str()
                    .unwrap()
                    .contains("API credential for ListTargets")
        })
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
}
