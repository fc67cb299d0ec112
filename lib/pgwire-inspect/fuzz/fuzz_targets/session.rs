//! Both directions interleaved: records of [side, length, bytes...], so the
//! fuzzer can reorder requests and results the way pipelining does.
#![no_main]

use gatehouse_pgwire_inspect::Side;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut f = common::Feed::default();
    let mut rest = data;
    let mut t = 0i64;
    while let [side, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        let side = if side & 1 == 0 { Side::Client } else { Side::Upstream };
        if !f.feed(side, chunk, t) {
            break;
        }
        t += 1;
        rest = next;
    }
});
