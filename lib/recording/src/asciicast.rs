//! Terminal sessions as asciicast v2 (the asciinema format): a header line,
//! then `[seconds, "o"|"i"|"r", data]` lines.

use crate::{Record, RecordEvent};

/// Exports a terminal session's records; other events are skipped. `width`
/// and `height` are the initial window size (a later `WindowSize` becomes
/// an `"r"` event).
pub fn export(started_ms: i64, width: u16, height: u16, records: &[Record]) -> String {
    let header = serde_json::json!({
        "version": 2,
        "width": width,
        "height": height,
        "timestamp": started_ms.div_euclid(1000),
    });
    let mut out = header.to_string();
    out.push('\n');
    for r in records {
        let t = r.t as f64 / 1000.0;
        let ev = match &r.event {
            RecordEvent::TerminalOutput { data, hex, .. } => {
                serde_json::json!([t, "o", text(data, hex)])
            }
            RecordEvent::TerminalInput { data, hex, .. } => {
                serde_json::json!([t, "i", text(data, hex)])
            }
            RecordEvent::WindowSize { cols, rows, .. } => {
                serde_json::json!([t, "r", format!("{cols}x{rows}")])
            }
            _ => continue,
        };
        out.push_str(&ev.to_string());
        out.push('\n');
    }
    out
}

/// asciicast holds text: a chunk that is not UTF-8 is shown with
/// replacement characters.
fn text(data: &str, hex: &str) -> String {
    if hex.is_empty() {
        data.to_string()
    } else {
        String::from_utf8_lossy(&crate::field_bytes(data, hex)).into_owned()
    }
}
