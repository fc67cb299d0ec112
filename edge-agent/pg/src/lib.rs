//! The agent's PostgreSQL sessions: the control plane has authenticated the
//! caller and opened this stream; the agent connects to the target with its
//! own credential, then relays message by message through the inspector,
//! recording every event and auditing every statement.
//!
//! - [`upstream`]: the target connection (TLS, authentication, cancel).
//! - [`guard`]: guardrails on PostgreSQL's parse, approvals and masking.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use gatehouse_audit::{Decision, EventKind, MaskCount};
use gatehouse_pgwire_inspect::build::{self, Severity};
use gatehouse_pgwire_inspect::{Action, PgInspector, SessionEvent, Side, Statement, merge_counts};

use gatehouse_proto::tunnel::SessionOpen;
use gatehouse_recording::RecordEvent;
use gatehouse_recording::chunked::SessionMeta;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use gatehouse_agent_core::protocol::{BoxFuture, Protocol};
use gatehouse_agent_core::recorder::Recorder;
use gatehouse_agent_core::session::{
    ClientError, base_event, end_from_outside, idle, refused_unrecorded,
};
use gatehouse_agent_core::{AgentCtx, now_ms};

use crate::cancel::{CancelKeys, CancelTarget};
use crate::upstream::UpstreamError;

pub mod cancel;
pub mod guard;
pub mod upstream;

/// The PostgreSQL protocol, with what its sessions share: their targets'
/// cancel keys and the compiled masking engines.
#[derive(Default)]
pub struct Postgres {
    /// The target's cancel key of every running session.
    cancel_keys: CancelKeys,
    /// Compiled masking engines by policy document (compiling one takes
    /// milliseconds; sessions share it).
    maskers: guard::MaskerCache,
}

// === impl Postgres ===

impl Protocol for Postgres {
    fn serve(
        self: Arc<Self>,
        ctx: Arc<AgentCtx>,
        open: SessionOpen,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move { serve(&self, &ctx, open, &mut send, &mut recv).await })
    }

    fn cancel(self: Arc<Self>, ctx: Arc<AgentCtx>, open: SessionOpen) -> BoxFuture<'static, ()> {
        let _ = ctx;
        Box::pin(async move { cancel(&self, &open).await })
    }

    fn check(
        self: Arc<Self>,
        ctx: Arc<AgentCtx>,
        open: SessionOpen,
    ) -> BoxFuture<'static, gatehouse_proto::tunnel::TargetCheck> {
        Box::pin(async move { check_target(&ctx, &open).await })
    }

    fn adopt_policy(
        self: Arc<Self>,
        ctx: Arc<AgentCtx>,
        open: SessionOpen,
    ) -> BoxFuture<'static, gatehouse_proto::tunnel::SessionEnded> {
        Box::pin(async move { adopt_policy(&ctx, &open).await })
    }
}

/// Runs one PostgreSQL session stream (its SessionOpen read) until either
/// side ends.
async fn serve(
    pg: &Postgres,
    ctx: &AgentCtx,
    open: SessionOpen,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) {
    let result = match admit(pg, ctx, &open).await {
        Ok(admitted) => run(pg, ctx, &open, admitted, send, recv).await,
        Err(refused) => Err(refused_unrecorded(ctx, &open, refused)),
    };
    let reason = match result {
        Ok(reason) => reason,
        Err(message) => {
            let _ = send
                .write_all(&build::error_response(
                    Severity::Fatal,
                    &message.0,
                    &message.1,
                ))
                .await;
            message.1
        }
    };
    let _ = send.finish();
    tracing::info!(session_id = %open.session_id, %reason, "session ended");
}

/// Cancels the query running in the session a verified client CancelRequest
/// named.
async fn cancel(pg: &Postgres, open: &SessionOpen) {
    let Some(t) = pg.cancel_keys.get(&open.session_id) else {
        tracing::info!(session_id = %open.session_id, "cancel for a session not running here");
        return;
    };
    // The secret matched; the process id must be the target's too.
    if t.key.pid != open.cancel_pid {
        tracing::info!(session_id = %open.session_id, "cancel with another process id ignored");
        return;
    }
    match upstream::cancel(&t.target, &t.key).await {
        Ok(()) => tracing::info!(session_id = %open.session_id, "cancel request sent to target"),
        Err(e) => {
            tracing::warn!(session_id = %open.session_id, error = %e, "cancel request failed")
        }
    }
}

