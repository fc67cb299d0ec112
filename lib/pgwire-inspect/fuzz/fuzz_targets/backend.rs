//! Arbitrary upstream bytes after a client has opened simple and extended
//! cycles (so results have statements to belong to), in chunks whose size
//! the first byte picks.
#![no_main]

use gatehouse_pgwire_inspect::Side;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A simple query, then Parse/Describe/Bind/Execute/Sync with one binary
/// int4 parameter, then another simple query.
fn client_prelude() -> Vec<u8> {
    let mut c = msg(b'Q', b"select 1\0");
    c.extend(msg(b'P', b"s1\0select $1::int4\0\0\x01\0\0\0\x17"));
    c.extend(msg(b'D', b"Ss1\0"));
    c.extend(msg(b'B', b"\0s1\0\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x07\0\0"));
    c.extend(msg(b'E', b"\0\0\0\0\0"));
    c.extend(msg(b'S', b""));
    c.extend(msg(b'Q', b"select 2; select 3\0"));
    c
}

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let mut f = common::Feed::default();
    if !f.feed(Side::Client, &client_prelude(), 0) {
        return;
    }
    for (t, chunk) in rest.chunks(usize::from(size).max(1)).enumerate() {
        if !f.feed(Side::Upstream, chunk, t as i64) {
            break;
        }
    }
});
