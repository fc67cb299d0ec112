//! Arbitrary client bytes, in chunks whose size the first byte picks.
#![no_main]

use gatehouse_pgwire_inspect::Side;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let mut f = common::Feed::default();
    for (t, chunk) in rest.chunks(usize::from(size).max(1)).enumerate() {
        if !f.feed(Side::Client, chunk, t as i64) {
            break;
        }
    }
});