/// What the agent's role may do on the target beyond reading, from the
/// target's own catalog.
const CHECK_SQL: &str = "\
select 'superuser', '' from pg_catalog.pg_roles where rolname = current_user and rolsuper \
union all select 'create roles', '' from pg_catalog.pg_roles where rolname = current_user and rolcreaterole \
union all select 'create databases', '' from pg_catalog.pg_roles where rolname = current_user and rolcreatedb \
union all select 'replication', '' from pg_catalog.pg_roles where rolname = current_user and rolreplication \
union all select 'bypass row-level security', '' from pg_catalog.pg_roles where rolname = current_user and rolbypassrls \
union all select 'member of ' || b.rolname, 'server files, programs or signals' from pg_catalog.pg_roles b \
  where b.rolname in ('pg_read_server_files', 'pg_write_server_files', 'pg_execute_server_program', 'pg_signal_backend', 'pg_checkpoint') \
  and pg_catalog.pg_has_role(current_user, b.oid, 'MEMBER') \
union all select 'write to tables', count(*)::text || ' tables or views' from pg_catalog.pg_class c \
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
  where c.relkind in ('r', 'p', 'v', 'f') and n.nspname not in ('pg_catalog', 'information_schema') \
  and n.nspname not like 'pg_toast%' and (pg_catalog.has_table_privilege(c.oid, 'INSERT') \
  or pg_catalog.has_table_privilege(c.oid, 'UPDATE') or pg_catalog.has_table_privilege(c.oid, 'DELETE') \
  or pg_catalog.has_table_privilege(c.oid, 'TRUNCATE')) having count(*) > 0 \
union all select 'own relations (may alter or drop them)', count(*)::text from pg_catalog.pg_class c \
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
  where c.relowner = (select oid from pg_catalog.pg_roles where rolname = current_user) \
  and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname not like 'pg_toast%' having count(*) > 0 \
union all select 'advance sequences', count(*)::text from pg_catalog.pg_class c \
  where case when c.relkind = 'S' then pg_catalog.has_sequence_privilege(c.oid, 'UPDATE') else false end \
  having count(*) > 0 \
union all select 'create schemas in database ' || current_database(), '' \
  where pg_catalog.has_database_privilege(current_database(), 'CREATE') \
union all select 'create objects in schema ' || nspname, '' from pg_catalog.pg_namespace \
  where nspname not like 'pg_%' and nspname <> 'information_schema' and pg_catalog.has_schema_privilege(oid, 'CREATE')";

/// Connects as the agent's role (read-only) and reports what it may do
/// beyond reading.
async fn check_target(ctx: &AgentCtx, open: &SessionOpen) -> gatehouse_proto::tunnel::TargetCheck {
    use gatehouse_proto::tunnel::TargetCheck;
    let Some(target) = ctx.config.target(&open.target) else {
        return TargetCheck {
            error: format!(
                "agent {} does not serve target \"{}\"",
                ctx.config.name, open.target
            ),
            ..Default::default()
        };
    };
    let mut conn = match upstream::connect(target, open, &target.user, true).await {
        Ok(c) => c,
        Err(e) => {
            return TargetCheck {
                role: target.user.clone(),
                error: format!("connecting to the target: {e}"),
                ..Default::default()
            };
        }
    };
    match upstream::agent_query(&mut conn.stream, CHECK_SQL).await {
        Ok(rows) => TargetCheck {
            role: target.user.clone(),
            beyond_reads: rows
                .into_iter()
                .filter_map(|r| match r.as_slice() {
                    [Some(what), Some(detail)] if detail.is_empty() => Some(what.clone()),
                    [Some(what), Some(detail)] => Some(format!("{what}: {detail}")),
                    _ => None,
                })
                .collect(),
            error: String::new(),
        },
        Err(e) => TargetCheck {
            role: target.user.clone(),
            error: format!("the catalog query failed: {e}"),
            ..Default::default()
        },
    }
}

