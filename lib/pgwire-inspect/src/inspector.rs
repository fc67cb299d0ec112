//! The per-session inspector.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use gatehouse_audit::{Outcome, rows_of_command_tag};

use crate::framer::{Frame, FrameError, Framer};
use crate::{build, wire};

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
    #[error("{side:?} sent a {len}-byte '{}' message, over the inspection limit of 64 MiB per message", *ty as char)]
    TooLarge { side: Side, ty: u8, len: usize },
    #[error("{side:?} sent a malformed '{}' message", *ty as char)]
    Malformed { side: Side, ty: u8 },
    #[error("the target started binary COPY output, which cannot be masked")]
    Unmaskable,
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
    /// A simple query is one statement (its whole text); in the extended
    /// protocol each Execute the upstream answered is one.
    StatementDone {
        protocol: Protocol,
        statements: Vec<Statement>,
        /// When the cycle started (the time passed with the query bytes).
        started_ms: i64,
    },
    /// The client said goodbye.
    Terminate,
    /// A result row as the client receives it (masked), when rows are
    /// recorded ([`PgInspector::record_rows`]).
    Row { values: Vec<Option<Vec<u8>>> },
    /// The upstream sent a notice (when rows are recorded).
    Notice { code: String, message: String },
}

/// One statement that ran, with its parameters and outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Statement {
    pub text: String,
    /// Bound parameters rendered as text (`None` for SQL NULL); absent for
    /// simple queries.
    pub parameters: Option<Vec<Option<String>>>,
    pub outcome: Outcome,
    /// The guardrail that refused it, if one did.
    pub refused_by: Option<String>,
    /// Values masked in its results, per detector (never the values).
    pub masked: Vec<(String, u64)>,
}

/// Masks result values before they reach the client.
pub trait Mask: Send {
    /// Masks the values of one row (text only); returns the changed ones
    /// by index.
    fn mask_values(&mut self, values: &[&[u8]]) -> Vec<(usize, Vec<u8>)>;
    /// Masks one chunk of COPY text/CSV output.
    fn mask_copy(&mut self, data: &[u8]) -> Option<Vec<u8>>;
    /// Whether a column's whole value is masked, by the OID of its table
    /// (0 when it is not a table column) and its name.
    fn whole_column(&self, table_oid: u32, name: &str) -> bool;
    /// The value of a whole-masked text column.
    fn mask_whole(&mut self, value: &[u8]) -> Vec<u8>;
    /// Values masked since the last call, per detector.
    fn take_counts(&mut self) -> Vec<(String, u64)>;
}

/// How one result column is masked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnMask {
    /// Not text: left alone.
    Skip,
    /// Text: scanned; `prefix` bytes (jsonb's binary version) kept.
    Scan { prefix: usize },
    /// Matched a column rule, text: every letter and digit masked.
    Whole { prefix: usize },
    /// Matched a column rule, not text: sent as NULL.
    Null,
}

/// Types whose values are text in both formats (text, varchar, bpchar,
/// name, json, xml, unknown) and jsonb (a version byte, then text).
fn text_like(oid: u32, format: i16) -> Option<usize> {
    match (oid, format) {
        (25 | 1043 | 1042 | 19 | 114 | 142 | 705 | 18, _) => Some(0),
        (3802, 0) => Some(0),
        (3802, 1) => Some(1),
        // Arrays of text types, and user-defined types (citext, enums,
        // domains), in text format.
        (1009 | 1015 | 1014 | 199 | 3807, 0) => Some(0),
        (o, 0) if o >= 16384 => Some(0),
        _ => None,
    }
}

/// A guardrail's answer to a statement it refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The rule's name.
    pub rule: String,
    /// What the client is told.
    pub message: String,
}

/// A judge's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ruling {
    Allow,
    /// Stopped: the client gets 42501 naming the rule.
    Refuse(Refusal),
    /// Needs a human approval: held (a simple Query at once; a Parse is
    /// forwarded and each Execute of it is held) until [`PgInspector::resolve`].
    Hold(Refusal),
}

/// Decides, before it reaches the upstream, whether a statement text may
/// run. The inspector asks at every simple Query and every Parse.
pub trait Judge: Send {
    fn judge(&mut self, text: &str, at_ms: i64) -> Ruling;
}

/// How a held statement was settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// It runs (this once).
    Approved,
    /// It does not; the client is told why.
    Refused(Refusal),
}

