use crate::Statement;
use bytes::{BufMut, BytesMut};
use gatehouse_audit::Outcome;

use super::*;

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn query(s: &str) -> Vec<u8> {
    msg(b'Q', &cstr(s))
}

fn command_complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cstr(tag))
}

fn ready() -> Vec<u8> {
    msg(b'Z', b"I")
}

fn data_row(values: &[&str]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        b.put_i32(v.len() as i32);
        b.put_slice(v.as_bytes());
    }
    msg(b'D', &b)
}

fn error(code: &str, m: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr("ERROR"));
    b.push(b'C');
    b.extend(cstr(code));
    b.push(b'M');
    b.extend(cstr(m));
    b.push(0);
    msg(b'E', &b)
}

/// Feeds `client` then `upstream` bytes, each in chunks of `chunk` bytes, and
/// checks that every byte is forwarded unchanged and the events are `expect`.
fn check(client: &[u8], upstream: &[u8], chunk: usize, expect: &[SessionEvent]) {
    let mut insp = PgInspector::new();
    let mut out = Vec::new();
    let (mut to_up, mut to_client, mut events) = (Vec::new(), Vec::new(), Vec::new());
    for (side, input) in [(Side::Client, client), (Side::Upstream, upstream)] {
        let mut buf = BytesMut::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            match side {
                Side::Client => insp.on_client(&mut buf, 5, &mut out).unwrap(),
                Side::Upstream => insp.on_upstream(&mut buf, 7, &mut out).unwrap(),
            }
        }
        assert!(buf.is_empty(), "{side:?}: {} bytes left over", buf.len());
    }
    for a in out {
        match a {
            Action::ToUpstream(b) => to_up.extend_from_slice(&b),
            Action::ToClient(b) => to_client.extend_from_slice(&b),
            Action::Event { event, .. } => events.push(event),
            Action::Hold { .. } => panic!("held without a judge"),
        }
    }
    assert_eq!(to_up, client);
    assert_eq!(to_client, upstream);
    assert_eq!(events, expect);
}

fn simple_select() -> (Vec<u8>, Vec<u8>) {
    let client = query("select 1");
    let mut up = Vec::new();
    let mut t = BytesMut::new();
    t.put_i16(1);
    t.put_slice(&cstr("?column?"));
    t.put_i32(0);
    t.put_i16(0);
    t.put_u32(23);
    t.put_i16(4);
    t.put_i32(-1);
    t.put_i16(0);
    up.extend(msg(b'T', &t));
    up.extend(data_row(&["1"]));
    up.extend(command_complete("SELECT 1"));
    up.extend(ready());
    (client, up)
}

fn select_events() -> Vec<SessionEvent> {
    vec![
        SessionEvent::Query {
            text: "select 1".into(),
        },
        SessionEvent::RowDescription {
            columns: vec!["?column?".into()],
        },
        SessionEvent::CommandComplete {
            tag: "SELECT 1".into(),
        },
        SessionEvent::StatementDone {
            protocol: Protocol::Simple,
            statements: vec![Statement {
                text: "select 1".into(),
                parameters: None,
                refused_by: None,
                masked: Vec::new(),
                outcome: Outcome {
                    command_tags: vec!["SELECT 1".into()],
                    rows: 1,
                    error_code: None,
                },
            }],
            started_ms: 5,
        },
    ]
}

#[test]
fn simple_query_whole_and_byte_by_byte() {
    let (client, up) = simple_select();
    for chunk in [1, 3, 7, 1024] {
        check(&client, &up, chunk, &select_events());
    }
}

#[test]
fn multi_statement_with_error() {
    let client = query("insert into t values (1); select nope");
    let mut up = command_complete("INSERT 0 1");
    up.extend(error("42703", "column \"nope\" does not exist"));
    up.extend(ready());
    check(
        &client,
        &up,
        2,
        &[
            SessionEvent::Query {
                text: "insert into t values (1); select nope".into(),
            },
            SessionEvent::CommandComplete {
                tag: "INSERT 0 1".into(),
            },
            SessionEvent::Error {
                code: "42703".into(),
                message: "column \"nope\" does not exist".into(),
            },
            SessionEvent::StatementDone {
                protocol: Protocol::Simple,
                statements: vec![Statement {
                    text: "insert into t values (1); select nope".into(),
                    parameters: None,
                    refused_by: None,
                    masked: Vec::new(),
                    outcome: Outcome {
                        command_tags: vec!["INSERT 0 1".into()],
                        rows: 1,
                        error_code: Some("42703".into()),
                    },
                }],
                started_ms: 5,
            },
        ],
    );
}