/// Puts a new policy version in force for a running session (`enforce:
/// immediate`): its next statement is judged by it, or, when it cannot go
/// on as it is under it, the session is closed saying why.
async fn adopt_policy(ctx: &AgentCtx, open: &SessionOpen) -> gatehouse_proto::tunnel::SessionEnded {
    use gatehouse_proto::tunnel::SessionEnded;
    let Some(p) = ctx.running.policy(&open.session_id) else {
        return SessionEnded::default();
    };
    let why = match (crate::guard::policy_of(open), &p.guard) {
        (Err(e), _) => Some(e),
        (Ok(None), _) => None,
        (Ok(Some(_)), None) => Some("the session opened without a policy document".into()),
        (Ok(Some(doc)), Some(g)) => match g.lock() {
            Err(_) => Some("internal error: the session's guard is unavailable".into()),
            Ok(mut g) => match g.adopt(doc) {
                Err(why) => Some(why),
                Ok(()) => crate::guard::judge_startup(&g, &p.open)
                    .map(|v| format!("its startup parameters: {}", v.message)),
            },
        },
    };
    if let Some(why) = why {
        let reason = format!(
            "policy {} is in force immediately, and the session cannot go on under it: {why}",
            open.policy_version
        );
        let found = end_from_outside(ctx, &open.session_id, &reason).await;
        return SessionEnded {
            found,
            closed_because: reason,
        };
    }
    if let Ok(mut v) = p.version.lock() {
        v.clone_from(&open.policy_version);
    }
    tracing::info!(session_id = %open.session_id, policy_version = %open.policy_version, "policy in force immediately");
    SessionEnded {
        found: true,
        ..Default::default()
    }
}

/// The start of the end reason of a session ended from outside.
const ENDED_FROM_OUTSIDE: &str = "session ended: ";

/// How a session that could not be recorded ends.
const RECORDING_FAILED: &str = "session recording failed";

/// What a session was admitted with, its recording started.
struct Admitted<'c> {
    target: &'c gatehouse_agent_core::config::TargetConfig,
    db_user: String,
    policy: Option<Arc<gatehouse_policy::PolicyDoc>>,
    guard: Option<gatehouse_policy::Guard>,
    masking: crate::guard::SessionMasking,
    /// What the recording starts with.
    meta: SessionMeta,
}

pub(crate) fn audit_down() -> ClientError {
    ClientError(
        "58000".into(),
        "audit pipeline unavailable; refusing to proceed".into(),
    )
}

/// Everything decided before the session's recording starts: the target and
/// role, the policy (startup parameters judged), masking, room in the spool.
async fn admit<'c>(
    pg: &Postgres,
    ctx: &'c AgentCtx,
    open: &SessionOpen,
) -> Result<Admitted<'c>, ClientError> {
    let Some(target) = ctx.config.target(&open.target) else {
        return Err(ClientError(
            "08001".into(),
            format!(
                "agent {} does not serve target \"{}\"",
                ctx.config.name, open.target
            ),
        ));
    };
    let db_user = if open.db_user.is_empty() {
        target.user.clone()
    } else {
        open.db_user.clone()
    };
    if db_user != target.user {
        return Err(ClientError(
            "28000".into(),
            format!(
                "agent holds no credential for role \"{db_user}\" on target \"{}\"",
                open.target
            ),
        ));
    }
    let policy = crate::guard::policy_of(open).map_err(|e| ClientError("58000".into(), e))?;
    let guard = policy.as_ref().map(|d| crate::guard::guard(d, open));
    if let Some(v) = guard
        .as_ref()
        .and_then(|g| crate::guard::judge_startup(g, open))
    {
        let r = crate::guard::refusal(v);
        let mut ev = base_event(ctx, open, EventKind::SessionStart, Decision::Deny);
        ev.detail = Some(format!("refused by rule \"{}\": {}", r.rule, r.message));
        ctx.audit(ev).await.map_err(|_| audit_down())?;
        return Err(ClientError(
            gatehouse_pgwire_inspect::REFUSED_SQLSTATE.into(),
            format!(
                "gatehouse: session refused by rule \"{}\": {}",
                r.rule, r.message
            ),
        ));
    }
    let masking = match &policy {
        Some(d) => crate::guard::masking_for_session(&pg.maskers, d, open)
            .map_err(|e| ClientError("58000".into(), e))?,
        None => crate::guard::SessionMasking::Off,
    };
    // Fail closed: no durable recording, no session.
    if let Err(why) = gatehouse_agent_core::recorder::admit(ctx) {
        let mut ev = base_event(ctx, open, EventKind::RecordingRefused, Decision::Deny);
        ev.detail = Some(why.clone());
        ctx.audit(ev).await.map_err(|_| audit_down())?;
        return Err(ClientError("53100".into(), format!("gatehouse: {why}")));
    }
    let meta = SessionMeta {
        session_id: open.session_id.clone(),
        identity: open.identity.clone(),
        target: open.target.clone(),
        agent: ctx.config.name.clone(),
        policy_version: open.policy_version.clone(),
        started_ms: open.started_ms,
        database: open.database.clone(),
        db_user: db_user.clone(),
    };
    Ok(Admitted {
        target,
        db_user,
        policy,
        guard,
        masking,
        meta,
    })
}

