//! Generated protobuf code for the admin API and the agent tunnel, plus the
//! length-delimited framing used on the tunnel.

#![allow(clippy::all, clippy::unwrap_used, clippy::expect_used)]

pub mod v1 {
    tonic::include_proto!("gatehouse.v1");
}

pub mod tunnel {
    tonic::include_proto!("gatehouse.tunnel.v1");
}

impl tunnel::SessionOpen {
    /// A stream that carries no session: a cancel, an end, a watch, a
    /// policy adoption or a target check.
    pub fn carries_no_session(&self) -> bool {
        self.cancel || self.watch || self.adopt_policy || self.check || !self.end_reason.is_empty()
    }
}

pub mod cluster {
    tonic::include_proto!("gatehouse.cluster.v1");
}

/// ALPN of the enrollment connection.
pub const ALPN_ENROLL: &[u8] = b"gatehouse-enroll/1";
/// ALPN of an enrolled agent's connection.
pub const ALPN_AGENT: &[u8] = b"gatehouse/1";

/// Largest tunnel frame accepted (a batch of audit events stays far below).
pub const MAX_FRAME: usize = 16 << 20;

/// Encodes `msg` as a 4-byte big-endian length followed by its body.
pub fn frame<M: prost::Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a Vec with enough capacity cannot fail.
    let _ = msg.encode(&mut out);
    out
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<M, R>(r: &mut R) -> Result<Option<M>, FrameError>
where
    M: prost::Message + Default,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 4];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(FrameError::Io)?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(FrameError::Decode)
}

/// A tunnel frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    TooLarge(usize),
    Decode(prost::DecodeError),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "tunnel i/o: {e}"),
            Self::TooLarge(n) => write!(f, "tunnel frame of {n} bytes exceeds the limit"),
            Self::Decode(e) => write!(f, "malformed tunnel frame: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

#[cfg(feature = "ssh")]
pub mod ssh;