/// What to do with one inspected message.
enum Step {
    Forward,
    Replace(Vec<u8>),
    /// Keep it (and everything after it) until resolved.
    Hold,
}

/// SQLSTATE of a statement a guardrail refused (insufficient_privilege).
pub const REFUSED_SQLSTATE: &str = "42501";

/// What the session loop must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    ToUpstream(Bytes),
    ToClient(Bytes),
    Event {
        at_ms: i64,
        event: SessionEvent,
    },
    /// A statement needs an approval: the client's bytes from it on stay in
    /// the buffer until [`PgInspector::resolve`] is called.
    Hold {
        text: String,
        refusal: Refusal,
    },
}

/// A query cycle the client started and the upstream has not yet closed with
/// ReadyForQuery.
struct Pending {
    protocol: Protocol,
    statements: Vec<Statement>,
    /// Extended protocol: statements the upstream has finished answering.
    answered: usize,
    /// Extended protocol: texts parsed in this cycle, and an error that
    /// came before any Execute (a failed Parse), so a cycle that ran
    /// nothing but failed is still evidence.
    parsed: Vec<String>,
    early_error: Option<String>,
    early_refusal: Option<String>,
    started_ms: i64,
}

impl Pending {
    fn new(protocol: Protocol, started_ms: i64) -> Self {
        Self {
            protocol,
            statements: Vec::new(),
            answered: 0,
            parsed: Vec::new(),
            early_error: None,
            early_refusal: None,
            started_ms,
        }
    }

    /// The statement the upstream's next result belongs to.
    fn current(&mut self) -> Option<&mut Statement> {
        match self.protocol {
            Protocol::Simple => self.statements.first_mut(),
            Protocol::Extended => self.statements.get_mut(self.answered),
        }
    }

    /// The current statement's result is complete.
    fn advance(&mut self) {
        if self.protocol == Protocol::Extended {
            self.answered += 1;
        }
    }

    /// What ran: in the extended protocol, Executes after an error are
    /// skipped by the upstream and are not reported as run.
    fn into_ran(mut self) -> Vec<Statement> {
        if self.protocol == Protocol::Extended {
            self.statements.truncate(self.answered);
            if let (true, Some(code)) = (self.statements.is_empty(), self.early_error) {
                self.statements.push(Statement {
                    text: self.parsed.join(";\n"),
                    parameters: None,
                    outcome: Outcome {
                        error_code: Some(code),
                        ..Default::default()
                    },
                    refused_by: self.early_refusal,
                    masked: Vec::new(),
                });
            }
        }
        self.statements
    }
}

/// A prepared statement as the inspector knows it.
#[derive(Clone, Default)]
struct Prepared {
    text: String,
    /// Parameter type OIDs, from Parse or the upstream's ParameterDescription.
    types: Vec<u32>,
    /// Every Execute of it waits for an approval.
    hold: Option<Refusal>,
}

/// A bound portal: its statement and rendered parameters.
#[derive(Clone)]
struct Portal {
    text: String,
    parameters: Vec<Option<String>>,
    hold: Option<Refusal>,
}

/// Inspects one PostgreSQL session after authentication.
pub struct PgInspector {
    client: Framer,
    upstream: Framer,
    /// Cycles in flight, oldest first (pipelining makes this a queue).
    pending: VecDeque<Pending>,
    /// The extended-protocol cycle being built until the client's Sync.
    building: Option<Pending>,
    statements: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    /// Statement Describes awaiting their ParameterDescription, with the
    /// number of the cycle they belong to.
    describing: VecDeque<(u64, String)>,
    /// Cycles the client has closed (Sync or Query) and the upstream has
    /// closed (ReadyForQuery).
    client_cycles: u64,
    upstream_cycles: u64,
    judge: Option<Box<dyn Judge>>,
    /// The text sent upstream in place of a refused statement: a syntax
    /// error the upstream reports, in order, as the statement's failure.
    decoy: String,
    /// Refusals whose decoy error the upstream has yet to report.
    refused: VecDeque<Refusal>,
    mask: Option<Box<dyn Mask>>,
    /// Emit [`SessionEvent::Row`] and [`SessionEvent::Notice`].
    rows: bool,
    /// The statement being held (its rule), and its resolution once given.
    held: Option<Refusal>,
    resolution: Option<Resolution>,
    /// How each column of the result being sent is masked; `None` before a
    /// RowDescription (every value is then scanned as text).
    columns: Option<Vec<ColumnMask>>,
}