async fn run(
    pg: &Postgres,
    ctx: &AgentCtx,
    open: &SessionOpen,
    admitted: Admitted<'_>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<String, ClientError> {
    let Admitted {
        target,
        db_user,
        policy,
        guard,
        mut masking,
        meta,
    } = admitted;
    let read_only = guard
        .as_ref()
        .is_some_and(gatehouse_policy::Guard::read_only);
    // The recording's durable start and the target's connection (a backend
    // forked, SCRAM) overlap; the client is answered only after both.
    let (started, connected) = tokio::join!(
        Recorder::start(ctx, meta),
        upstream::connect(target, open, &db_user, read_only)
    );
    // Fail closed: no durable recording, no session (the target's
    // connection, if made, closes unused).
    let mut recorder = started.map_err(|e| {
        let refused = ClientError(
            "58030".into(),
            format!("session recording unavailable: {e}"),
        );
        refused_unrecorded(ctx, open, refused)
    })?;
    let mut upstream = match connected {
        Ok(x) => x,
        Err(e) => {
            let mut ev = base_event(ctx, open, EventKind::SessionStart, Decision::Deny);
            ev.detail = Some(e.to_string());
            ctx.audit(ev).await.map_err(|_| audit_down())?;
            let _ = recorder.record(
                now_ms(),
                RecordEvent::Error {
                    code: "08006".into(),
                    message: e.to_string(),
                },
            );
            let _ = recorder.finish(ctx, "upstream refused");
            return match e {
                UpstreamError::Refused { raw, .. } => {
                    let _ = send.write_all(&raw).await;
                    Ok("upstream refused".into())
                }
                other => Err(ClientError("08006".into(), other.to_string())),
            };
        }
    };
    // Column rules naming tables: find the tables' OIDs on the target before
    // the client's first byte. Without them the rule cannot hold: refuse.
    if let crate::guard::SessionMasking::On(m) = &mut masking
        && let Some(sql) = m.table_query()
        && upstream::greeting_ready(&upstream.greeting)
    {
        match upstream::agent_query(&mut upstream.stream, &sql).await {
            Ok(rows) => m.set_tables(rows),
            Err(e) => {
                let mut ev = base_event(ctx, open, EventKind::SessionStart, Decision::Deny);
                ev.detail = Some(format!("masking column rules unresolved: {e}"));
                ctx.audit(ev).await.map_err(|_| audit_down())?;
                let _ = recorder.finish(ctx, "masking unavailable");
                return Err(ClientError(
                    "58000".into(),
                    format!("masking column rules could not be resolved on the target: {e}"),
                ));
            }
        }
    }
    let mut ev = base_event(ctx, open, EventKind::SessionStart, Decision::Allow);
    ev.detail = Some(format!(
        "client {} as {db_user} to database {}{}{}",
        open.client_addr,
        open.database,
        if read_only {
            "; read-only on the target (the policy admits no write)"
        } else {
            ""
        },
        match &masking {
            crate::guard::SessionMasking::Off => "",
            crate::guard::SessionMasking::Exempt =>
                "; result values shown in clear (masking exemption)",
            crate::guard::SessionMasking::On(_) => "; result values masked",
        }
    ));
    ctx.audit(ev).await.map_err(|_| audit_down())?;
    let (_running, mut ended, live) = ctx.running.register(&open.session_id);
    recorder.set_live(live);
    let _cancel_key = upstream.key.clone().map(|key| {
        pg.cancel_keys.register(
            open.session_id.clone(),
            CancelTarget {
                target: target.clone(),
                key,
            },
        )
    });
    send.write_all(&build::authentication_ok())
        .await
        .map_err(|e| ClientError("08006".into(), e.to_string()))?;

    let reason = Arc::new(Mutex::new(String::new()));
    let guard = guard.map(|g| Arc::new(Mutex::new(g)));
    let version = Arc::new(Mutex::new(open.policy_version.clone()));
    ctx.running.set_policy(
        &open.session_id,
        gatehouse_agent_core::SessionPolicy {
            guard: guard.clone(),
            version: version.clone(),
            open: open.clone(),
        },
    );
    let mut insp = match &guard {
        Some(g) => PgInspector::with_judge(
            Box::new(crate::guard::PolicyJudge {
                guard: g.clone(),
                reason: reason.clone(),
            }),
            &open.session_id,
        ),
        None => PgInspector::new(),
    };
    insp.record_rows(true);
    let param_mask = match masking {
        crate::guard::SessionMasking::On(m) => {
            let sibling = m.sibling();
            insp.set_mask(Box::new(m));
            Some(sibling)
        }
        _ => None,
    };
    let state = Arc::new(Mutex::new(Session {
        insp,
        recorder: Some(recorder),
        failed: None,
        param_mask,
        reason,
        approvals: policy.and_then(|d| d.approvals.clone()).unwrap_or_default(),
        terminated: false,
        guard,
    }));
    let catalog = crate::guard::Catalog {
        target,
        db_user: &db_user,
        read_only,
        conn: tokio::sync::Mutex::new(None),
    };
    let activity = std::sync::atomic::AtomicI64::new(now_ms());
    let pump = Pump {
        ctx,
        open,
        catalog: &catalog,
        state: &state,
        activity: &activity,
        version: &version,
    };
    // Limits from the access rule that admitted the session.
    let max_session =
        (open.max_session_ms > 0).then(|| std::time::Duration::from_millis(open.max_session_ms));
    let idle_timeout =
        (open.idle_timeout_ms > 0).then(|| std::time::Duration::from_millis(open.idle_timeout_ms));
    let opened = tokio::time::Instant::now();
    // 57P01 (admin_shutdown) as PostgreSQL's pg_terminate_backend, 57P05 as
    // its idle_session_timeout.
    let mut fatal: Option<&'static str> = None;
    let reason = tokio::select! {
        r = relay(pump, upstream.stream, upstream.greeting, send, recv) => r,
        Ok(()) = ended.changed() => {
            fatal = Some("57P01");
            let why = ended.borrow().clone().unwrap_or_default();
            format!("{ENDED_FROM_OUTSIDE}{why}")
        }
        () = tokio::time::sleep_until(opened + max_session.unwrap_or_default()), if max_session.is_some() => {
            fatal = Some("57P01");
            format!(
                "{ENDED_FROM_OUTSIDE}it reached the access rule's maximum session length of {}s",
                max_session.unwrap_or_default().as_secs()
            )
        }
        () = idle(&activity, idle_timeout.unwrap_or_default()), if idle_timeout.is_some() => {
            fatal = Some("57P05");
            format!(
                "{ENDED_FROM_OUTSIDE}idle for {}s, the access rule's idle timeout",
                idle_timeout.unwrap_or_default().as_secs()
            )
        }
    };
    if fatal.is_some() {
        // The relay is dropped, so the target's connection closes; a backend
        // busy with a query would only notice at its next write, so the
        // query is cancelled first.
        if let Some(t) = pg.cancel_keys.get(&open.session_id)
            && let Err(e) = upstream::cancel(&t.target, &t.key).await
        {
            tracing::warn!(session_id = %open.session_id, error = %e, "cancelling the running query failed");
        }
    }
    let (recorder, terminated) = state
        .lock()
        .ok()
        .map(|mut s| (s.recorder.take(), s.terminated))
        .unwrap_or_default();
    // After a Terminate the target closes its end and the client its own,
    // in either order: both mean the client ended the session.
    let reason = if terminated && (reason == CLIENT_GONE || reason == TARGET_GONE) {
        "client ended the session".to_string()
    } else {
        reason
    };
    let mut end = base_event(ctx, open, EventKind::SessionEnd, Decision::Allow);
    end.detail = Some(reason.clone());
    let _ = ctx.audit(end).await;
    if let Some(r) = recorder
        && let Err(e) = r.finish(ctx, &reason)
    {
        tracing::error!(session_id = %open.session_id, error = %e, "sealing the recording failed");
    }
    // Fail closed: what could not be recorded was not relayed; the client
    // learns why its session ended.
    if reason.starts_with(RECORDING_FAILED) {
        return Err(ClientError(
            "58030".into(),
            format!("gatehouse: {reason}; the session is closed"),
        ));
    }
    // A statement whose audit event could not be made durable did not run:
    // the client is told so, not left with a closed connection.
    if reason == AUDIT_CLOSED {
        return Err(audit_down());
    }
    // 57P01 (admin_shutdown), as PostgreSQL's own pg_terminate_backend.
    if let Some(code) = fatal {
        return Err(ClientError(code.into(), format!("gatehouse: {reason}")));
    }
    Ok(reason)
}