#[test]
fn large_data_rows_stream_through_without_buffering() {
    let mut insp = PgInspector::new();
    let row = data_row(&[&"x".repeat(1 << 20)]);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut forwarded = 0;
    for piece in row.chunks(4096) {
        buf.extend_from_slice(piece);
        insp.on_upstream(&mut buf, 0, &mut out).unwrap();
        // Nothing of an uninspected message stays buffered.
        assert!(buf.is_empty());
        for a in out.drain(..) {
            if let Action::ToClient(b) = a {
                forwarded += b.len();
            }
        }
    }
    assert_eq!(forwarded, row.len());
}

#[test]
fn long_query_over_pgwire_limit_is_still_audited() {
    let text = format!("select '{}'", "a".repeat(20_000));
    let client = query(&text);
    let mut insp = PgInspector::new();
    let mut out = Vec::new();
    let mut buf = BytesMut::from(&client[..]);
    insp.on_client(&mut buf, 0, &mut out).unwrap();
    assert!(out.contains(&Action::Event {
        at_ms: 0,
        event: SessionEvent::Query { text }
    }));
}

#[test]
fn unknown_message_types_pass_through() {
    let client = msg(b'?', b"whatever");
    let up = msg(b'!', b"\x00\x01");
    check(&client, &up, 1, &[]);
}

#[test]
fn bad_length_is_an_error_naming_the_side() {
    let mut insp = PgInspector::new();
    let mut out = Vec::new();
    let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
    let err = insp.on_client(&mut buf, 0, &mut out).unwrap_err();
    assert!(matches!(
        err,
        InspectError::BadLength {
            side: Side::Client,
            len: 2
        }
    ));
}

#[test]
fn extended_protocol_names_the_executed_statement() {
    let mut client = Vec::new();
    let mut parse = cstr("s1");
    parse.extend(cstr("select $1::int"));
    parse.extend(0i16.to_be_bytes());
    client.extend(msg(b'P', &parse));
    let mut bind = cstr("");
    bind.extend(cstr("s1"));
    bind.extend(0i16.to_be_bytes());
    bind.extend(1i16.to_be_bytes());
    bind.extend(1i32.to_be_bytes());
    bind.push(b'7');
    bind.extend(0i16.to_be_bytes());
    client.extend(msg(b'B', &bind));
    let mut exec = cstr("");
    exec.extend(0i32.to_be_bytes());
    client.extend(msg(b'E', &exec));
    client.extend(msg(b'S', b""));
    let mut up = msg(b'1', b"");
    up.extend(msg(b'2', b""));
    up.extend(data_row(&["7"]));
    up.extend(command_complete("SELECT 1"));
    up.extend(ready());
    check(
        &client,
        &up,
        5,
        &[
            SessionEvent::Parse {
                name: "s1".into(),
                text: "select $1::int".into(),
            },
            SessionEvent::CommandComplete {
                tag: "SELECT 1".into(),
            },
            SessionEvent::StatementDone {
                protocol: Protocol::Extended,
                statements: vec![Statement {
                    text: "select $1::int".into(),
                    parameters: Some(vec![Some("7".into())]),
                    refused_by: None,
                    masked: Vec::new(),
                    outcome: Outcome {
                        command_tags: vec!["SELECT 1".into()],
                        rows: 1,
                        error_code: None,
                    },
                }],
                started_ms: 5,
            },
        ],
    );
}