// === impl PgInspector ===

impl Default for PgInspector {
    fn default() -> Self {
        Self::new()
    }
}

impl PgInspector {
    pub fn new() -> Self {
        Self {
            client: Framer::default(),
            upstream: Framer::default(),
            pending: VecDeque::new(),
            building: None,
            statements: HashMap::new(),
            portals: HashMap::new(),
            describing: VecDeque::new(),
            client_cycles: 0,
            upstream_cycles: 0,
            judge: None,
            decoy: String::new(),
            refused: VecDeque::new(),
            mask: None,
            held: None,
            resolution: None,
            columns: None,
            rows: false,
        }
    }

    /// Emits every result row as delivered (after masking) and every
    /// notice as events, for the session recording.
    pub fn record_rows(&mut self, on: bool) {
        self.rows = on;
    }

    /// Masks result values (DataRow values of text types, COPY text output)
    /// with `mask` from now on. Binary COPY output then ends the session:
    /// it cannot be masked (guardrails refuse it before it runs).
    pub fn set_mask(&mut self, mask: Box<dyn Mask>) {
        self.mask = Some(mask);
    }

    /// Settles the held statement; the next call to [`Self::on_client`]
    /// with the same buffer carries on from it.
    pub fn resolve(&mut self, r: Resolution) {
        self.resolution = Some(r);
    }

    /// Ends the result being sent; returns what was masked in it.
    fn close_result(&mut self) -> Vec<(String, u64)> {
        self.columns = None;
        self.mask
            .as_mut()
            .map(|m| m.take_counts())
            .unwrap_or_default()
    }