/// Masks a statement's rendered parameters, adding what it masked to the
/// statement's counts.
fn mask_parameters(pm: &mut crate::guard::SessionMask, st: &mut Statement) {
    let Some(params) = st.parameters.as_mut() else {
        return;
    };
    for p in params.iter_mut().flatten() {
        if let Some(m) = pm.mask_text(p) {
            *p = m;
        }
    }
    merge_counts(
        &mut st.masked,
        gatehouse_pgwire_inspect::Mask::take_counts(pm),
    );
}

/// A finished statement cycle: what ran, and when the cycle started.
type Done = (Vec<Statement>, i64);

/// Inspector and recorder of one session, shared by both directions.
struct Session {
    insp: PgInspector,
    recorder: Option<Recorder>,
    failed: Option<String>,
    /// Masks bound parameters before they go into the evidence.
    param_mask: Option<crate::guard::SessionMask>,
    /// The reason the caller gave (`SET gatehouse.reason`), and the
    /// document's approval settings, for approvals.
    reason: Arc<Mutex<String>>,
    approvals: gatehouse_policy::Approvals,
    /// The client sent Terminate: whichever side closes next, the client
    /// ended the session.
    terminated: bool,
    /// The session's guard, when a policy is in force.
    guard: Option<Arc<Mutex<gatehouse_policy::Guard>>>,
}