/// Counts and lengths that promise more bytes than the message holds are
/// errors, not panics (pgwire's decoders panicked on these; found by fuzzing).
#[test]
fn messages_shorter_than_their_counts_are_malformed() {
    let mut parse = cstr("s");
    parse.extend(cstr("select 1"));
    parse.extend(10u16.to_be_bytes()); // ten type OIDs, none present
    let mut bind = cstr("");
    bind.extend(cstr(""));
    bind.extend(0u16.to_be_bytes());
    bind.extend(1u16.to_be_bytes());
    bind.extend(1000i32.to_be_bytes()); // a 1000-byte parameter, 2 present
    bind.extend(b"ab");
    let mut describe = Vec::new(); // no target kind at all
    describe.extend(b"");
    for (ty, body) in [(b'P', parse), (b'B', bind), (b'D', describe)] {
        let mut insp = PgInspector::new();
        let mut buf = BytesMut::from(&msg(ty, &body)[..]);
        let err = insp.on_client(&mut buf, 0, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, InspectError::Malformed { side: Side::Client, ty: t } if t == ty),
            "{err}"
        );
    }
    let mut rd = 3u16.to_be_bytes().to_vec(); // three columns, one name only
    rd.extend(cstr("a"));
    let mut insp = PgInspector::new();
    let mut buf = BytesMut::from(&msg(b'T', &rd)[..]);
    assert!(insp.on_upstream(&mut buf, 0, &mut Vec::new()).is_err());
}

#[test]
fn frontend_lengths_pgwire_cannot_take_are_refused() {
    use crate::frontend_length_ok;
    // Typed: a password message of length 0 (pgwire underflows on it).
    assert!(!frontend_length_ok(b"p\0\0\0\0", false));
    assert!(!frontend_length_ok(b"p\xff\xff\xff\xff", false));
    assert!(frontend_length_ok(b"p\0\0\0\x04", false));
    // Untyped startup packets are at least 8 bytes.
    assert!(!frontend_length_ok(b"\0\0\0\x04\x04\xd2", true));
    assert!(frontend_length_ok(b"\0\0\0\x08\x04\xd2\x16\x2f", true));
    // Not enough bytes to tell yet.
    assert!(frontend_length_ok(b"p\0", false));
}

/// Refuses statements that mention `DELETE`.
struct NoDelete;

impl Judge for NoDelete {
    fn judge(&mut self, text: &str, _at_ms: i64) -> Ruling {
        if text.contains("DELETE") {
            Ruling::Refuse(Refusal {
                rule: "no-delete".into(),
                message: "deletes are not allowed".into(),
            })
        } else if text.contains("UPDATE") {
            Ruling::Hold(Refusal {
                rule: "updates-need-approval".into(),
                message: "needs a reviewer".into(),
            })
        } else {
            Ruling::Allow
        }
    }
}

fn parse_msg(name: &str, q: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(q));
    b.extend(0i16.to_be_bytes());
    msg(b'P', &b)
}

/// Runs client bytes then upstream bytes through a judging inspector, in
/// chunks, and returns what went each way and the events.
fn judged(client: &[u8], upstream: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>, Vec<SessionEvent>) {
    let mut insp = PgInspector::with_judge(Box::new(NoDelete), "t1");
    let mut out = Vec::new();
    for (side, input) in [(Side::Client, client), (Side::Upstream, upstream)] {
        let mut buf = BytesMut::new();
        for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            match side {
                Side::Client => insp.on_client(&mut buf, 5, &mut out).unwrap(),
                Side::Upstream => insp.on_upstream(&mut buf, 7, &mut out).unwrap(),
            }
        }
    }
    let (mut up, mut down, mut ev) = (Vec::new(), Vec::new(), Vec::new());
    for a in out {
        match a {
            Action::ToUpstream(b) => up.extend_from_slice(&b),
            Action::ToClient(b) => down.extend_from_slice(&b),
            Action::Event { event, .. } => ev.push(event),
            Action::Hold { .. } => {}
        }
    }
    (up, down, ev)
}

