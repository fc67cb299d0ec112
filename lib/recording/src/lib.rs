//! The session recording format, version 1.
//!
//! A recording is a sequence of JSON lines. The first line is a
//! [`Header`]; every following line is a [`Record`]: an offset in
//! milliseconds from the session start and one [`RecordEvent`]. The object's
//! SHA-256 is committed to the sessions index, so a recording that changed
//! after upload no longer matches.

pub mod asciicast;
pub mod chunked;
#[cfg(feature = "store")]
pub mod store;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Current format version, written in every header.
pub const FORMAT_VERSION: u32 = 1;

/// First line of a recording.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub session_id: String,
    pub identity: String,
    pub target: String,
    pub agent: String,
    pub database: String,
    pub db_user: String,
    pub policy_version: String,
    pub started_ms: i64,
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RecordEvent {
    Query {
        text: String,
    },
    Parse {
        name: String,
        text: String,
    },
    RowDescription {
        columns: Vec<String>,
    },
    CommandComplete {
        tag: String,
    },
    Error {
        code: String,
        message: String,
    },
    StatementDone {
        statements: Vec<String>,
        rows: u64,
        /// Values masked in the cycle's results, per detector.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        masked: std::collections::BTreeMap<String, u64>,
    },
    /// The parameters a prepared statement ran with (extended protocol),
    /// rendered as text and masked like result values.
    Parameters {
        statement: String,
        values: Vec<Option<String>>,
    },
    End {
        reason: String,
    },
    /// Result values as delivered to the client (that is, masked).
    Row {
        values: Vec<Option<String>>,
    },
    Notice {
        code: String,
        message: String,
    },
    /// A guardrail's decision on a statement.
    Decision {
        statement: String,
        action: String,
        rule: String,
    },
    /// Terminal sessions: what the user saw and typed, and window sizes,
    /// per SSH channel. Bytes that are UTF-8 are in `data`; any other
    /// chunk is in `hex`, so a replay reproduces the bytes exactly.
    TerminalOutput {
        #[serde(default)]
        channel: u32,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        data: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        hex: String,
    },
    TerminalInput {
        #[serde(default)]
        channel: u32,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        data: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        hex: String,
    },
    WindowSize {
        #[serde(default)]
        channel: u32,
        cols: u16,
        rows: u16,
    },
    /// An SSH channel opened: `session`, or a forward with where to.
    ChannelOpen {
        channel: u32,
        kind: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
    /// A request on an SSH channel (pty, shell, exec, subsystem, env,
    /// signal) and what was decided: `allow`, `deny` (with the rule) or
    /// `approve` (held for approval).
    ChannelRequest {
        channel: u32,
        request: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
        decision: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        rule: String,
    },
    /// Output of a command without a terminal (`stderr` for extended
    /// data), as the client received it, up to the policy's cap per channel.
    CommandOutput {
        channel: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stderr: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        data: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        hex: String,
    },
    /// The channel's output passed its recording cap: later bytes are
    /// counted in `ChannelClose`, not recorded.
    OutputCapped {
        channel: u32,
        cap_bytes: u64,
    },
    /// How a command on the channel ended.
    Exit {
        channel: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    /// A file operation over SFTP or scp.
    FileOp {
        channel: u32,
        op: String,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// An SSH channel closed, with the bytes each way.
    ChannelClose {
        channel: u32,
        bytes_in: u64,
        bytes_out: u64,
    },
    /// Kubernetes API requests.
    KubeRequest {
        verb: String,
        path: String,
        status: u16,
    },
}

/// Bytes as a recording keeps them: UTF-8 text in the first field, any
/// other chunk hex-encoded in the second.
pub fn bytes_fields(b: &[u8]) -> (String, String) {
    match std::str::from_utf8(b) {
        Ok(s) => (s.to_string(), String::new()),
        Err(_) => (String::new(), hex::encode(b)),
    }
}

/// The bytes a terminal or output event holds (see [`bytes_fields`]).
pub fn field_bytes(data: &str, hex_data: &str) -> Vec<u8> {
    if hex_data.is_empty() {
        data.as_bytes().to_vec()
    } else {
        hex::decode(hex_data).unwrap_or_default()
    }
}

/// A line after the header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Milliseconds since the session started.
    pub t: i64,
    #[serde(flatten)]
    pub event: RecordEvent,
}

/// A recording that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("recording is empty")]
    Empty,
    #[error("line {line}: {source}")]
    Line {
        line: usize,
        source: serde_json::Error,
    },
}

/// Encodes one line (with its trailing newline).
pub fn line<T: Serialize>(value: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(value).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Parses a whole recording.
pub fn parse(data: &[u8]) -> Result<(Header, Vec<Record>), ParseError> {
    let mut lines = data.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let first = lines.next().ok_or(ParseError::Empty)?;
    let header =
        serde_json::from_slice(first).map_err(|source| ParseError::Line { line: 1, source })?;
    let mut records = Vec::new();
    for (i, l) in lines.enumerate() {
        records.push(
            serde_json::from_slice(l).map_err(|source| ParseError::Line {
                line: i + 2,
                source,
            })?,
        );
    }
    Ok((header, records))
}

/// Lowercase hex SHA-256 of a recording object.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header {
            format: "gatehouse-recording".into(),
            version: FORMAT_VERSION,
            session_id: "s".into(),
            identity: "sa:a".into(),
            target: "t".into(),
            agent: "a".into(),
            database: "d".into(),
            db_user: "u".into(),
            policy_version: "p".into(),
            started_ms: 1,
        };
        let r = Record {
            t: 5,
            event: RecordEvent::Query {
                text: "select 1".into(),
            },
        };
        let mut data = line(&h);
        data.extend(line(&r));
        assert_eq!(
            String::from_utf8(line(&r)).unwrap(),
            "{\"t\":5,\"type\":\"query\",\"text\":\"select 1\"}\n"
        );
        assert_eq!(parse(&data).unwrap(), (h, vec![r]));
        assert!(matches!(
            parse(b"{}\n"),
            Err(ParseError::Line { line: 1, .. })
        ));
    }
}