/// A statement the inspector holds for approval: its text and the rule.
type Held = (String, gatehouse_pgwire_inspect::Refusal);

impl Session {
    /// Appends one event to the recording; a failure ends the session.
    fn record(&mut self, at_ms: i64, ev: RecordEvent) {
        if let Some(r) = self.recorder.as_mut()
            && let Err(e) = r.record(at_ms, ev)
        {
            self.failed = Some(format!("{RECORDING_FAILED}: {e}"));
        }
    }

    /// Records events and returns the bytes to forward, the statements to
    /// audit and a statement held for approval.
    fn take(&mut self, out: &mut Vec<Action>) -> (Vec<bytes::Bytes>, Vec<Done>, Option<Held>) {
        let mut fwd = Vec::new();
        let mut done = Vec::new();
        let mut held = None;
        for a in out.drain(..) {
            match a {
                Action::ToUpstream(b) | Action::ToClient(b) => fwd.push(b),
                Action::Hold { text, refusal } => held = Some((text, refusal)),
                Action::Event { at_ms, event } => {
                    let rec = match event {
                        SessionEvent::Query { text } => Some(RecordEvent::Query { text }),
                        SessionEvent::Parse { name, text } => {
                            Some(RecordEvent::Parse { name, text })
                        }
                        SessionEvent::RowDescription { columns } => {
                            Some(RecordEvent::RowDescription { columns })
                        }
                        SessionEvent::CommandComplete { tag } => {
                            Some(RecordEvent::CommandComplete { tag })
                        }
                        SessionEvent::Error { code, message } => {
                            Some(RecordEvent::Error { code, message })
                        }
                        SessionEvent::StatementDone {
                            mut statements,
                            started_ms,
                            ..
                        } => {
                            if let Some(pm) = self.param_mask.as_mut() {
                                for st in &mut statements {
                                    mask_parameters(pm, st);
                                }
                            }
                            for ev in cycle_records(&statements) {
                                self.record(at_ms, ev);
                            }
                            done.push((statements, started_ms));
                            None
                        }
                        SessionEvent::Terminate => {
                            self.terminated = true;
                            None
                        }
                        SessionEvent::Row { values } => Some(RecordEvent::Row {
                            values: values.into_iter().map(|v| v.map(value_text)).collect(),
                        }),
                        SessionEvent::Notice { code, message } => {
                            Some(RecordEvent::Notice { code, message })
                        }
                    };
                    if let Some(rec) = rec {
                        self.record(at_ms, rec);
                    }
                }
            }
        }
        if let Some(r) = self.recorder.as_mut()
            && let Err(e) = r.flush()
        {
            self.failed = Some(format!("{RECORDING_FAILED}: {e}"));
        }
        (fwd, done, held)
    }
}

