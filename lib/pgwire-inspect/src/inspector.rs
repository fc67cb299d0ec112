//! The per-session inspector.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use gatehouse_audit::{Outcome, rows_of_command_tag};
use pgwire::messages::{
    DecodeContext, Message, data::RowDescription, extendedquery::Bind, extendedquery::Execute,
    extendedquery::Parse, response::CommandComplete, response::ErrorResponse, simplequery::Query,
};

use crate::framer::{Frame, FrameError, Framer};

/// Most prepared statements / portals remembered per session. A client that
/// creates more without closing them still works; their text is then
/// reported as unknown in the evidence.
const MAX_NAMED: usize = 10_000;

/// Which peer sent the offending bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// The byte stream cannot be framed as PostgreSQL messages.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{side:?} sent a message with invalid length {len}")]
    BadLength { side: Side, len: i32 },
    #[error("{side:?} sent a {len}-byte '{}' message, over the inspection limit", *ty as char)]
    TooLarge { side: Side, ty: u8, len: usize },
    #[error("{side:?} sent a malformed '{}' message: {reason}", *ty as char)]
    Malformed { side: Side, ty: u8, reason: String },
}

/// Which query protocol a statement came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Simple,
    Extended,
}

/// Something worth recording, in the order it crossed the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The client sent a simple query.
    Query { text: String },
    /// The client prepared a statement (extended protocol).
    Parse { name: String, text: String },
    /// The upstream described result columns.
    RowDescription { columns: Vec<String> },
    /// The upstream completed a command.
    CommandComplete { tag: String },
    /// The upstream reported an error.
    Error { code: String, message: String },
    /// A query cycle ended (ReadyForQuery): what ran and what came back.
    StatementDone {
        protocol: Protocol,
        statements: Vec<String>,
        outcome: Outcome,
        /// When the cycle started (the time passed with the query bytes).
        started_ms: i64,
    },
    /// The client said goodbye.
    Terminate,
}

/// What the session loop must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    ToUpstream(Bytes),
    ToClient(Bytes),
    Event { at_ms: i64, event: SessionEvent },
}

/// A query cycle the client started and the upstream has not yet closed with
/// ReadyForQuery.
struct Pending {
    protocol: Protocol,
    statements: Vec<String>,
    outcome: Outcome,
    started_ms: i64,
}

/// Inspects one PostgreSQL session after authentication.
pub struct PgInspector {
    client: Framer,
    upstream: Framer,
    ctx: DecodeContext,
    /// Cycles in flight, oldest first (pipelining makes this a queue).
    pending: VecDeque<Pending>,
    /// The extended-protocol cycle being built until the client's Sync.
    building: Option<Pending>,
    statements: HashMap<String, String>,
    portals: HashMap<String, String>,
}

// === impl PgInspector ===

impl Default for PgInspector {
    fn default() -> Self {
        Self::new()
    }
}

impl PgInspector {
    pub fn new() -> Self {
        let mut ctx = DecodeContext::default();
        ctx.awaiting_frontend_ssl = false;
        ctx.awaiting_frontend_startup = false;
        Self {
            client: Framer::default(),
            upstream: Framer::default(),
            ctx,
            pending: VecDeque::new(),
            building: None,
            statements: HashMap::new(),
            portals: HashMap::new(),
        }
    }

    /// Consumes every complete (or pass-through) byte of `buf` sent by the
    /// client; leaves a partial inspected message in `buf`.
    pub fn on_client(
        &mut self,
        buf: &mut BytesMut,
        now_ms: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), InspectError> {
        self.pump(Side::Client, buf, now_ms, out)
    }

    /// Same as [`Self::on_client`] for bytes from the upstream.
    pub fn on_upstream(
        &mut self,
        buf: &mut BytesMut,
        now_ms: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), InspectError> {
        self.pump(Side::Upstream, buf, now_ms, out)
    }

    fn pump(
        &mut self,
        side: Side,
        buf: &mut BytesMut,
        now_ms: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), InspectError> {
        let mut pos = 0;
        loop {
            let frame = match side {
                Side::Client => self.client.next(buf, pos, |t| {
                    matches!(t, b'Q' | b'P' | b'B' | b'E' | b'S' | b'X')
                }),
                Side::Upstream => self
                    .upstream
                    .next(buf, pos, |t| matches!(t, b'C' | b'E' | b'T' | b'Z')),
            }
            .map_err(|e| frame_error(side, e))?;
            match frame {
                Frame::Incomplete => break,
                Frame::Pass(n) => pos += n,
                Frame::Whole { ty, len } => {
                    let msg = buf.get(pos..pos + len).unwrap_or_default();
                    match side {
                        Side::Client => self.client_message(ty, msg, now_ms, out)?,
                        Side::Upstream => self.upstream_message(ty, msg, now_ms, out)?,
                    }
                    pos += len;
                }
            }
        }
        if pos > 0 {
            let bytes = buf.split_to(pos).freeze();
            out.push(match side {
                Side::Client => Action::ToUpstream(bytes),
                Side::Upstream => Action::ToClient(bytes),
            });
        }
        Ok(())
    }

