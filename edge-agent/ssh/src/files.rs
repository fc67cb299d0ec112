//! Passive decoding of file transfers on an SSH channel: the SFTP
//! subsystem (version 3, as OpenSSH's `sftp` and `scp` speak it) and the
//! legacy scp protocol (`scp -O`: a remote `scp -t` or `scp -f`). The bytes
//! are relayed unchanged whatever happens here; this only names what moved:
//! opens, reads and writes with their byte counts and, for a file moved
//! from its start without gaps, its SHA-256; renames, removes, directory
//! and attribute changes.
//!
//! Memory is bounded: an SFTP packet is kept until it is whole only up to
//! [`MAX_PACKET`] (OpenSSH sends at most 256 KiB); a longer one stops the
//! decoding of the channel, which is then reported once.

use std::collections::HashMap;

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};

/// The largest SFTP packet decoded.
const MAX_PACKET: usize = 1 << 20;
/// Requests awaiting their answer, at most (a client that never reads its
/// answers does not grow the table without bound).
const MAX_PENDING: usize = 4096;

/// One decoded file operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOp {
    pub op: &'static str,
    pub path: String,
    pub to: Option<String>,
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
}

impl FileOp {
    fn named(op: &'static str, path: String) -> Self {
        Self {
            op,
            path,
            to: None,
            bytes: None,
            sha256: None,
        }
    }
}

/// A channel's decoder.
pub enum Decoder {
    Sftp(Sftp),
    Scp(Scp),
    /// Gave up (a packet over the bound, a protocol it does not follow).
    Stopped,
}

/// Whether an exec line is a remote scp (`scp -t` or `scp -f`).
pub fn is_scp(line: &str) -> bool {
    scp_of(line).is_some()
}

/// The direction, path and whether the path is a directory for certain
/// (`-r`, `-d`) of a remote scp command line.
fn scp_of(line: &str) -> Option<(bool, String, bool)> {
    let cmds = gatehouse_shell::commands(line).ok()?;
    let [c] = cmds.as_slice() else { return None };
    if c.program.rsplit('/').next() != Some("scp") {
        return None;
    }
    let mut sink = None;
    let mut path = None;
    let mut dir = false;
    let mut options = true;
    for a in &c.args {
        let gatehouse_shell::Arg::Literal(a) = a else {
            return None;
        };
        if options && a == "--" {
            options = false;
        } else if options && a.starts_with('-') && a.len() > 1 {
            dir |= a.contains('r') || a.contains('d');
            if a.contains('t') {
                sink = Some(true);
            } else if a.contains('f') {
                sink = Some(false);
            }
        } else {
            path = Some(a.clone());
        }
    }
    Some((sink?, path.unwrap_or_else(|| ".".into()), dir))
}

impl Decoder {
    pub fn sftp(keep_contents: bool) -> Self {
        let _ = keep_contents;
        Decoder::Sftp(Sftp::default())
    }

    /// A decoder for a remote scp command line, or none when it is not one.
    pub fn scp(line: &str, keep_contents: bool) -> Option<Self> {
        let _ = keep_contents;
        let (sink, path, dir) = scp_of(line)?;
        Some(Decoder::Scp(Scp::new(sink, path, dir)))
    }

    /// Bytes the client sent on the channel.
    pub fn client_sent(&mut self, data: &[u8]) -> Vec<FileOp> {
        let r = match self {
            Decoder::Sftp(s) => s.feed(true, data),
            Decoder::Scp(s) if s.sink => s.feed(data),
            _ => Ok(Vec::new()),
        };
        self.settle(r)
    }

    /// Bytes the target sent on the channel.
    pub fn server_sent(&mut self, data: &[u8]) -> Vec<FileOp> {
        let r = match self {
            Decoder::Sftp(s) => s.feed(false, data),
            Decoder::Scp(s) if !s.sink => s.feed(data),
            _ => Ok(Vec::new()),
        };
        self.settle(r)
    }

