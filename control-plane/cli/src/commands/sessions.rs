//! `gatehouse sessions`: the sessions index and the recordings.

use anyhow::Context;
use clap::Subcommand;
use gatehouse_proto::v1::{
    GetRecordingRequest, KillSessionRequest, ListSessionsRequest, Session, SetLegalHoldRequest,
    VerifyRecordingsRequest, WatchSessionRequest,
};
use serde_json::json;

use super::Ctx;
use crate::client::Client;
use crate::outln;
use crate::output::{self, fmt_ms};

#[derive(Subcommand)]
pub enum SessionsCmd {
    /// Sessions in the index, newest last.
    List {
        #[arg(long, default_value = "")]
        identity: String,
        #[arg(long, default_value = "")]
        target: String,
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Only running sessions, with the node and agent holding them and
        /// how long they have run.
        #[arg(long)]
        running: bool,
    },
    /// A running session's events as they happen (statements, decisions,
    /// rows as delivered with masked values masked, errors), from any node,
    /// until it ends or Ctrl-C.
    Watch { id: String },
    /// Ends a running session now, on whichever node and agent hold it; its
    /// client gets a FATAL error naming the reason (roles admin, reviewer).
    Kill {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// The statements of a session, read from its recording.
    Show { id: String },
    /// Re-reads recordings from the object store and checks every chunk's
    /// hash, the chain and the agent's signature against the sessions
    /// index. Exits non-zero when any recording does not verify.
    Verify {
        /// The session to check.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Check every recorded session.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// A session as a timeline: time offset, statements, decisions, result
    /// rows as delivered (masked values as the client saw them), errors.
    /// A terminal session (SSH with a pty) plays in the terminal with its
    /// timing; `--format asciicast` exports it for asciinema players.
    Replay {
        id: String,
        /// `auto`: play a terminal session, else the timeline.
        #[arg(long, value_enum, default_value = "auto")]
        format: ReplayFormat,
        /// Playback speed of a terminal session (2 is twice as fast; 0
        /// writes it at once).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// Puts a session's recording under legal hold: retention never deletes it.
    Hold {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Releases a legal hold.
    Release {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayFormat {
    Auto,
    Text,
    Json,
    /// The terminal's bytes with their timing.
    Terminal,
    /// asciicast v2 (asciinema).
    Asciicast,
}

pub fn session_json(s: &Session) -> serde_json::Value {
    json!({
        "id": s.id, "identity": s.identity, "target": s.target, "agent": s.agent,
        "database": s.database, "db_user": s.db_user, "client_addr": s.client_addr,
        "started_ms": s.started_ms, "ended_ms": s.ended_ms, "end_reason": s.end_reason,
        "recording_key": s.recording_key, "recording_sha256": s.recording_sha256,
        "recording_size": s.recording_size, "policy_version": s.policy_version,
        "chunk_keys": s.chunk_keys, "recording_events": s.recording_events,
        "legal_hold": s.legal_hold, "legal_hold_reason": s.legal_hold_reason,
        "recording_deleted_ms": s.recording_deleted_ms, "node": s.node,
    })
}

pub async fn exec(cmd: &SessionsCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        SessionsCmd::List {
            identity,
            target,
            limit,
            running,
        } => {
            let s = c
                .list_sessions(ListSessionsRequest {
                    identity: identity.clone(),
                    target: target.clone(),
                    limit: *limit,
                    running: *running,
                })
                .await?
                .into_inner()
                .sessions;
            if ctx.json {
                output::json(&json!(s.iter().map(session_json).collect::<Vec<_>>()))?;
            } else if *running {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or_default();
                output::table(
                    &[
                        "ID", "IDENTITY", "TARGET", "NODE", "AGENT", "STARTED", "DURATION",
                    ],
                    s.into_iter()
                        .map(|x| {
                            let secs = (now - x.started_ms).max(0) / 1000;
                            vec![
                                x.id,
                                x.identity,
                                x.target,
                                x.node.to_string(),
                                x.agent,
                                fmt_ms(x.started_ms),
                                format!("{}m{:02}s", secs / 60, secs % 60),
                            ]
                        })
                        .collect(),
                )?;
            } else {
                output::table(
                    &["ID", "IDENTITY", "TARGET", "STARTED", "ENDED", "END REASON"],
                    s.into_iter()
                        .map(|x| {
                            vec![
                                x.id,
                                x.identity,
                                x.target,
                                fmt_ms(x.started_ms),
                                fmt_ms(x.ended_ms),
                                x.end_reason,
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        SessionsCmd::Watch { id } => {
            use std::io::Write;
            let mut stream = c
                .watch_session(WatchSessionRequest {
                    session_id: id.clone(),
                })
                .await?
                .into_inner();
            while let Some(ev) = stream.message().await? {
                let mut out = std::io::stdout().lock();
                if ctx.json {
                    writeln!(out, "{}", ev.record)?;
                } else {
                    match serde_json::from_str::<gatehouse_recording::Record>(&ev.record) {
                        Ok(rec) => {
                            let (what, text) = timeline(&rec);
                            writeln!(out, "{:>10}  {what:<9} {text}", format!("+{}ms", rec.t))?;
                        }
                        Err(_) => writeln!(out, "{}", ev.record)?,
                    }
                }
                out.flush()?;
            }
            outln!("session {id} ended")?;
        }
        SessionsCmd::Kill { id, reason } => {
            let s = c
                .kill_session(KillSessionRequest {
                    session_id: id.clone(),
                    reason: reason.clone(),
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(&session_json(&s))?;
            } else {
                outln!("session {} ended: {reason}", s.id)?;
            }
        }
        SessionsCmd::Show { id } => show_session(&mut c, id, ctx.json).await?,
        SessionsCmd::Verify { id, all } => verify(&mut c, id.as_deref(), *all, ctx.json).await?,
        SessionsCmd::Replay { id, format, speed } => {
            let terminal = match format {
                _ if ctx.json => false,
                ReplayFormat::Terminal | ReplayFormat::Asciicast => true,
                ReplayFormat::Auto => is_terminal_session(&mut c, id).await?,
                ReplayFormat::Text | ReplayFormat::Json => false,
            };
            if terminal {
                play(&mut c, id, *format == ReplayFormat::Asciicast, *speed).await?
            } else {
                replay(&mut c, id, ctx.json || *format == ReplayFormat::Json).await?
            }
        }
        SessionsCmd::Hold { id, reason } | SessionsCmd::Release { id, reason } => {
            let hold = matches!(cmd, SessionsCmd::Hold { .. });
            let s = c
                .set_legal_hold(SetLegalHoldRequest {
                    session_id: id.clone(),
                    hold,
                    reason: reason.clone(),
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(&session_json(&s))?;
            } else if s.legal_hold {
                outln!(
                    "session {} is under legal hold: {}",
                    s.id,
                    s.legal_hold_reason
                )?;
            } else {
                outln!("session {} is not under legal hold", s.id)?;
            }
        }
    }
    Ok(())
}

async fn verify(c: &mut Client, id: Option<&str>, all: bool, json_out: bool) -> anyhow::Result<()> {
    let results = c
        .verify_recordings(VerifyRecordingsRequest {
            session_id: id.unwrap_or_default().to_string(),
            all,
        })
        .await?
        .into_inner()
        .results;
    let bad = results.iter().filter(|r| !r.ok).count();
    if json_out {
        output::json(&json!(
            results
                .iter()
                .map(|r| json!({
                    "session_id": r.session_id, "ok": r.ok, "chunks": r.chunks,
                    "events": r.events, "problems": r.problems,
                }))
                .collect::<Vec<_>>()
        ))?;
    } else {
        for r in &results {
            if r.ok {
                outln!(
                    "session {}: ok ({} chunks, {} events; hashes, chain and signature verified)",
                    r.session_id,
                    r.chunks,
                    r.events
                )?;
            } else {
                for p in &r.problems {
                    outln!("session {}: FAILED: {p}", r.session_id)?;
                }
            }
        }
    }
    anyhow::ensure!(
        bad == 0,
        "{bad} of {} recordings did not verify",
        results.len()
    );
    Ok(())
}

/// Reads a recording as it streams, calling `on_line` with each JSON line
/// (the session header first, then the records); returns the session and
/// what verification found.
async fn read_recording(
    c: &mut Client,
    id: &str,
    mut on_line: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(Session, Vec<String>)> {
    let mut stream = c
        .get_recording(GetRecordingRequest {
            session_id: id.to_string(),
        })
        .await?
        .into_inner();
    let mut session = None;
    let mut problems = None;
    let mut buf = Vec::new();
    while let Some(part) = stream.message().await? {
        if part.session.is_some() {
            session = part.session;
        }
        buf.extend_from_slice(&part.data);
        let mut start = 0;
        while let Some(n) = buf
            .get(start..)
            .and_then(|b| b.iter().position(|c| *c == b'\n'))
        {
            on_line(buf.get(start..start + n).unwrap_or_default())?;
            start += n + 1;
        }
        buf.drain(..start);
        if part.done {
            problems = Some(part.problems);
        }
    }
    let session = session.context("the server sent no session")?;
    let problems = problems.context("the recording stream ended early")?;
    Ok((session, problems))
}

/// One record as a timeline line: what it is, and its text.
fn timeline(rec: &gatehouse_recording::Record) -> (&'static str, String) {
    use gatehouse_recording::RecordEvent as E;
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
    let (what, text) = match &rec.event {
        E::Query { text } => ("query", text.clone()),
        E::Parse { name, text } if name.is_empty() => ("parse", text.clone()),
        E::Parse { name, text } => ("parse", format!("{name}: {text}")),
        E::RowDescription { columns } => ("columns", columns.join(" | ")),
        E::Row { values } => (
            "row",
            values.iter().map(cell).collect::<Vec<_>>().join(" | "),
        ),
        E::CommandComplete { tag } => ("complete", tag.clone()),
        E::Error { code, message } => ("error", format!("{code} {message}")),
        E::Notice { code, message } => ("notice", format!("{code} {message}")),
        E::Decision {
            statement,
            action,
            rule,
        } => (
            "decision",
            format!("{action} by rule \"{rule}\": {statement}"),
        ),
        E::StatementDone { rows, masked, .. } if masked.is_empty() => {
            ("ready", format!("{rows} rows"))
        }
        E::StatementDone { rows, masked, .. } => (
            "ready",
            format!(
                "{rows} rows; values masked: {}",
                masked
                    .iter()
                    .map(|(d, n)| format!("{d} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        E::Parameters { values, .. } => (
            "params",
            values.iter().map(cell).collect::<Vec<_>>().join(" | "),
        ),
        E::End { reason } => ("end", reason.clone()),
        E::TerminalOutput { data, hex, .. } => ("output", shown(data, hex)),
        E::TerminalInput { data, hex, .. } => ("input", shown(data, hex)),
        E::WindowSize { cols, rows, .. } => ("window", format!("{cols}x{rows}")),
        E::ChannelOpen {
            channel,
            kind,
            detail,
        } => ("channel", format!("#{channel} {kind} {detail}")),
        E::ChannelRequest {
            channel,
            request,
            detail,
            decision,
            rule,
        } => (
            "request",
            if rule.is_empty() {
                format!("#{channel} {request} {detail}: {decision}")
            } else {
                format!("#{channel} {request} {detail}: {decision} by rule \"{rule}\"")
            },
        ),
        E::CommandOutput {
            stderr, data, hex, ..
        } => (if *stderr { "stderr" } else { "stdout" }, shown(data, hex)),
        E::OutputCapped { channel, cap_bytes } => (
            "capped",
            format!("#{channel} output past {cap_bytes} bytes is counted, not recorded"),
        ),
        E::Exit {
            channel,
            status,
            signal,
        } => (
            "exit",
            match (status, signal) {
                (Some(s), _) => format!("#{channel} status {s}"),
                (None, Some(sig)) => format!("#{channel} signal {sig}"),
                (None, None) => format!("#{channel} unknown"),
            },
        ),
        E::FileOp {
            op,
            path,
            to,
            bytes,
            sha256,
            ..
        } => (
            "file",
            [
                Some(format!("{op} {path}")),
                to.as_ref().map(|t| format!("-> {t}")),
                bytes.map(|b| format!("{b} bytes")),
                sha256.as_ref().map(|h| format!("sha256 {h}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" "),
        ),
        E::ChannelClose {
            channel,
            bytes_in,
            bytes_out,
        } => (
            "closed",
            format!("#{channel} {bytes_in} bytes in, {bytes_out} bytes out"),
        ),
        E::KubeRequest { verb, path, status } => ("kube", format!("{verb} {path} {status}")),
    };
    (what, text)
}

/// Terminal or output bytes as a timeline shows them.
fn shown(data: &str, hex: &str) -> String {
    String::from_utf8_lossy(&gatehouse_recording::field_bytes(data, hex))
        .escape_debug()
        .to_string()
}

/// Prints a session's recording as a timeline, as it streams.
/// A verified recording's header and records.
async fn records_of(
    c: &mut Client,
    id: &str,
) -> anyhow::Result<(
    gatehouse_recording::Header,
    Vec<gatehouse_recording::Record>,
)> {
    let mut header: Option<gatehouse_recording::Header> = None;
    let mut records = Vec::new();
    let (_, problems) = read_recording(c, id, |l| {
        match header {
            None => header = Some(serde_json::from_slice(l).context("parsing the header")?),
            Some(_) => records.push(serde_json::from_slice(l).context("parsing a record")?),
        }
        Ok(())
    })
    .await?;
    anyhow::ensure!(
        problems.is_empty(),
        "recording of session {id} does not verify: {}",
        problems.join("; ")
    );
    let header = header.with_context(|| format!("recording of session {id} is empty"))?;
    Ok((header, records))
}

async fn is_terminal_session(c: &mut Client, id: &str) -> anyhow::Result<bool> {
    let (_, records) = records_of(c, id).await?;
    Ok(records.iter().any(|r| {
        matches!(
            r.event,
            gatehouse_recording::RecordEvent::TerminalOutput { .. }
        )
    }))
}

/// Plays a terminal session's output with its timing (or exports it as
/// asciicast v2).
async fn play(c: &mut Client, id: &str, asciicast: bool, speed: f64) -> anyhow::Result<()> {
    use gatehouse_recording::RecordEvent as E;
    use std::io::Write;
    let (header, records) = records_of(c, id).await?;
    let mut out = std::io::stdout().lock();
    if asciicast {
        let (cols, rows) = records
            .iter()
            .find_map(|r| match r.event {
                E::WindowSize { cols, rows, .. } => Some((cols, rows)),
                _ => None,
            })
            .unwrap_or((80, 24));
        let cast = gatehouse_recording::asciicast::export(header.started_ms, cols, rows, &records);
        out.write_all(cast.as_bytes())?;
        return Ok(());
    }
    let mut last: Option<i64> = None;
    for r in &records {
        let E::TerminalOutput { data, hex, .. } = &r.event else {
            continue;
        };
        if speed > 0.0
            && let Some(prev) = last
        {
            let gap = (r.t - prev).max(0) as f64 / speed;
            if gap >= 1.0 {
                out.flush()?;
                tokio::time::sleep(std::time::Duration::from_millis(gap as u64)).await;
            }
        }
        last = Some(r.t);
        out.write_all(&gatehouse_recording::field_bytes(data, hex))?;
    }
    out.flush()?;
    Ok(())
}

async fn replay(c: &mut Client, id: &str, json_out: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut header: Option<gatehouse_recording::Header> = None;
    let mut first = true;
    let (s, problems) = read_recording(c, id, |line| {
        if header.is_none() {
            let h: gatehouse_recording::Header =
                serde_json::from_slice(line).context("parsing the recording's header")?;
            if json_out {
                write!(
                    out,
                    "{{\"header\":{},\"events\":[",
                    serde_json::to_string(&h)?
                )?;
            } else {
                writeln!(
                    out,
                    "session {} · {} → {} ({}) as {} · agent {} · policy {} · started {}",
                    h.session_id,
                    h.identity,
                    h.target,
                    h.database,
                    h.db_user,
                    h.agent,
                    h.policy_version,
                    fmt_ms(h.started_ms)
                )?;
            }
            header = Some(h);
            return Ok(());
        }
        let rec: gatehouse_recording::Record =
            serde_json::from_slice(line).context("parsing a record")?;
        if json_out {
            let sep = if first { "" } else { "," };
            write!(out, "{sep}{}", serde_json::to_string(&rec)?)?;
        } else {
            let (what, text) = timeline(&rec);
            writeln!(out, "{:>10}  {what:<9} {text}", format!("+{}ms", rec.t))?;
        }
        first = false;
        Ok(())
    })
    .await?;
    if json_out {
        if header.is_none() {
            write!(out, "{{\"header\":null,\"events\":[")?;
        }
        writeln!(
            out,
            "],\"session\":{},\"verified\":{},\"problems\":{}}}",
            session_json(&s),
            problems.is_empty(),
            json!(problems)
        )?;
    } else if problems.is_empty() {
        writeln!(
            out,
            "recording verified: every chunk hash, the chain and the agent's signature"
        )?;
    } else {
        writeln!(out, "RECORDING DOES NOT VERIFY: {}", problems.join("; "))?;
    }
    out.flush()?;
    anyhow::ensure!(
        problems.is_empty(),
        "recording of session {id} does not verify"
    );
    Ok(())
}

async fn show_session(c: &mut Client, id: &str, json_out: bool) -> anyhow::Result<()> {
    let mut header: Option<gatehouse_recording::Header> = None;
    let mut records: Vec<gatehouse_recording::Record> = Vec::new();
    let (s, problems) = read_recording(c, id, |l| {
        match header {
            None => header = Some(serde_json::from_slice(l).context("parsing the header")?),
            Some(_) => records.push(serde_json::from_slice(l).context("parsing a record")?),
        }
        Ok(())
    })
    .await?;
    anyhow::ensure!(
        problems.is_empty(),
        "recording of session {id} does not verify: {}",
        problems.join("; ")
    );
    let header = header.context("the recording has no header")?;
    let statements: Vec<(i64, String)> = records
        .iter()
        .filter_map(|r| match &r.event {
            gatehouse_recording::RecordEvent::Query { text } => Some((r.t, text.clone())),
            gatehouse_recording::RecordEvent::Parse { text, .. } => Some((r.t, text.clone())),
            _ => None,
        })
        .collect();
    if json_out {
        output::json(&json!({
            "session": session_json(&s),
            "recording_sha256_verified": true,
            "statements": statements.iter().map(|(t, q)| json!({"offset_ms": t, "statement": q})).collect::<Vec<_>>(),
            "events": records,
        }))?;
    } else {
        outln!(
            "session {} · {} → {} as {} · started {} · recording sha256 {} (verified)",
            s.id,
            header.identity,
            header.target,
            header.db_user,
            fmt_ms(header.started_ms),
            s.recording_sha256
        )?;
        for (t, q) in statements {
            outln!("+{t}ms\t{q}")?;
        }
    }
    Ok(())
}