    fn client_message(
        &mut self,
        ty: u8,
        msg: &[u8],
        now_ms: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), InspectError> {
        let side = Side::Client;
        match ty {
            b'Q' => {
                // pgwire caps Query at 10,000 bytes; longer queries are read
                // directly (the body is one C string).
                let text = match decode::<Query>(msg, &self.ctx, side, ty) {
                    Ok(q) => q.query,
                    Err(_) => cstring_body(msg).ok_or_else(|| malformed(side, ty, "query"))?,
                };
                self.pending.push_back(Pending {
                    protocol: Protocol::Simple,
                    statements: vec![text.clone()],
                    outcome: Outcome::default(),
                    started_ms: now_ms,
                });
                event(out, now_ms, SessionEvent::Query { text });
            }
            b'P' => {
                let p: Parse = decode(msg, &self.ctx, side, ty)?;
                let name = p.name.unwrap_or_default();
                remember(&mut self.statements, name.clone(), p.query.clone());
                event(
                    out,
                    now_ms,
                    SessionEvent::Parse {
                        name,
                        text: p.query,
                    },
                );
            }
            b'B' => {
                let b: Bind = decode(msg, &self.ctx, side, ty)?;
                let text = self
                    .statements
                    .get(b.statement_name.as_deref().unwrap_or_default())
                    .cloned()
                    .unwrap_or_else(|| "<unknown prepared statement>".to_string());
                remember(&mut self.portals, b.portal_name.unwrap_or_default(), text);
            }
            b'E' => {
                let e: Execute = decode(msg, &self.ctx, side, ty)?;
                let text = self
                    .portals
                    .get(e.name.as_deref().unwrap_or_default())
                    .cloned()
                    .unwrap_or_else(|| "<unknown portal>".to_string());
                self.building
                    .get_or_insert_with(|| Pending {
                        protocol: Protocol::Extended,
                        statements: Vec::new(),
                        outcome: Outcome::default(),
                        started_ms: now_ms,
                    })
                    .statements
                    .push(text);
            }
            b'S' => {
                let cycle = self.building.take().unwrap_or(Pending {
                    protocol: Protocol::Extended,
                    statements: Vec::new(),
                    outcome: Outcome::default(),
                    started_ms: now_ms,
                });
                self.pending.push_back(cycle);
            }
            b'X' => event(out, now_ms, SessionEvent::Terminate),
            _ => {}
        }
        Ok(())
    }

    fn upstream_message(
        &mut self,
        ty: u8,
        msg: &[u8],
        now_ms: i64,
        out: &mut Vec<Action>,
    ) -> Result<(), InspectError> {
        let side = Side::Upstream;
        match ty {
            b'C' => {
                let c: CommandComplete = decode(msg, &self.ctx, side, ty)?;
                if let Some(p) = self.pending.front_mut() {
                    p.outcome.rows += rows_of_command_tag(&c.tag);
                    p.outcome.command_tags.push(c.tag.clone());
                }
                event(out, now_ms, SessionEvent::CommandComplete { tag: c.tag });
            }
            b'E' => {
                let (code, message) = match decode::<ErrorResponse>(msg, &self.ctx, side, ty) {
                    Ok(e) => error_fields(&e.fields),
                    // Oversized errors are forwarded untouched; record what we know.
                    Err(_) => (
                        "XX000".to_string(),
                        "<error message too large to inspect>".into(),
                    ),
                };
                if let Some(p) = self.pending.front_mut() {
                    p.outcome.error_code.get_or_insert_with(|| code.clone());
                }
                event(out, now_ms, SessionEvent::Error { code, message });
            }
            b'T' => {
                let r: RowDescription = decode(msg, &self.ctx, side, ty)?;
                let columns = r.fields.into_iter().map(|f| f.name).collect();
                event(out, now_ms, SessionEvent::RowDescription { columns });
            }
            b'Z' => {
                if let Some(p) = self.pending.pop_front() {
                    event(
                        out,
                        now_ms,
                        SessionEvent::StatementDone {
                            protocol: p.protocol,
                            statements: p.statements,
                            outcome: p.outcome,
                            started_ms: p.started_ms,
                        },
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn event(out: &mut Vec<Action>, at_ms: i64, event: SessionEvent) {
    out.push(Action::Event { at_ms, event });
}

fn remember(map: &mut HashMap<String, String>, key: String, value: String) {
    if map.len() >= MAX_NAMED && !map.contains_key(&key) {
        return;
    }
    map.insert(key, value);
}

fn decode<M: Message>(
    msg: &[u8],
    ctx: &DecodeContext,
    side: Side,
    ty: u8,
) -> Result<M, InspectError> {
    let mut b = BytesMut::from(msg);
    match M::decode(&mut b, ctx) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(malformed(side, ty, "truncated")),
        Err(e) => Err(malformed(side, ty, &e.to_string())),
    }
}

fn malformed(side: Side, ty: u8, reason: &str) -> InspectError {
    InspectError::Malformed {
        side,
        ty,
        reason: reason.to_string(),
    }
}

fn frame_error(side: Side, e: FrameError) -> InspectError {
    match e {
        FrameError::BadLength(len) => InspectError::BadLength { side, len },
        FrameError::TooLarge(ty, len) => InspectError::TooLarge { side, ty, len },
    }
}

/// The single C string that forms the body of a message.
fn cstring_body(msg: &[u8]) -> Option<String> {
    let body = msg.get(5..)?;
    let end = body.iter().position(|&b| b == 0)?;
    String::from_utf8(body.get(..end)?.to_vec()).ok()
}

fn error_fields(fields: &[(u8, String)]) -> (String, String) {
    let find = |k: u8| {
        fields
            .iter()
            .find(|(f, _)| *f == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    (find(b'C'), find(b'M'))
}
