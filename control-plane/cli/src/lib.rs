//! Library side of the `gatehouse` CLI: the API client and the local
//! development deployment (`gatehouse dev`), shared with the end-to-end tests.

pub mod client;
pub mod dev;
pub mod postgres;
