//! A pure PostgreSQL wire-protocol inspector: bytes in, actions out.
//!
//! The inspector sits after the startup phase (the agent authenticates to the
//! upstream itself). It frames every message in both directions, forwards the
//! bytes unmodified, and decodes with pgwire's message codecs only the
//! messages it inspects (queries, command completions, errors, row
//! descriptions, ready-for-query). Messages it does not inspect — `DataRow`,
//! `CopyData`, and anything it does not know — are streamed through as their
//! bytes arrive, so memory per session stays bounded whatever the result size.
//!
//! It reads no clock and owns no socket: the caller passes the time and
//! performs the [`Action`]s. A partial message means "need more bytes".

pub mod build;
mod framer;
mod inspector;
mod wire;

/// Whether the length at the start of `buf` is one pgwire's frontend decoder
/// may be given: at least 8 for an untyped startup-phase packet (`startup`),
/// at least 4 for a typed message. pgwire 0.42 panics on shorter lengths
/// (a password message of length 0 underflows); callers check first.
/// Incomplete headers are fine (the decoder waits for more bytes).
pub fn frontend_length_ok(buf: &[u8], startup: bool) -> bool {
    let at = usize::from(!startup);
    let Some(len) = buf.get(at..at + 4) else {
        return true;
    };
    let len = i32::from_be_bytes([
        len.first().copied().unwrap_or_default(),
        len.get(1).copied().unwrap_or_default(),
        len.get(2).copied().unwrap_or_default(),
        len.get(3).copied().unwrap_or_default(),
    ]);
    len >= if startup { 8 } else { 4 }
}

pub use inspector::{
    Action, InspectError, Judge, Mask, PgInspector, Protocol, REFUSED_SQLSTATE, Refusal,
    Resolution, Ruling, SessionEvent, Side, Statement, merge_counts,
};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod golden;

/// A whole DataRow message's values (`None` for NULL), bounds-checked.
pub fn data_row_values(msg: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    wire::data_row(msg)
}

/// A whole ErrorResponse's SQLSTATE and message, bounds-checked.
pub fn error_fields(msg: &[u8]) -> Option<(String, String)> {
    wire::error_fields(msg)
}