#[test]
fn a_refused_simple_query_is_replaced_by_the_decoy_and_its_error_rewritten() {
    let decoy = "gatehouse_refused_t1";
    let client = [query("SELECT 1"), query("DELETE FROM t")].concat();
    let upstream_err = error("42601", &format!("syntax error at or near \"{decoy}\""));
    let upstream = [
        command_complete("SELECT 1"),
        ready(),
        upstream_err.clone(),
        ready(),
    ]
    .concat();
    for chunk in [1, 3, 4096] {
        let (up, down, events) = judged(&client, &upstream, chunk);
        assert_eq!(up, [query("SELECT 1"), build::query(decoy)].concat());
        let refusal = build::error_response(
            build::Severity::Error,
            "42501",
            "gatehouse: statement refused by rule \"no-delete\": deletes are not allowed",
        );
        assert_eq!(
            down,
            [command_complete("SELECT 1"), ready(), refusal, ready()].concat()
        );
        let done: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::StatementDone { statements, .. } => Some(statements.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0][0].refused_by, None);
        assert_eq!(done[1][0].text, "DELETE FROM t");
        assert_eq!(done[1][0].refused_by.as_deref(), Some("no-delete"));
        assert_eq!(done[1][0].outcome.error_code.as_deref(), Some("42501"));
    }
}

#[test]
fn a_refused_parse_is_replaced_and_a_genuine_syntax_error_is_left_alone() {
    let decoy = "gatehouse_refused_t1";
    let sync = msg(b'S', b"");
    let client = [parse_msg("s1", "DELETE FROM t"), sync.clone()].concat();
    let upstream = [
        error("42601", &format!("syntax error at or near \"{decoy}\"")),
        ready(),
    ]
    .concat();
    let (up, down, events) = judged(&client, &upstream, 2);
    assert_eq!(up, [build::parse("s1", decoy), sync.clone()].concat());
    assert!(String::from_utf8_lossy(&down).contains("rule \"no-delete\""));
    let refused = events.iter().any(|e| {
        matches!(e,
        SessionEvent::StatementDone { statements, .. }
            if statements.first().and_then(|s| s.refused_by.as_deref()) == Some("no-delete"))
    });
    assert!(refused, "{events:?}");
    // A client's own syntax error passes through untouched.
    let client = [query("SELEC 1")].concat();
    let upstream = [error("42601", "syntax error at or near \"SELEC\""), ready()].concat();
    let (up, down, _) = judged(&client, &upstream, 4096);
    assert_eq!(up, client);
    assert_eq!(down, upstream);
}

/// Masks the digits of any value containing "card", and whole `ssn…` columns.
struct MaskCards {
    counted: u64,
}

impl Mask for MaskCards {
    fn mask_values(&mut self, values: &[&[u8]]) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            if v.windows(4).any(|w| w == b"card") {
                self.counted += 1;
                out.push((
                    i,
                    v.iter()
                        .map(|b| if b.is_ascii_digit() { b'*' } else { *b })
                        .collect(),
                ));
            }
        }
        out
    }
    fn mask_copy(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        self.mask_values(&[data]).pop().map(|(_, v)| v)
    }
    fn whole_column(&self, _table_oid: u32, name: &str) -> bool {
        name.starts_with("ssn")
    }
    fn mask_whole(&mut self, value: &[u8]) -> Vec<u8> {
        vec![b'*'; value.len()]
    }
    fn take_counts(&mut self) -> Vec<(String, u64)> {
        let n = std::mem::take(&mut self.counted);
        if n == 0 {
            Vec::new()
        } else {
            vec![("card".into(), n)]
        }
    }
}

