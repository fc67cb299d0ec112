// Shared by the fuzz targets: feed bytes and check the inspector's one
// promise besides not panicking: what it forwards is exactly what it was
// given, in order, and what it keeps is an unconsumed tail.

use bytes::BytesMut;
use gatehouse_pgwire_inspect::{Action, PgInspector, Side};

#[derive(Default)]
pub struct Feed {
    pub insp: PgInspector,
    given: [Vec<u8>; 2],
    forwarded: [Vec<u8>; 2],
    bufs: [BytesMut; 2],
    failed: bool,
}

impl Feed {
    /// Feeds `bytes` from `side`; false once the inspector has refused the
    /// stream (the session would end there).
    pub fn feed(&mut self, side: Side, bytes: &[u8], now: i64) -> bool {
        if self.failed {
            return false;
        }
        // As the agent runs it: rows and notices become events.
        self.insp.record_rows(true);
        let i = side as usize;
        self.given[i].extend_from_slice(bytes);
        self.bufs[i].extend_from_slice(bytes);
        let mut out = Vec::new();
        let r = match side {
            Side::Client => self.insp.on_client(&mut self.bufs[i], now, &mut out),
            Side::Upstream => self.insp.on_upstream(&mut self.bufs[i], now, &mut out),
        };
        for a in out {
            match a {
                Action::ToUpstream(b) => self.forwarded[0].extend_from_slice(&b),
                Action::ToClient(b) => self.forwarded[1].extend_from_slice(&b),
                Action::Event { .. } | Action::Hold { .. } => {}
            }
        }
        for j in 0..2 {
            let mut whole = self.forwarded[j].clone();
            whole.extend_from_slice(&self.bufs[j]);
            assert_eq!(whole, self.given[j], "bytes changed, lost or reordered");
        }
        if r.is_err() {
            self.failed = true;
        }
        !self.failed
    }
}