    /// Masks one DataRow's values: each value's replacement (`Some(None)`
    /// for NULL, `Some(Some(v))` for a masked value, `None` to keep it), or
    /// `None` when nothing changes.
    fn mask_row(&mut self, values: &[Option<&[u8]>]) -> Option<Vec<Option<Option<Vec<u8>>>>> {
        let mask = self.mask.as_mut()?;
        let how = |i: usize| match &self.columns {
            Some(c) => c.get(i).copied().unwrap_or(ColumnMask::Skip),
            None => ColumnMask::Scan { prefix: 0 },
        };
        let mut new: Vec<Option<Option<Vec<u8>>>> = vec![None; values.len()];
        let mut scan_at = Vec::new();
        let mut scan = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let (Some(v), Some(slot)) = (v, new.get_mut(i)) else {
                continue;
            };
            match how(i) {
                ColumnMask::Skip => {}
                ColumnMask::Scan { prefix } => {
                    scan_at.push((i, prefix));
                    scan.push(v.get(prefix..).unwrap_or_default());
                }
                ColumnMask::Whole { prefix } => {
                    let mut w = v.get(..prefix).unwrap_or_default().to_vec();
                    w.extend(mask.mask_whole(v.get(prefix..).unwrap_or_default()));
                    *slot = Some(Some(w));
                }
                ColumnMask::Null => *slot = Some(None),
            }
        }
        if !scan.is_empty() {
            for (j, m) in mask.mask_values(&scan) {
                let Some(&(i, prefix)) = scan_at.get(j) else {
                    continue;
                };
                let orig = values.get(i).copied().flatten().unwrap_or_default();
                let mut w = orig.get(..prefix).unwrap_or_default().to_vec();
                w.extend(m);
                if let Some(slot) = new.get_mut(i) {
                    *slot = Some(Some(w));
                }
            }
        }
        if new.iter().all(Option::is_none) {
            return None;
        }
        Some(new)
    }

    /// An inspector that asks `judge` about every statement. `tag` (a few
    /// letters or digits, unique to the session) names the decoy.
    ///
    /// A refused statement is replaced, in place, by a decoy that fails to
    /// parse upstream, so the upstream itself ends the statement with an
    /// error in the right place of the stream: a pipeline stops there, an
    /// implicit transaction rolls back, an explicit one is aborted, and
    /// ReadyForQuery carries the true status. The decoy's error is then
    /// rewritten to the refusal (SQLSTATE 42501 naming the rule).
    pub fn with_judge(judge: Box<dyn Judge>, tag: &str) -> Self {
        let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).collect();
        Self {
            judge: Some(judge),
            decoy: format!("gatehouse_refused_{tag}"),
            ..Self::new()
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
                    matches!(t, b'Q' | b'P' | b'B' | b'E' | b'S' | b'X' | b'D' | b'C')
                }),
                Side::Upstream => {
                    let masking = self.mask.is_some();
                    let rows = self.rows;
                    self.upstream.next(buf, pos, |t| {
                        matches!(t, b'C' | b'E' | b'T' | b'Z' | b'I' | b's' | b't')
                            || (masking && matches!(t, b'D' | b'd' | b'H'))
                            || (rows && matches!(t, b'D' | b'N'))
                    })
                }
            }
            .map_err(|e| frame_error(side, e))?;
            match frame {
                Frame::Incomplete => break,
                Frame::Pass(n) => pos += n,
                Frame::Whole { ty, len } => {
                    let msg = buf.get(pos..pos + len).unwrap_or_default();
                    let step = match side {
                        Side::Client => self.client_message(ty, msg, now_ms, out)?,
                        Side::Upstream => match self.upstream_message(ty, msg, now_ms, out)? {
                            Some(with) => Step::Replace(with),
                            None => Step::Forward,
                        },
                    };
                    match step {
                        Step::Forward => pos += len,
                        Step::Hold => break,
                        Step::Replace(with) => {
                            forward(side, buf, pos, out);
                            let _ = buf.split_to(len);
                            out.push(to(side, Bytes::from(with)));
                            pos = 0;
                        }
                    }
                }
            }
        }
        forward(side, buf, pos, out);
        Ok(())
    }

    /// The resolution of the held statement when it is the one coming
    /// round again (still held without one); otherwise `hold` for an Execute
    /// of a statement needing approval, or the judge's ruling on `text`.
    fn rule(&mut self, text: &str, now_ms: i64, hold: Option<Refusal>) -> Ruling {
        if let Some(h) = self.held.take() {
            return match self.resolution.take() {
                Some(Resolution::Approved) => Ruling::Allow,
                Some(Resolution::Refused(f)) => Ruling::Refuse(f),
                None => Ruling::Hold(h),
            };
        }
        if let Some(h) = hold {
            return Ruling::Hold(h);
        }
        match self.judge.as_mut() {
            Some(j) => j.judge(text, now_ms),
            None => Ruling::Allow,
        }
    }

    /// Holds the message at hand (and what follows) until resolved.
    fn hold(&mut self, text: String, refusal: Refusal, out: &mut Vec<Action>) -> Step {
        self.held = Some(refusal.clone());
        out.push(Action::Hold { text, refusal });
        Step::Hold
    }

    /// Queues a refusal for the decoy's error; returns the rule.
    fn queue_refusal(&mut self, r: Refusal) -> String {
        let rule = r.rule.clone();
        self.refused.push_back(r);
        rule
    }

    /// Inspects one client message: forward it, replace it, or hold it.
    fn client_message(
        &mut self,
        ty: u8,
        msg: &[u8],
        now_ms: i64,
        out: &mut Vec<Action>,
    ) -> Result<Step, InspectError> {
        let side = Side::Client;
        let mut replace = None;
        match ty {
            b'Q' => {
                // pgwire caps Query at 10,000 bytes; longer queries are read
                // directly (the body is one C string).
                let text = wire::query(msg).ok_or_else(|| malformed(side, ty))?;
                let refusal = match self.rule(&text, now_ms, None) {
                    Ruling::Allow => None,
                    Ruling::Refuse(r) => Some(self.queue_refusal(r)),
                    Ruling::Hold(r) => return Ok(self.hold(text, r, out)),
                };
                let mut cycle = Pending::new(Protocol::Simple, now_ms);
                if refusal.is_some() {
                    replace = Some(build::query(&self.decoy));
                }
                cycle.statements.push(Statement {
                    text: text.clone(),
                    refused_by: refusal,
                    ..Default::default()
                });
                self.pending.push_back(cycle);
                self.client_cycles += 1;
                event(out, now_ms, SessionEvent::Query { text });
            }
            b'P' => {
                let p = wire::parse(msg).ok_or_else(|| malformed(side, ty))?;
                let name = p.name;
                let cycle = self
                    .building
                    .get_or_insert_with(|| Pending::new(Protocol::Extended, now_ms));
                if cycle.parsed.len() < 16 {
                    cycle.parsed.push(p.query.clone());
                }
                // Parsing runs nothing: a statement needing approval is
                // prepared, and each Execute of it is held.
                let mut hold = None;
                match self.judge.as_mut().map(|j| j.judge(&p.query, now_ms)) {
                    None | Some(Ruling::Allow) => {}
                    Some(Ruling::Hold(r)) => hold = Some(r),
                    Some(Ruling::Refuse(r)) => {
                        let rule = self.queue_refusal(r);
                        replace = Some(build::parse(&name, &self.decoy));
                        if let Some(c) = self.building.as_mut() {
                            c.early_refusal.get_or_insert(rule);
                        }
                    }
                }
                remember(
                    &mut self.statements,
                    name.clone(),
                    Prepared {
                        text: p.query.clone(),
                        types: p.type_oids,
                        hold,
                    },
                );
                event(
                    out,
                    now_ms,
                    SessionEvent::Parse {
                        name,
                        text: p.query,
                    },
                );
            }
            b'D' => {
                let (kind, name) = wire::target(msg).ok_or_else(|| malformed(side, ty))?;
                if kind == b'S' {
                    self.describing.push_back((self.client_cycles, name));
                }
            }
            b'C' => {
                let (kind, name) = wire::target(msg).ok_or_else(|| malformed(side, ty))?;
                if kind == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
            }
            b'B' => {
                let b = wire::bind(msg).ok_or_else(|| malformed(side, ty))?;
                let prepared = self.statements.get(&b.statement);
                let (text, types, hold) = match prepared {
                    Some(p) => (p.text.clone(), p.types.as_slice(), p.hold.clone()),
                    None => ("<unknown prepared statement>".to_string(), &[][..], None),
                };
                let parameters = b
                    .parameters
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let format = match b.formats.as_slice() {
                            [] => 0,
                            [one] => *one,
                            many => many.get(i).copied().unwrap_or_default(),
                        };
                        let oid = types.get(i).copied().unwrap_or_default();
                        v.as_deref().map(|v| render_parameter(v, format, oid))
                    })
                    .collect();
                remember(
                    &mut self.portals,
                    b.portal,
                    Portal {
                        text,
                        parameters,
                        hold,
                    },
                );
            }
            b'E' => {
                let name = wire::execute(msg).ok_or_else(|| malformed(side, ty))?;
                let hold = self.portals.get(&name).and_then(|p| p.hold.clone());
                let mut refused_by = None;
                if hold.is_some() || self.held.is_some() {
                    let text = self
                        .portals
                        .get(&name)
                        .map(|p| p.text.clone())
                        .unwrap_or_default();
                    match self.rule(&text, now_ms, hold) {
                        Ruling::Allow => {}
                        Ruling::Hold(r) => return Ok(self.hold(text, r, out)),
                        Ruling::Refuse(r) => {
                            // A named decoy, so the unnamed statement stays.
                            refused_by = Some(self.queue_refusal(r));
                            replace = Some(build::parse(&self.decoy, &self.decoy));
                        }
                    }
                }
                let portal = self.portals.get(&name);
                let statement = match portal {
                    Some(p) => Statement {
                        text: p.text.clone(),
                        parameters: Some(p.parameters.clone()),
                        outcome: Outcome::default(),
                        refused_by,
                        masked: Vec::new(),
                    },
                    None => Statement {
                        text: "<unknown portal>".into(),
                        ..Default::default()
                    },
                };
                self.building
                    .get_or_insert_with(|| Pending::new(Protocol::Extended, now_ms))
                    .statements
                    .push(statement);
            }
            b'S' => {
                let cycle = self
                    .building
                    .take()
                    .unwrap_or_else(|| Pending::new(Protocol::Extended, now_ms));
                self.pending.push_back(cycle);
                self.client_cycles += 1;
            }
            b'X' => event(out, now_ms, SessionEvent::Terminate),
            _ => {}
        }
        Ok(match replace {
            Some(r) => Step::Replace(r),
            None => Step::Forward,
        })
    }

    /// Inspects one upstream message; returns what to send the client
    /// instead of it, if anything.
    fn upstream_message(
        &mut self,
        ty: u8,
        msg: &[u8],
        now_ms: i64,
        out: &mut Vec<Action>,
    ) -> Result<Option<Vec<u8>>, InspectError> {
        let side = Side::Upstream;
        let mut replace = None;
        match ty {
            b'C' => {
                let tag = wire::command_complete(msg).ok_or_else(|| malformed(side, ty))?;
                let masked = self.close_result();
                if let Some(p) = self.pending.front_mut() {
                    if let Some(st) = p.current() {
                        st.outcome.rows += rows_of_command_tag(&tag);
                        st.outcome.command_tags.push(tag.clone());
                        merge_counts(&mut st.masked, masked);
                    }
                    p.advance();
                }
                event(out, now_ms, SessionEvent::CommandComplete { tag });
            }
            // EmptyQueryResponse, PortalSuspended: the Execute is answered.
            b'I' | b's' => {
                if ty == b'I' {
                    self.columns = None;
                }
                if let Some(p) = self.pending.front_mut() {
                    p.advance();
                }
            }
            b'E' => {
                let (mut code, mut message) =
                    wire::error_fields(msg).ok_or_else(|| malformed(side, ty))?;
                let mut refused_by = None;
                let masked = self.close_result();
                if !self.decoy.is_empty()
                    && code == "42601"
                    && message.contains(&self.decoy)
                    && let Some(r) = self.refused.pop_front()
                {
                    code = REFUSED_SQLSTATE.to_string();
                    message = format!(
                        "gatehouse: statement refused by rule \"{}\": {}",
                        r.rule, r.message
                    );
                    replace = Some(build::error_response(
                        build::Severity::Error,
                        &code,
                        &message,
                    ));
                    refused_by = Some(r.rule);
                }
                // An error before the cycle's first Execute ran (a failed
                // Parse or Bind) belongs to no statement.
                if let Some(p) = self.pending.front_mut() {
                    match p.current() {
                        Some(st) => {
                            st.outcome.error_code.get_or_insert_with(|| code.clone());
                            merge_counts(&mut st.masked, masked);
                            if refused_by.is_some() {
                                st.refused_by = refused_by;
                            }
                            p.advance();
                        }
                        None => {
                            p.early_error.get_or_insert_with(|| code.clone());
                        }
                    }
                }
                event(out, now_ms, SessionEvent::Error { code, message });
            }
            b'D' => {
                // Decoded once, for masking and for the recording.
                let mut row = wire::data_row(msg).ok_or_else(|| malformed(side, ty))?;
                let new = self.mask_row(&row);
                if let Some(new) = &new {
                    for (v, n) in row.iter_mut().zip(new) {
                        if let Some(n) = n {
                            *v = n.as_deref();
                        }
                    }
                    replace = Some(build::data_row(&row));
                }
                if self.rows {
                    let values = row.iter().map(|v| v.map(<[u8]>::to_vec)).collect();
                    event(out, now_ms, SessionEvent::Row { values });
                }
            }
            b'N' if self.rows => {
                let (code, message) = wire::error_fields(msg).ok_or_else(|| malformed(side, ty))?;
                event(out, now_ms, SessionEvent::Notice { code, message });
            }
            b'H' if wire::copy_out_format(msg) != Some(0) => {
                return Err(InspectError::Unmaskable);
            }
            b'd' => {
                if let Some(m) = self.mask.as_mut()
                    && let Some(masked) = m.mask_copy(wire::copy_data(msg))
                {
                    replace = Some(build::copy_data(&masked));
                }
            }
            b't' => {
                let types = wire::parameter_description(msg).ok_or_else(|| malformed(side, ty))?;
                if let Some((_, name)) = self.describing.pop_front()
                    && let Some(p) = self.statements.get_mut(&name)
                {
                    p.types = types;
                }
            }
            b'T' => {
                let cols = wire::row_description(msg).ok_or_else(|| malformed(side, ty))?;
                if let Some(m) = self.mask.as_ref() {
                    self.columns = Some(
                        cols.iter()
                            .map(|c| {
                                let text = text_like(c.type_oid, c.format);
                                match (m.whole_column(c.table_oid, &c.name), text) {
                                    (true, Some(prefix)) => ColumnMask::Whole { prefix },
                                    (true, None) => ColumnMask::Null,
                                    (false, Some(prefix)) => ColumnMask::Scan { prefix },
                                    (false, None) => ColumnMask::Skip,
                                }
                            })
                            .collect(),
                    );
                }
                let columns = cols.into_iter().map(|c| c.name).collect();
                event(out, now_ms, SessionEvent::RowDescription { columns });
            }
            b'Z' => {
                self.columns = None;
                // The greeting's ReadyForQuery closes no client cycle.
                if let Some(p) = self.pending.pop_front() {
                    self.upstream_cycles += 1;
                    // Describes of this cycle that got no answer were
                    // skipped after an error.
                    while self
                        .describing
                        .front()
                        .is_some_and(|(cycle, _)| *cycle < self.upstream_cycles)
                    {
                        self.describing.pop_front();
                    }
                    let (protocol, started_ms) = (p.protocol, p.started_ms);
                    event(
                        out,
                        now_ms,
                        SessionEvent::StatementDone {
                            protocol,
                            statements: p.into_ran(),
                            started_ms,
                        },
                    );
                }
            }
            _ => {}
        }
        Ok(replace)
    }
}

