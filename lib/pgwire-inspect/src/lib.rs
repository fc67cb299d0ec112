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

pub use inspector::{Action, InspectError, PgInspector, Protocol, SessionEvent, Side, Statement};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod golden;