/// What a finished query cycle adds to the recording: each statement's
/// bound parameters (masked) and refusal, then the cycle's end with its row
/// count and the values masked per detector.
fn cycle_records(statements: &[Statement]) -> Vec<RecordEvent> {
    let mut out = Vec::new();
    let mut masked = std::collections::BTreeMap::new();
    for st in statements {
        if let Some(values) = &st.parameters {
            out.push(RecordEvent::Parameters {
                statement: st.text.clone(),
                values: values.clone(),
            });
        }
        if let Some(rule) = &st.refused_by {
            out.push(RecordEvent::Decision {
                statement: st.text.clone(),
                action: "deny".into(),
                rule: rule.clone(),
            });
        }
        for (detector, n) in &st.masked {
            *masked.entry(detector.clone()).or_insert(0) += n;
        }
    }
    out.push(RecordEvent::StatementDone {
        statements: statements.iter().map(|s| s.text.clone()).collect(),
        rows: statements.iter().map(|s| s.outcome.rows).sum(),
        masked,
    });
    out
}

/// A result value for the recording: text as is, other bytes (binary
/// format) as `\x` and hex, as PostgreSQL writes bytea.
fn value_text(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap_or_else(|e| format!("\\x{}", hex::encode(e.as_bytes())))
}

/// A test hook, in debug builds only: with `GATEHOUSE_AGENT_TEST_PAUSE` set
/// to a step (`inspected`, `queued`, `durable`, `forwarded`) a session's
/// relay stops for good at that step of a read that ends a query cycle
/// (`ends_cycle`), so a test can kill the agent exactly there. Release
/// builds have no hook.
#[cfg(debug_assertions)]
async fn test_pause(ends_cycle: bool, step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("GATEHOUSE_AGENT_TEST_PAUSE").ok());
    if ends_cycle && at.as_deref() == Some(step) {
        tracing::warn!(step, "test hook: relay paused");
        std::future::pending::<()>().await;
    }
}

#[cfg(not(debug_assertions))]
async fn test_pause(_ends_cycle: bool, _step: &str) {}

/// Joins the pieces to forward into one buffer (no copy for one piece).
fn coalesce(mut pieces: Vec<bytes::Bytes>) -> bytes::Bytes {
    match pieces.len() {
        0 => bytes::Bytes::new(),
        1 => pieces.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(pieces.iter().map(bytes::Bytes::len).sum());
            for p in pieces {
                all.extend_from_slice(&p);
            }
            all.freeze()
        }
    }
}

/// End reasons of a relay direction.
const AUDIT_CLOSED: &str = "audit pipeline closed";
const CLIENT_GONE: &str = "client disconnected";
const TARGET_GONE: &str = "target closed the connection";

async fn relay(
    pump: Pump<'_>,
    upstream: upstream::Stream,
    leftover: BytesMut,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> String {
    let (mut ur, mut uw) = tokio::io::split(upstream);
    tokio::select! {
        r = pump.run(Side::Client, BytesMut::with_capacity(64 << 10), recv, &mut uw) => r,
        r = pump.run(Side::Upstream, leftover, &mut ur, send) => r,
    }
}

/// One direction of the relay.
struct Pump<'a> {
    ctx: &'a AgentCtx,
    open: &'a SessionOpen,
    catalog: &'a crate::guard::Catalog<'a>,
    state: &'a Mutex<Session>,
    /// When a byte last arrived from either side (Unix ms).
    activity: &'a std::sync::atomic::AtomicI64,
    /// The policy version the session's statements are judged under.
    version: &'a Mutex<String>,
}

/// Buffered bytes from which inspection runs off the session's thread.
const LARGE_INSPECTION: usize = 1 << 20;

