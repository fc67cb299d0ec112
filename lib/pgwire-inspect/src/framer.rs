//! Splits a byte stream into PostgreSQL messages without buffering the ones
//! nobody needs to look at.

use bytes::BytesMut;

/// Largest message the inspector buffers to decode. Larger inspected messages
/// are a protocol violation for our purposes (PostgreSQL's own limit for a
/// query string is 1 GiB, but no legitimate client sends a 64 MiB query).
pub(crate) const MAX_INSPECTED_LEN: usize = 64 << 20;

/// One step of framing.
pub(crate) enum Frame {
    /// Need more bytes.
    Incomplete,
    /// A whole message to inspect occupies `buf[pos..pos + len]`.
    Whole { ty: u8, len: usize },
    /// `n` bytes at `pos` pass through uninspected.
    Pass(usize),
}

/// Framing state for one direction.
#[derive(Default)]
pub(crate) struct Framer {
    /// Bytes of an uninspected message still to pass through.
    skip: usize,
}

#[derive(Debug)]
pub(crate) enum FrameError {
    BadLength(i32),
    TooLarge(u8, usize),
}

// === impl Framer ===

impl Framer {
    /// Looks at `buf[pos..]`; `inspect(ty)` says whether a message type must
    /// be decoded whole.
    pub(crate) fn next(
        &mut self,
        buf: &BytesMut,
        pos: usize,
        inspect: impl Fn(u8) -> bool,
    ) -> Result<Frame, FrameError> {
        let avail = buf.len().saturating_sub(pos);
        if self.skip > 0 {
            if avail == 0 {
                return Ok(Frame::Incomplete);
            }
            let n = self.skip.min(avail);
            self.skip -= n;
            return Ok(Frame::Pass(n));
        }
        let Some(header) = buf.get(pos..pos + 5) else {
            return Ok(Frame::Incomplete);
        };
        let ty = header.first().copied().unwrap_or_default();
        let raw_len = i32::from_be_bytes([
            header.get(1).copied().unwrap_or_default(),
            header.get(2).copied().unwrap_or_default(),
            header.get(3).copied().unwrap_or_default(),
            header.get(4).copied().unwrap_or_default(),
        ]);
        if raw_len < 4 {
            return Err(FrameError::BadLength(raw_len));
        }
        let total = 1 + raw_len as usize;
        if !inspect(ty) {
            self.skip = total;
            return self.next(buf, pos, inspect);
        }
        if total > MAX_INSPECTED_LEN {
            return Err(FrameError::TooLarge(ty, total));
        }
        if avail < total {
            return Ok(Frame::Incomplete);
        }
        Ok(Frame::Whole { ty, len: total })
    }
}
