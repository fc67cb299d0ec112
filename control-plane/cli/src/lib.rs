//! The `gatehouse` CLI: its commands (one module per command group), the
//! API client, output helpers, and the local development deployment
//! (`gatehouse dev`), shared with the end-to-end tests.

pub mod client;
pub mod commands;
pub mod dev;
pub mod output;
pub mod postgres;
pub mod sshd;