impl Pump<'_> {
    /// Reads from `from`, inspects, audits finished statements, then
    /// forwards: the client sees the end of a statement only after its audit
    /// event is queued. Returns why the direction ended.
    async fn run<R, W>(&self, side: Side, mut buf: BytesMut, from: &mut R, to: &mut W) -> String
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let (closed, write_failed) = match side {
            Side::Client => (CLIENT_GONE, TARGET_GONE),
            Side::Upstream => (TARGET_GONE, CLIENT_GONE),
        };
        let mut out = Vec::new();
        // One clock read per read: it times the inspection and the idle
        // limit alike.
        let mut now = now_ms();
        loop {
            if !buf.is_empty() {
                let inspect = |buf: &mut BytesMut, out: &mut Vec<_>| {
                    let Ok(mut s) = self.state.lock() else {
                        return None;
                    };
                    let r = match side {
                        Side::Client => s.insp.on_client(buf, now, out),
                        Side::Upstream => s.insp.on_upstream(buf, now, out),
                    };
                    Some(r.map(|()| {
                        let (f, d, h) = s.take(out);
                        (f, d, s.failed.clone(), h)
                    }))
                };
                // A large message (a 60 MB value) takes a while to inspect
                // and mask: the session's thread hands its other tasks (the
                // tunnel's keep-alives, other sessions) to another worker
                // meanwhile, so the connection to the control plane lives.
                let inspected = if buf.len() >= LARGE_INSPECTION {
                    gatehouse_agent_core::blocking(|| inspect(&mut buf, &mut out))
                } else {
                    inspect(&mut buf, &mut out)
                };
                let Some(inspected) = inspected else {
                    return "internal error".into();
                };
                let (fwd, done, failed, held) = match inspected {
                    Ok(x) => x,
                    Err(e) => {
                        if side == Side::Upstream {
                            // The client learns why its session ends.
                            let msg = build::error_response(
                                Severity::Fatal,
                                "54000",
                                &format!("gatehouse: {e}; the session is closed"),
                            );
                            let _ = to.write_all(&msg).await;
                            let _ = to.flush().await;
                        }
                        return format!("protocol error: {e}");
                    }
                };
                if let Some(f) = failed {
                    return f;
                }
                // Durability per cycle: every statement of the cycles this
                // read ended is queued at once, and one fsync group covers
                // them all before any byte of the read goes out.
                let mut durable = Vec::new();
                let ends_cycle = !done.is_empty();
                test_pause(ends_cycle, "inspected").await;
                for (statements, started) in done {
                    for st in statements {
                        let decision = match st.refused_by {
                            Some(_) => Decision::Deny,
                            None => Decision::Allow,
                        };
                        let mut ev =
                            base_event(self.ctx, self.open, EventKind::Statement, decision);
                        if let Ok(v) = self.version.lock() {
                            ev.policy_version.clone_from(&v);
                        }
                        ev.detail = st.refused_by.map(|r| format!("refused by rule \"{r}\""));
                        if !st.masked.is_empty() {
                            ev.masked = Some(
                                st.masked
                                    .into_iter()
                                    .map(|(detector, count)| MaskCount { detector, count })
                                    .collect(),
                            );
                        }
                        ev.time_ms = started;
                        ev.statement = Some(st.text);
                        ev.parameters = st.parameters;
                        ev.outcome = Some(st.outcome);
                        match self.ctx.queue_audit(ev).await {
                            Ok(d) => durable.push(d),
                            Err(_) => return AUDIT_CLOSED.into(),
                        }
                    }
                }
                test_pause(ends_cycle, "queued").await;
                for d in durable {
                    if d.wait().await.is_err() {
                        return AUDIT_CLOSED.into();
                    }
                }
                test_pause(ends_cycle, "durable").await;
                // Everything one read produced goes out in one write (one
                // QUIC stream write or one TCP send).
                let out_bytes = coalesce(fwd);
                if !out_bytes.is_empty() && to.write_all(&out_bytes).await.is_err() {
                    return write_failed.into();
                }
                test_pause(ends_cycle, "forwarded").await;
                // A held statement: what came before it is on its way; it
                // and what follows wait for the decision, then go round again.
                if let Some((text, refusal)) = held {
                    let Some((settings, reason, guard)) = self.state.lock().ok().map(|s| {
                        let reason = s.reason.lock().map(|r| r.clone()).unwrap_or_default();
                        (s.approvals.clone(), reason, s.guard.clone())
                    }) else {
                        return "internal error".into();
                    };
                    let r = match guard {
                        // User functions: the target tells what they are,
                        // then the statement is decided again.
                        Some(g) if refusal.rule == gatehouse_policy::RULE_CONSULT => {
                            crate::guard::consult(
                                self.ctx,
                                self.open,
                                self.catalog,
                                &g,
                                &text,
                                &refusal,
                                (&settings, reason),
                            )
                            .await
                        }
                        _ => {
                            crate::guard::approve(
                                self.ctx, self.open, &settings, &text, &refusal, reason,
                            )
                            .await
                        }
                    };
                    let Ok(mut s) = self.state.lock() else {
                        return "internal error".into();
                    };
                    s.insp.resolve(r);
                    // The decision took its time: what follows runs now.
                    now = now_ms();
                    continue;
                }
            }
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return closed.into(),
                Ok(_) => {
                    now = now_ms();
                    self.activity
                        .store(now, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}