/// Adds per-detector mask counts to a statement's.
pub fn merge_counts(into: &mut Vec<(String, u64)>, from: Vec<(String, u64)>) {
    for (k, n) in from {
        match into.iter_mut().find(|(d, _)| *d == k) {
            Some(e) => e.1 += n,
            None => into.push((k, n)),
        }
    }
}

/// Forwards the first `n` bytes of `buf` to the other side.
fn forward(side: Side, buf: &mut BytesMut, n: usize, out: &mut Vec<Action>) {
    if n > 0 {
        out.push(to(side, buf.split_to(n).freeze()));
    }
}

fn to(from: Side, bytes: Bytes) -> Action {
    match from {
        Side::Client => Action::ToUpstream(bytes),
        Side::Upstream => Action::ToClient(bytes),
    }
}

fn event(out: &mut Vec<Action>, at_ms: i64, event: SessionEvent) {
    out.push(Action::Event { at_ms, event });
}

fn remember<V>(map: &mut HashMap<String, V>, key: String, value: V) {
    if map.len() >= MAX_NAMED && !map.contains_key(&key) {
        return;
    }
    map.insert(key, value);
}

fn malformed(side: Side, ty: u8) -> InspectError {
    InspectError::Malformed { side, ty }
}

fn frame_error(side: Side, e: FrameError) -> InspectError {
    match e {
        FrameError::BadLength(len) => InspectError::BadLength { side, len },
        FrameError::TooLarge(ty, len) => InspectError::TooLarge { side, ty, len },
    }
}

