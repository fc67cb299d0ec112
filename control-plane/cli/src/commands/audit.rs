//! `gatehouse audit`.

use clap::Subcommand;
use gatehouse_audit::AuditEvent;
use gatehouse_proto::v1::ListAuditEventsRequest;

use super::Ctx;
use crate::output::{self, fmt_ms, parse_time};

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Audit events in log order.
    Events {
        #[arg(long, default_value = "")]
        identity: String,
        #[arg(long, default_value = "")]
        target: String,
        #[arg(long, default_value = "")]
        session: String,
        /// Unix milliseconds, or a duration ago such as 15m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Unix milliseconds, or a duration ago.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
}

/// A serde enum's name as it is encoded.
fn name_of<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

pub async fn exec(cmd: &AuditCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let AuditCmd::Events {
        identity,
        target,
        session,
        since,
        until,
        limit,
    } = cmd;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let time = |t: &Option<String>| -> anyhow::Result<i64> {
        Ok(t.as_deref()
            .map(|s| parse_time(s, now))
            .transpose()?
            .unwrap_or(0))
    };
    let req = ListAuditEventsRequest {
        identity: identity.clone(),
        target: target.clone(),
        session_id: session.clone(),
        since_ms: time(since)?,
        until_ms: time(until)?,
        limit: *limit,
    };
    let raw = c.list_audit_events(req).await?.into_inner().events;
    if ctx.json {
        let v: Vec<serde_json::Value> = raw
            .iter()
            .map(|r| serde_json::from_slice(r))
            .collect::<Result<_, _>>()?;
        output::json(&serde_json::Value::Array(v))?;
        return Ok(());
    }
    let events: Vec<AuditEvent> = raw
        .iter()
        .map(|r| AuditEvent::decode(r))
        .collect::<Result<_, _>>()?;
    output::table(
        &[
            "TIME",
            "KIND",
            "IDENTITY",
            "TARGET",
            "DECISION",
            "ROWS",
            "STATEMENT / DETAIL",
        ],
        events
            .into_iter()
            .map(|e| {
                vec![
                    fmt_ms(e.time_ms),
                    name_of(e.kind),
                    e.identity,
                    e.target,
                    name_of(e.decision),
                    e.outcome
                        .as_ref()
                        .map(|o| o.rows.to_string())
                        .unwrap_or_default(),
                    match (e.statement, e.detail) {
                        (Some(s), Some(d)) => format!("{s} · {d}"),
                        (s, d) => s.or(d).unwrap_or_default(),
                    }
                    .replace('\n', " "),
                ]
            })
            .collect(),
    )?;
    Ok(())
}
