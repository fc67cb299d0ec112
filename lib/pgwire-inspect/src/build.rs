//! Encoders for the few messages the gateway itself originates, through
//! pgwire's codecs: errors it raises, and the authentication exchanges on
//! each side of the gateway.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{
    Authentication, BackendKeyData, Password, SASLInitialResponse, SASLResponse, SecretKey,
    SslRequest, Startup,
};

/// Severity of an error the gateway raises.
#[derive(Clone, Copy, Debug)]
pub enum Severity {
    /// The statement fails; the session continues.
    Error,
    /// The session ends.
    Fatal,
}

fn encode(m: &impl Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    // Encoding only fails for messages over pgwire's size limits; none of
    // ours come near them, and an empty result is caught by the peer.
    let _ = m.encode(&mut b);
    b.to_vec()
}

/// An ErrorResponse with SQLSTATE `code` and `message`.
pub fn error_response(severity: Severity, code: &str, message: &str) -> Vec<u8> {
    let s = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    encode(&ErrorResponse::new(vec![
        (b'S', s.to_string()),
        (b'V', s.to_string()),
        (b'C', code.to_string()),
        (b'M', message.to_string()),
    ]))
}

/// A DataRow with `values` (`None` for NULL).
pub fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
    let body: usize = 2 + values
        .iter()
        .map(|v| 4 + v.map_or(0, <[u8]>::len))
        .sum::<usize>();
    let mut out = Vec::with_capacity(1 + 4 + body);
    out.push(b'D');
    out.extend_from_slice(&(u32::try_from(body + 4).unwrap_or(u32::MAX)).to_be_bytes());
    out.extend_from_slice(&(u16::try_from(values.len()).unwrap_or(u16::MAX)).to_be_bytes());
    for v in values {
        match v {
            Some(v) => {
                out.extend_from_slice(&(u32::try_from(v.len()).unwrap_or(u32::MAX)).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out
}

/// A CopyData message.
pub fn copy_data(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(b'd');
    out.extend_from_slice(&(u32::try_from(data.len() + 4).unwrap_or(u32::MAX)).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A simple Query message.
pub fn query(text: &str) -> Vec<u8> {
    encode(&pgwire::messages::simplequery::Query::new(text.to_string()))
}

/// A Parse message with no declared parameter types.
pub fn parse(name: &str, text: &str) -> Vec<u8> {
    encode(&pgwire::messages::extendedquery::Parse::new(
        (!name.is_empty()).then(|| name.to_string()),
        text.to_string(),
        Vec::new(),
    ))
}

pub fn authentication_ok() -> Vec<u8> {
    encode(&Authentication::Ok)
}

pub fn authentication_cleartext() -> Vec<u8> {
    encode(&Authentication::CleartextPassword)
}

/// A protocol 3.0 StartupMessage.
pub fn startup(params: &BTreeMap<String, String>) -> Vec<u8> {
    let mut s = Startup::new();
    s.parameters = params.clone();
    encode(&s)
}

pub fn password(pw: &str) -> Vec<u8> {
    encode(&Password::new(pw.to_string()))
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    encode(&SASLInitialResponse::new(
        mechanism.to_string(),
        Some(Bytes::copy_from_slice(data)),
    ))
}

pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    encode(&SASLResponse::new(Bytes::copy_from_slice(data)))
}

/// The BackendKeyData a client is given.
pub fn backend_key_data(pid: i32, secret: i32) -> Vec<u8> {
    encode(&BackendKeyData::new(pid, SecretKey::I32(secret)))
}

/// A CancelRequest for the backend `pid` with its `secret` as it was sent.
pub fn cancel_request(pid: i32, secret: &[u8]) -> Vec<u8> {
    encode(&CancelRequest::new(
        pid,
        SecretKey::Bytes(Bytes::copy_from_slice(secret)),
    ))
}

/// An SSLRequest.
pub fn ssl_request() -> Vec<u8> {
    encode(&SslRequest::new())
}
