//! Both directions interleaved, with a judge that refuses some statements
//! and holds others (resolved alternately approved and refused), and a
//! masker that rewrites some values: no panic, and what is forwarded each
//! way is still a well-framed sequence of messages (rewritten messages carry
//! correct lengths).
#![no_main]

use bytes::BytesMut;
use gatehouse_pgwire_inspect::{Action, Judge, Mask, PgInspector, Refusal, Resolution, Ruling, Side};
use libfuzzer_sys::fuzz_target;

struct RefuseX;

impl Judge for RefuseX {
    fn judge(&mut self, text: &str, _at_ms: i64) -> Ruling {
        let r = Refusal {
            rule: "x".into(),
            message: "no X".into(),
        };
        if text.contains('X') {
            Ruling::Refuse(r)
        } else if text.contains('H') {
            Ruling::Hold(r)
        } else {
            Ruling::Allow
        }
    }
}

/// Masks the digits of values that contain '@'; whole columns named "s".
struct MaskAt;

impl Mask for MaskAt {
    fn mask_values(&mut self, values: &[&[u8]]) -> Vec<(usize, Vec<u8>)> {
        values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.contains(&b'@'))
            .map(|(i, v)| {
                let masked = v.iter().map(|b| if b.is_ascii_digit() { b'*' } else { *b });
                (i, masked.chain(*b"+").collect())
            })
            .collect()
    }
    fn mask_copy(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        data.contains(&b'@').then(|| data.iter().map(|b| if b.is_ascii_digit() { b'*' } else { *b }).collect())
    }
    fn whole_column(&self, _table_oid: u32, name: &str) -> bool {
        name == "s"
    }
    fn mask_whole(&mut self, value: &[u8]) -> Vec<u8> {
        vec![b'*'; value.len()]
    }
    fn take_counts(&mut self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut insp = PgInspector::with_judge(Box::new(RefuseX), "f1");
    insp.set_mask(Box::new(MaskAt));
    insp.record_rows(true);
    let mut bufs = [BytesMut::new(), BytesMut::new()];
    let mut forwarded = [Vec::new(), Vec::new()];
    let mut rest = data;
    let mut t = 0i64;
    let mut holds = 0u32;
    while let [side, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        let side = if side & 1 == 0 { Side::Client } else { Side::Upstream };
        let i = side as usize;
        bufs[i].extend_from_slice(chunk);
        // A hold is resolved and the same buffer fed again, as the agent
        // does; at most a few rounds per chunk.
        for _ in 0..4 {
            let mut out = Vec::new();
            let r = match side {
                Side::Client => insp.on_client(&mut bufs[i], t, &mut out),
                Side::Upstream => insp.on_upstream(&mut bufs[i], t, &mut out),
            };
            let mut held = false;
            for a in out {
                match a {
                    Action::ToUpstream(b) => forwarded[0].extend_from_slice(&b),
                    Action::ToClient(b) => forwarded[1].extend_from_slice(&b),
                    Action::Event { .. } => {}
                    Action::Hold { refusal, .. } => {
                        held = true;
                        holds += 1;
                        insp.resolve(if holds % 2 == 0 {
                            Resolution::Approved
                        } else {
                            Resolution::Refused(refusal)
                        });
                    }
                }
            }
            if r.is_err() {
                return;
            }
            if !held {
                break;
            }
        }
        t += 1;
        rest = next;
    }
    // Messages are forwarded whole or passed through as they arrive; when
    // the input ends on a message boundary, so does the output.
    for i in 0..2 {
        if bufs[i].is_empty() && starts_with_header(&forwarded[i]) {
            well_framed_prefix(&forwarded[i]);
        }
    }
});

fn starts_with_header(b: &[u8]) -> bool {
    b.len() >= 5
}

/// Like `well_framed`, but a final message may be a pass-through one still
/// arriving.
fn well_framed_prefix(mut b: &[u8]) {
    while b.len() >= 5 {
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]);
        assert!(len >= 4, "bad length {len}");
        let total = 1 + len as usize;
        if b.len() < total {
            return;
        }
        b = &b[total..];
    }
}