    /// The channel closed: files still open are reported as they stand.
    pub fn finish(&mut self) -> Vec<FileOp> {
        let out = match self {
            Decoder::Sftp(s) => s.handles.drain().map(|(_, f)| f.done()).collect(),
            Decoder::Scp(s) => s.finish(),
            Decoder::Stopped => Vec::new(),
        };
        *self = Decoder::Stopped;
        out
    }

    fn settle(&mut self, r: Result<Vec<FileOp>, &'static str>) -> Vec<FileOp> {
        match r {
            Ok(ops) => ops,
            Err(why) => {
                *self = Decoder::Stopped;
                vec![FileOp::named("undecoded", why.to_string())]
            }
        }
    }
}

/// One open file: what moved through it.
struct OpenFile {
    path: String,
    read: Moved,
    written: Moved,
}

/// Bytes moved one way, hashed while they come in order from offset 0.
struct Moved {
    bytes: u64,
    next: u64,
    hash: Option<Sha256>,
}

impl Default for Moved {
    fn default() -> Self {
        Self {
            bytes: 0,
            next: 0,
            hash: Some(Sha256::new()),
        }
    }
}

impl Moved {
    fn add(&mut self, offset: u64, data: &[u8]) {
        self.bytes += data.len() as u64;
        if offset == self.next {
            if let Some(h) = self.hash.as_mut() {
                h.update(data);
            }
            self.next += data.len() as u64;
        } else {
            // Out of order or a gap: no hash of the whole file.
            self.hash = None;
        }
    }

    fn sha256(self) -> Option<String> {
        self.hash.map(|h| hex::encode(h.finalize()))
    }
}

impl OpenFile {
    fn new(path: String) -> Self {
        Self {
            path,
            read: Moved::default(),
            written: Moved::default(),
        }
    }

    fn done(self) -> FileOp {
        let (op, moved) = if self.written.bytes > 0 || self.read.bytes == 0 {
            ("write", self.written)
        } else {
            ("read", self.read)
        };
        if op == "write" && moved.bytes == 0 {
            return FileOp::named("open", self.path);
        }
        FileOp {
            op,
            path: self.path,
            to: None,
            bytes: Some(moved.bytes),
            sha256: moved.sha256(),
        }
    }
}

/// What a request waits for.
enum Pending {
    Open(String),
    OpenDir(String),
    Read { handle: Vec<u8>, offset: u64 },
}

/// The SFTP decoder: both directions' packets.
#[derive(Default)]
pub struct Sftp {
    client: Vec<u8>,
    server: Vec<u8>,
    pending: HashMap<u32, Pending>,
    handles: HashMap<Vec<u8>, OpenFile>,
}

const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_SETSTAT: u8 = 9;
const FXP_FSETSTAT: u8 = 10;
const FXP_OPENDIR: u8 = 11;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_RENAME: u8 = 18;
const FXP_SYMLINK: u8 = 20;
const FXP_EXTENDED: u8 = 200;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;

/// A bounds-checked reader of SFTP fields.
struct Fields(Bytes);

impl Fields {
    fn u32(&mut self) -> Option<u32> {
        (self.0.remaining() >= 4).then(|| self.0.get_u32())
    }
    fn u64(&mut self) -> Option<u64> {
        (self.0.remaining() >= 8).then(|| self.0.get_u64())
    }
    fn string(&mut self) -> Option<Bytes> {
        let n = usize::try_from(self.u32()?).ok()?;
        (self.0.remaining() >= n).then(|| self.0.split_to(n))
    }
    fn text(&mut self) -> Option<String> {
        self.string()
            .map(|b| String::from_utf8_lossy(&b).chars().take(4096).collect())
    }
}