/// A RowDescription of (name, type OID, format) columns.
fn row_description(cols: &[(&str, u32, i16)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(cols.len() as i16);
    for (name, oid, format) in cols {
        b.put_slice(&cstr(name));
        b.put_u32(0);
        b.put_i16(0);
        b.put_u32(*oid);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(*format);
    }
    msg(b'T', &b)
}

fn data_row_opt(values: &[Option<&[u8]>]) -> Vec<u8> {
    build::data_row(values)
}

#[test]
fn result_values_are_masked_by_type_and_column_and_counted() {
    let client = query("select name, note, n, ssn, ssn_num from t");
    let upstream = [
        row_description(&[
            ("name", 25, 0),
            ("note", 3802, 1),
            ("n", 20, 0),
            ("ssn", 1043, 0),
            ("ssn_num", 23, 0),
        ]),
        data_row_opt(&[
            Some(b"card 4242"),
            Some(b"\x01{\"card\": 4242}"),
            Some(b"4242"),
            Some(b"123-45-6789"),
            Some(b"123456789"),
        ]),
        data_row_opt(&[Some(b"plain"), None, Some(b"card"), None, None]),
        command_complete("SELECT 2"),
        ready(),
    ]
    .concat();
    for chunk in [1, 5, 4096] {
        let mut insp = PgInspector::new();
        insp.set_mask(Box::new(MaskCards { counted: 0 }));
        let mut out = Vec::new();
        let mut buf = BytesMut::from(&client[..]);
        insp.on_client(&mut buf, 1, &mut out).unwrap();
        let mut buf = BytesMut::new();
        for piece in upstream.chunks(chunk) {
            buf.extend_from_slice(piece);
            insp.on_upstream(&mut buf, 2, &mut out).unwrap();
        }
        let mut down = Vec::new();
        let mut done = None;
        for a in out {
            match a {
                Action::ToClient(b) => down.extend_from_slice(&b),
                Action::Event {
                    event: SessionEvent::StatementDone { statements, .. },
                    ..
                } => done = Some(statements),
                _ => {}
            }
        }
        let want = [
            row_description(&[
                ("name", 25, 0),
                ("note", 3802, 1),
                ("n", 20, 0),
                ("ssn", 1043, 0),
                ("ssn_num", 23, 0),
            ]),
            // Text scanned; jsonb's version byte kept; int8 left alone;
            // a text column rule masks the whole value, a non-text one
            // becomes NULL.
            data_row_opt(&[
                Some(b"card ****"),
                Some(b"\x01{\"card\": ****}"),
                Some(b"4242"),
                Some(b"***********"),
                None,
            ]),
            data_row_opt(&[Some(b"plain"), None, Some(b"card"), None, None]),
            command_complete("SELECT 2"),
            ready(),
        ]
        .concat();
        assert_eq!(down, want, "chunk {chunk}");
        let done = done.unwrap();
        assert_eq!(done[0].masked, vec![("card".to_string(), 2)]);
    }
}

#[test]
fn copy_text_output_is_masked_and_binary_copy_output_ends_the_session() {
    let mut insp = PgInspector::new();
    insp.set_mask(Box::new(MaskCards { counted: 0 }));
    let mut out = Vec::new();
    let mut buf = BytesMut::from(&query("copy t to stdout")[..]);
    insp.on_client(&mut buf, 1, &mut out).unwrap();
    let mut head = BytesMut::new();
    head.put_u8(0);
    head.put_i16(1);
    head.put_i16(0);
    let upstream = [
        msg(b'H', &head),
        build::copy_data(b"1\tcard 4242\n"),
        msg(b'c', b""),
        command_complete("COPY 1"),
        ready(),
    ]
    .concat();
    let mut buf = BytesMut::from(&upstream[..]);
    insp.on_upstream(&mut buf, 2, &mut out).unwrap();
    let down: Vec<u8> = out
        .iter()
        .filter_map(|a| match a {
            Action::ToClient(b) => Some(b.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    let want = [
        msg(b'H', &head),
        build::copy_data(b"*\tcard ****\n"),
        msg(b'c', b""),
        command_complete("COPY 1"),
        ready(),
    ]
    .concat();
    assert_eq!(down, want);

    let mut insp = PgInspector::new();
    insp.set_mask(Box::new(MaskCards { counted: 0 }));
    let mut binary = BytesMut::new();
    binary.put_u8(1);
    binary.put_i16(0);
    let mut buf = BytesMut::from(&msg(b'H', &binary)[..]);
    assert!(matches!(
        insp.on_upstream(&mut buf, 2, &mut Vec::new()),
        Err(InspectError::Unmaskable)
    ));
}

/// Feeds client bytes; returns what was forwarded and the holds seen.
fn feed_client(insp: &mut PgInspector, buf: &mut BytesMut) -> (Vec<u8>, Vec<String>) {
    let mut out = Vec::new();
    insp.on_client(buf, 1, &mut out).unwrap();
    let (mut up, mut holds) = (Vec::new(), Vec::new());
    for a in out {
        match a {
            Action::ToUpstream(b) => up.extend_from_slice(&b),
            Action::Hold { text, refusal } => holds.push(format!("{text} [{}]", refusal.rule)),
            _ => {}
        }
    }
    (up, holds)
}

#[test]
fn a_held_simple_query_waits_then_runs_or_is_refused() {
    let mut insp = PgInspector::with_judge(Box::new(NoDelete), "t1");
    let client = [
        query("SELECT 1"),
        query("UPDATE t SET a = 1"),
        query("SELECT 2"),
    ]
    .concat();
    let mut buf = BytesMut::from(&client[..]);
    let (up, holds) = feed_client(&mut insp, &mut buf);
    // What came before is forwarded; the held query and what follows stay.
    assert_eq!(up, query("SELECT 1"));
    assert_eq!(holds, vec!["UPDATE t SET a = 1 [updates-need-approval]"]);
    assert_eq!(&buf[..], &client[query("SELECT 1").len()..]);
    // Asking again before a resolution holds again and forwards nothing.
    let (up, holds) = feed_client(&mut insp, &mut buf);
    assert!(up.is_empty());
    assert_eq!(holds.len(), 1);
    insp.resolve(Resolution::Approved);
    let (up, holds) = feed_client(&mut insp, &mut buf);
    assert!(holds.is_empty());
    assert_eq!(
        up,
        [query("UPDATE t SET a = 1"), query("SELECT 2")].concat()
    );
    // The same statement again is held again (a grant is for one run).
    let mut buf = BytesMut::from(&query("UPDATE t SET a = 1")[..]);
    let (_, holds) = feed_client(&mut insp, &mut buf);
    assert_eq!(holds.len(), 1);
    insp.resolve(Resolution::Refused(Refusal {
        rule: "updates-need-approval".into(),
        message: "denied by sa:bob: not today".into(),
    }));
    let (up, _) = feed_client(&mut insp, &mut buf);
    assert_eq!(up, build::query("gatehouse_refused_t1"));
}

#[test]
fn a_held_prepared_statement_is_parsed_and_each_execute_waits() {
    let mut insp = PgInspector::with_judge(Box::new(NoDelete), "t1");
    let mut bind = cstr("");
    bind.extend(cstr("u"));
    bind.extend(0i16.to_be_bytes());
    bind.extend(0i16.to_be_bytes());
    bind.extend(0i16.to_be_bytes());
    let bind = msg(b'B', &bind);
    let mut exec = cstr("");
    exec.extend(0i32.to_be_bytes());
    let exec = msg(b'E', &exec);
    let sync = msg(b'S', b"");
    let client = [
        parse_msg("u", "UPDATE t SET a = 1"),
        bind.clone(),
        exec.clone(),
        sync.clone(),
    ]
    .concat();
    let mut buf = BytesMut::from(&client[..]);
    let (up, holds) = feed_client(&mut insp, &mut buf);
    assert_eq!(
        up,
        [parse_msg("u", "UPDATE t SET a = 1"), bind.clone()].concat()
    );
    assert_eq!(holds, vec!["UPDATE t SET a = 1 [updates-need-approval]"]);
    insp.resolve(Resolution::Approved);
    let (up, _) = feed_client(&mut insp, &mut buf);
    assert_eq!(up, [exec.clone(), sync.clone()].concat());
    // A second Execute of the same statement waits again; refused, it is
    // replaced by a named decoy (the unnamed statement is left alone).
    let mut buf = BytesMut::from(&[bind.clone(), exec.clone(), sync.clone()].concat()[..]);
    let (up, holds) = feed_client(&mut insp, &mut buf);
    assert_eq!(up, bind);
    assert_eq!(holds.len(), 1);
    insp.resolve(Resolution::Refused(Refusal {
        rule: "updates-need-approval".into(),
        message: "expired".into(),
    }));
    let (up, _) = feed_client(&mut insp, &mut buf);
    assert_eq!(
        up,
        [
            build::parse("gatehouse_refused_t1", "gatehouse_refused_t1"),
            sync
        ]
        .concat()
    );
}