/// Longest rendered parameter kept in the evidence.
const MAX_PARAMETER_CHARS: usize = 1024;

/// A bound parameter as PostgreSQL would print it: text-format values as
/// sent, binary values of common types decoded, other binary values as
/// `\x` hex. Long values are cut, saying how long they were.
fn render_parameter(v: &[u8], format: i16, oid: u32) -> String {
    let s = if format == 0 {
        String::from_utf8_lossy(v).into_owned()
    } else {
        render_binary(v, oid).unwrap_or_else(|| format!("\\x{}", hex(v)))
    };
    if s.len() <= MAX_PARAMETER_CHARS {
        return s;
    }
    let mut cut = MAX_PARAMETER_CHARS;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", s.get(..cut).unwrap_or_default(), v.len())
}

fn render_binary(v: &[u8], oid: u32) -> Option<String> {
    Some(match oid {
        16 => match v {
            [0] => "f".into(),
            [_] => "t".into(),
            _ => return None,
        },
        17 => format!("\\x{}", hex(v)),
        21 => i16::from_be_bytes(v.try_into().ok()?).to_string(),
        23 | 26 => i32::from_be_bytes(v.try_into().ok()?).to_string(),
        20 => i64::from_be_bytes(v.try_into().ok()?).to_string(),
        700 => f32::from_be_bytes(v.try_into().ok()?).to_string(),
        701 => f64::from_be_bytes(v.try_into().ok()?).to_string(),
        // text, varchar, bpchar, name, json, unknown
        25 | 1043 | 1042 | 19 | 114 | 705 => String::from_utf8(v.to_vec()).ok()?,
        // jsonb: a version byte, then text
        3802 => match v.split_first() {
            Some((1, rest)) => String::from_utf8(rest.to_vec()).ok()?,
            _ => return None,
        },
        2950 => {
            let h = hex(v);
            if h.len() != 32 {
                return None;
            }
            format!(
                "{}-{}-{}-{}-{}",
                h.get(..8)?,
                h.get(8..12)?,
                h.get(12..16)?,
                h.get(16..20)?,
                h.get(20..)?
            )
        }
        _ => return None,
    })
}

fn hex(v: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(v.len() * 2);
    for b in v {
        let _ = write!(s, "{b:02x}");
    }
    s
}