impl Sftp {
    fn feed(&mut self, client: bool, data: &[u8]) -> Result<Vec<FileOp>, &'static str> {
        let buf = if client {
            &mut self.client
        } else {
            &mut self.server
        };
        buf.extend_from_slice(data);
        let mut packets = Vec::new();
        let mut at = 0usize;
        while let Some(len) = buf.get(at..at + 4) {
            let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if n == 0 || n > MAX_PACKET {
                return Err("an SFTP packet over the decoder's bound");
            }
            let Some(body) = buf.get(at + 4..at + 4 + n) else {
                break;
            };
            packets.push(Bytes::copy_from_slice(body));
            at += 4 + n;
        }
        buf.drain(..at);
        let mut ops = Vec::new();
        for p in packets {
            if let Some(op) = if client {
                self.request(p)
            } else {
                self.answer(p)
            } {
                ops.push(op);
            }
        }
        if self.pending.len() > MAX_PENDING {
            return Err("too many SFTP requests without an answer");
        }
        Ok(ops)
    }

    /// A client request; named operations are reported as asked (the
    /// recording's later events show whether the session went on).
    fn request(&mut self, p: Bytes) -> Option<FileOp> {
        let mut f = Fields(p);
        let t = *f.0.first()?;
        f.0.advance(1);
        let id = f.u32()?;
        match t {
            FXP_OPEN => {
                let path = f.text()?;
                self.pending.insert(id, Pending::Open(path));
                None
            }
            FXP_OPENDIR => {
                let path = f.text()?;
                self.pending.insert(id, Pending::OpenDir(path));
                None
            }
            FXP_READ => {
                let handle = f.string()?.to_vec();
                let offset = f.u64()?;
                self.pending.insert(id, Pending::Read { handle, offset });
                None
            }
            FXP_WRITE => {
                let handle = f.string()?;
                let offset = f.u64()?;
                let data = f.string()?;
                if let Some(file) = self.handles.get_mut(handle.as_ref()) {
                    file.written.add(offset, &data);
                }
                None
            }
            FXP_CLOSE => {
                let handle = f.string()?;
                self.handles.remove(handle.as_ref()).map(OpenFile::done)
            }
            FXP_REMOVE => Some(FileOp::named("remove", f.text()?)),
            FXP_MKDIR => Some(FileOp::named("mkdir", f.text()?)),
            FXP_RMDIR => Some(FileOp::named("rmdir", f.text()?)),
            FXP_SETSTAT => Some(FileOp::named("setstat", f.text()?)),
            FXP_FSETSTAT => {
                let handle = f.string()?;
                let path = self.handles.get(handle.as_ref())?.path.clone();
                Some(FileOp::named("setstat", path))
            }
            FXP_RENAME | FXP_SYMLINK => {
                let from = f.text()?;
                let to = f.text()?;
                Some(FileOp {
                    to: Some(to),
                    ..FileOp::named(if t == FXP_RENAME { "rename" } else { "symlink" }, from)
                })
            }
            // OpenSSH's extensions that change files.
            FXP_EXTENDED => {
                let name = f.text()?;
                match name.as_str() {
                    "posix-rename@openssh.com" | "hardlink@openssh.com" => {
                        let from = f.text()?;
                        let to = f.text()?;
                        Some(FileOp {
                            to: Some(to),
                            ..FileOp::named(
                                if name.starts_with("posix") {
                                    "rename"
                                } else {
                                    "hardlink"
                                },
                                from,
                            )
                        })
                    }
                    "lsetstat@openssh.com" => Some(FileOp::named("setstat", f.text()?)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    fn answer(&mut self, p: Bytes) -> Option<FileOp> {
        let mut f = Fields(p);
        let t = *f.0.first()?;
        f.0.advance(1);
        let id = f.u32()?;
        match (t, self.pending.remove(&id)?) {
            (FXP_HANDLE, Pending::Open(path)) => {
                let handle = f.string()?.to_vec();
                self.handles.insert(handle, OpenFile::new(path));
                None
            }
            (FXP_HANDLE, Pending::OpenDir(path)) => Some(FileOp::named("list", path)),
            (FXP_DATA, Pending::Read { handle, offset }) => {
                let data = f.string()?;
                if let Some(file) = self.handles.get_mut(&handle) {
                    file.read.add(offset, &data);
                }
                None
            }
            _ => None,
        }
    }
}

/// The legacy scp protocol, one direction: `C`, `D`, `E` and `T` lines
/// and file data, from the side that sends the files.
pub struct Scp {
    /// The target receives (`scp -t`): the client sends the files.
    sink: bool,
    base: String,
    /// The base is a directory the files go in (or come from).
    base_is_dir: bool,
    dirs: Vec<String>,
    state: ScpState,
    line: Vec<u8>,
}

enum ScpState {
    Line,
    Data {
        path: String,
        left: u64,
        size: u64,
        hash: Sha256,
    },
    /// The NUL after a file's data.
    Nul,
}

impl Scp {
    fn new(sink: bool, base: String, base_is_dir: bool) -> Self {
        Self {
            sink,
            base,
            base_is_dir,
            dirs: Vec::new(),
            state: ScpState::Line,
            line: Vec::new(),
        }
    }

    /// Where file `name` of the stream is: under the directories the
    /// stream entered, or the base path itself for a single file (a remote
    /// path names the file, unless it is known to be a directory).
    fn path(&self, name: &str) -> String {
        if self.dirs.is_empty() && !self.base_is_dir {
            return self.base.clone();
        }
        let mut p = self.base.trim_end_matches('/').to_string();
        for d in &self.dirs {
            p = format!("{p}/{d}");
        }
        format!("{p}/{name}")
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<Vec<FileOp>, &'static str> {
        let mut ops = Vec::new();
        while !data.is_empty() {
            match &mut self.state {
                ScpState::Line => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > 8192 {
                            return Err("an scp control line over the decoder's bound");
                        }
                        break;
                    };
                    self.line
                        .extend_from_slice(data.get(..nl).unwrap_or_default());
                    data = data.get(nl + 1..).unwrap_or_default();
                    let line =
                        String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
                    // Acknowledgements (NUL, or an error byte and text)
                    // interleave with control lines on the sender's side.
                    let line = line.trim_start_matches('\0');
                    if let Some(rest) = line.strip_prefix('C') {
                        let mut it = rest.splitn(3, ' ');
                        let (_mode, size, name) = (it.next(), it.next(), it.next());
                        let size: u64 = size
                            .and_then(|s| s.parse().ok())
                            .ok_or("a bad scp C line")?;
                        let name = name.unwrap_or_default().to_string();
                        let path = self.path(&name);
                        self.state = if size == 0 {
                            ops.push(FileOp {
                                op: if self.sink { "write" } else { "read" },
                                path,
                                to: None,
                                bytes: Some(0),
                                sha256: Some(hex::encode(Sha256::digest([]))),
                            });
                            ScpState::Nul
                        } else {
                            ScpState::Data {
                                path,
                                left: size,
                                size,
                                hash: Sha256::new(),
                            }
                        };
                    } else if let Some(rest) = line.strip_prefix('D') {
                        let name = rest.splitn(3, ' ').nth(2).unwrap_or_default().to_string();
                        if self.sink {
                            ops.push(FileOp::named("mkdir", self.path(&name)));
                        }
                        self.dirs.push(name);
                    } else if line.starts_with('E') {
                        self.dirs.pop();
                    }
                    // `T` (times) and anything else: nothing to report.
                }
                ScpState::Data {
                    path,
                    left,
                    size,
                    hash,
                } => {
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    hash.update(data.get(..n).unwrap_or_default());
                    *left -= n as u64;
                    data = data.get(n..).unwrap_or_default();
                    if *left == 0 {
                        let h = std::mem::replace(hash, Sha256::new());
                        ops.push(FileOp {
                            op: if self.sink { "write" } else { "read" },
                            path: std::mem::take(path),
                            to: None,
                            bytes: Some(*size),
                            sha256: Some(hex::encode(h.finalize())),
                        });
                        self.state = ScpState::Nul;
                    }
                }
                ScpState::Nul => {
                    data = data.get(1..).unwrap_or_default();
                    self.state = ScpState::Line;
                }
            }
        }
        Ok(ops)
    }

    fn finish(&mut self) -> Vec<FileOp> {
        match std::mem::replace(&mut self.state, ScpState::Line) {
            ScpState::Data {
                path, left, size, ..
            } => vec![FileOp {
                op: "incomplete",
                path,
                to: None,
                bytes: Some(size - left),
                sha256: None,
            }],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn packet(t: u8, body: &[u8]) -> Vec<u8> {
        let mut p = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(t);
        p.extend_from_slice(body);
        p
    }

    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn sftp_upload_is_named_with_size_and_hash_in_any_chunking() {
        let mut client = Vec::new();
        let mut open = 1u32.to_be_bytes().to_vec();
        open.extend(s(b"/tmp/up.bin"));
        open.extend([0, 0, 0, 0x1a, 0, 0, 0, 0]);
        client.extend(packet(FXP_OPEN, &open));
        let mut server = Vec::new();
        let mut h = 1u32.to_be_bytes().to_vec();
        h.extend(s(b"\0\0\0\x07"));
        server.extend(packet(FXP_HANDLE, &h));
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = Vec::new();
        for (i, chunk) in content.chunks(32768).enumerate() {
            let mut b = (2 + i as u32).to_be_bytes().to_vec();
            b.extend(s(b"\0\0\0\x07"));
            b.extend(((i * 32768) as u64).to_be_bytes());
            b.extend(s(chunk));
            w.extend(packet(FXP_WRITE, &b));
        }
        let mut close = 9u32.to_be_bytes().to_vec();
        close.extend(s(b"\0\0\0\x07"));
        w.extend(packet(FXP_CLOSE, &close));
        for step in [1usize, 7, 4096, usize::MAX] {
            let mut d = Decoder::sftp(false);
            let mut ops = Vec::new();
            for c in client.chunks(step.min(client.len())) {
                ops.extend(d.client_sent(c));
            }
            ops.extend(d.server_sent(&server));
            for c in w.chunks(step.min(w.len())) {
                ops.extend(d.client_sent(c));
            }
            assert_eq!(
                ops,
                vec![FileOp {
                    op: "write",
                    path: "/tmp/up.bin".into(),
                    to: None,
                    bytes: Some(100_000),
                    sha256: Some(hex::encode(Sha256::digest(&content))),
                }],
                "chunks of {step}"
            );
        }
    }

    #[test]
    fn an_oversized_sftp_packet_stops_decoding_once() {
        let mut d = Decoder::sftp(false);
        let ops = d.client_sent(&[0x7f, 0, 0, 0, 3]);
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].op, "undecoded");
        assert!(d.client_sent(&[0; 64]).is_empty());
    }

    #[test]
    fn scp_sink_files_and_directories() {
        let mut d = Decoder::scp("scp -r -t -- /srv/in", false).unwrap();
        let mut ops = d.client_sent(b"D0755 0 sub\nC0644 5 a.txt\nhello\0E\n");
        ops.extend(d.finish());
        assert_eq!(ops[0], FileOp::named("mkdir", "/srv/in/sub".into()));
        assert_eq!(ops[1].path, "/srv/in/sub/a.txt");
        assert_eq!(ops[1].bytes, Some(5));
        assert_eq!(ops[1].sha256, Some(hex::encode(Sha256::digest(b"hello"))));
        assert!(Decoder::scp("ls -t", false).is_none());
        assert!(is_scp("scp -f /etc/hosts"));
    }
}
