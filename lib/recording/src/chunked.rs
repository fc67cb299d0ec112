//! Recording format version 2: chunked, compressed, hash-chained, signed.
//!
//! A session's events are JSON lines (the same [`Record`]s as version 1),
//! cut into chunks of about [`CHUNK_TARGET`] bytes before compression. Each
//! chunk object is zstd-compressed bytes of:
//!
//! ```text
//! {"format":"gatehouse-recording-chunk","version":2,"session_id":…,"index":N,"prev_sha256":…}\n
//! <record line>\n
//! …
//! ```
//!
//! `prev_sha256` is the SHA-256 of the previous chunk object (empty for the
//! first), so chunks cannot be reordered, dropped or replaced without the
//! chain breaking. The [`Manifest`] lists every chunk's SHA-256, size and
//! event count with the session's metadata and end reason, and is signed
//! with the agent's key (ECDSA P-256, SHA-256, ASN.1 signature over the
//! manifest's canonical JSON without its signature).
//!
//! Pure: bytes in, bytes out; the caller writes, fsyncs and uploads.

use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Record, sha256_hex};

/// Version of the chunked format.
pub const CHUNKED_VERSION: u32 = 2;
/// Uncompressed bytes a chunk holds before it is cut.
pub const CHUNK_TARGET: usize = 4 << 20;
/// zstd level: fast, and still several times smaller for SQL and rows.
const ZSTD_LEVEL: i32 = 3;

const CHUNK_FORMAT: &str = "gatehouse-recording-chunk";
const MANIFEST_FORMAT: &str = "gatehouse-recording-manifest";

/// First line of a chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ChunkHeader {
    format: String,
    version: u32,
    session_id: String,
    index: u32,
    prev_sha256: String,
}

/// A sealed chunk, ready to be spooled and uploaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub index: u32,
    /// The compressed object.
    pub bytes: Vec<u8>,
    pub sha256: String,
    pub events: u64,
}

/// One chunk as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub index: u32,
    pub sha256: String,
    pub size: u64,
    pub events: u64,
}

/// What a session's recording is: signed by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    #[serde(flatten)]
    pub session: SessionMeta,
    pub ended_ms: i64,
    /// Why it ended ("client disconnected", "agent restarted", …).
    pub end_reason: String,
    pub chunks: Vec<ChunkRef>,
    /// Hex ECDSA signature over [`Manifest::signed_bytes`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

/// Session metadata for the manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    pub session_id: String,
    pub identity: String,
    pub target: String,
    pub agent: String,
    pub policy_version: String,
    pub started_ms: i64,
    #[serde(default)]
    pub database: String,
    #[serde(default)]
    pub db_user: String,
}

/// Object key of a session's chunk `index` under `prefix/target/session`.
pub fn chunk_key(target: &str, session_id: &str, index: u32) -> String {
    format!("recordings/{target}/{session_id}/chunk-{index:06}.zst")
}

/// Object key of a session's manifest.
pub fn manifest_key(target: &str, session_id: &str) -> String {
    format!("recordings/{target}/{session_id}/manifest.json")
}

/// Cuts a session's records into chained chunks.
pub struct ChunkWriter {
    session_id: String,
    index: u32,
    prev_sha256: String,
    buf: Vec<u8>,
    events: u64,
    target: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("compression failed: {0}")]
    Compress(String),
    #[error("chunk {index}: {message}")]
    Chunk { index: u32, message: String },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("signature: {0}")]
    Signature(String),
}

impl ChunkWriter {
    pub fn new(session_id: &str) -> Self {
        Self::with_target(session_id, CHUNK_TARGET)
    }

    /// A writer cutting chunks at `target` uncompressed bytes (tests use
    /// small ones).
    pub fn with_target(session_id: &str, target: usize) -> Self {
        Self {
            session_id: session_id.to_string(),
            index: 0,
            prev_sha256: String::new(),
            buf: Vec::new(),
            events: 0,
            target: target.max(1),
        }
    }

    /// A writer that carries on a chain after chunk `index - 1`, whose
    /// object hashed to `prev_sha256` (recovery after a restart).
    pub fn resume(session_id: &str, index: u32, prev_sha256: &str) -> Self {
        let mut w = Self::new(session_id);
        w.index = index;
        w.prev_sha256 = prev_sha256.to_string();
        w
    }

    /// Adds a record; returns a sealed chunk when this one filled it.
    pub fn push(&mut self, r: &Record) -> Result<Option<Chunk>, FormatError> {
        let line = serde_json::to_vec(r).map_err(|e| FormatError::Compress(e.to_string()))?;
        self.push_line(&line)
    }

    /// Adds a record already encoded as one JSON line (without its
    /// newline); returns a sealed chunk when this one filled it.
    pub fn push_line(&mut self, line: &[u8]) -> Result<Option<Chunk>, FormatError> {
        self.buf.extend_from_slice(line);
        self.buf.push(b'\n');
        self.events += 1;
        if self.buf.len() >= self.target {
            return self.seal().map(Some);
        }
        Ok(None)
    }

    /// Whether adding a line of `len` bytes seals a chunk.
    pub fn would_seal(&self, len: usize) -> bool {
        self.buf.len() + len + 1 >= self.target
    }

    /// Index the next sealed chunk gets.
    pub fn next_index(&self) -> u32 {
        self.index
    }

    /// Seals what is buffered (if anything) as the last chunk.
    pub fn finish(&mut self) -> Result<Option<Chunk>, FormatError> {
        if self.events == 0 {
            return Ok(None);
        }
        self.seal().map(Some)
    }

    fn seal(&mut self) -> Result<Chunk, FormatError> {
        let header = ChunkHeader {
            format: CHUNK_FORMAT.into(),
            version: CHUNKED_VERSION,
            session_id: self.session_id.clone(),
            index: self.index,
            prev_sha256: self.prev_sha256.clone(),
        };
        let mut plain =
            serde_json::to_vec(&header).map_err(|e| FormatError::Compress(e.to_string()))?;
        plain.push(b'\n');
        plain.append(&mut self.buf);
        let bytes = zstd::bulk::compress(&plain, ZSTD_LEVEL)
            .map_err(|e| FormatError::Compress(e.to_string()))?;
        let sha256 = sha256_hex(&bytes);
        let chunk = Chunk {
            index: self.index,
            bytes,
            sha256: sha256.clone(),
            events: self.events,
        };
        self.index += 1;
        self.prev_sha256 = sha256;
        self.events = 0;
        Ok(chunk)
    }
}

impl Chunk {
    pub fn to_ref(&self) -> ChunkRef {
        ChunkRef {
            index: self.index,
            sha256: self.sha256.clone(),
            size: self.bytes.len() as u64,
            events: self.events,
        }
    }
}

/// Largest uncompressed chunk a reader accepts (a hostile object cannot
/// make it allocate more).
const MAX_PLAIN: usize = 64 << 20;

/// Reads one chunk object: checks its header (session, index, previous
/// hash) and returns its records.
pub fn read_chunk(
    bytes: &[u8],
    session_id: &str,
    index: u32,
    prev_sha256: &str,
) -> Result<Vec<Record>, FormatError> {
    let err = |message: String| FormatError::Chunk { index, message };
    let plain =
        zstd::bulk::decompress(bytes, MAX_PLAIN).map_err(|e| err(format!("not zstd: {e}")))?;
    let mut lines = plain.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let header: ChunkHeader = serde_json::from_slice(lines.next().unwrap_or_default())
        .map_err(|e| err(format!("bad header: {e}")))?;
    if header.format != CHUNK_FORMAT || header.version != CHUNKED_VERSION {
        return Err(err(format!(
            "format {} version {}",
            header.format, header.version
        )));
    }
    if header.session_id != session_id || header.index != index {
        return Err(err(format!(
            "belongs to session {} as chunk {}",
            header.session_id, header.index
        )));
    }
    if header.prev_sha256 != prev_sha256 {
        return Err(err("does not follow the previous chunk".into()));
    }
    lines
        .map(|l| serde_json::from_slice(l).map_err(|e| err(format!("bad record: {e}"))))
        .collect()
}

impl Manifest {
    pub fn new(meta: &SessionMeta, chunks: Vec<ChunkRef>, ended_ms: i64, end_reason: &str) -> Self {
        Self {
            format: MANIFEST_FORMAT.into(),
            version: CHUNKED_VERSION,
            session: meta.clone(),
            ended_ms,
            end_reason: end_reason.to_string(),
            chunks,
            signature: String::new(),
        }
    }

    /// What the signature covers: the canonical JSON without it.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }

    /// Signs with the agent's key (PKCS#8 DER, ECDSA P-256).
    pub fn sign(&mut self, pkcs8_der: &[u8]) -> Result<(), FormatError> {
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8_der)
            .map_err(|e| FormatError::Signature(e.to_string()))?;
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = key
            .sign(&rng, &self.signed_bytes())
            .map_err(|e| FormatError::Signature(e.to_string()))?;
        self.signature = hex::encode(sig.as_ref());
        Ok(())
    }

    /// Checks the signature against the agent's public key (uncompressed
    /// SEC1 point, as in its certificate's SubjectPublicKeyInfo).
    pub fn verify(&self, public_key: &[u8]) -> Result<(), FormatError> {
        let sig =
            hex::decode(&self.signature).map_err(|e| FormatError::Signature(e.to_string()))?;
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, public_key)
            .verify(&self.signed_bytes(), &sig)
            .map_err(|_| FormatError::Signature("does not match the agent's key".into()))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, FormatError> {
        let m: Manifest =
            serde_json::from_slice(b).map_err(|e| FormatError::Manifest(e.to_string()))?;
        if m.format != MANIFEST_FORMAT || m.version != CHUNKED_VERSION {
            return Err(FormatError::Manifest(format!(
                "format {} version {}",
                m.format, m.version
            )));
        }
        Ok(m)
    }

    /// SHA-256 of the manifest object (what the sessions index commits).
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.to_bytes()))
    }
}

/// The public key of a PKCS#8 ECDSA P-256 key (for tests and the agent's
/// own checks).
pub fn public_key(pkcs8_der: &[u8]) -> Result<Vec<u8>, FormatError> {
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8_der)
        .map_err(|e| FormatError::Signature(e.to_string()))?;
    Ok(key.public_key().as_ref().to_vec())
}

/// Checks a whole recording: every chunk the manifest lists, in order, by
/// its hash and its place in the chain, and the signature. `fetch(i)`
/// returns chunk `i`'s object, or `None` when it is missing. Returns the
/// records, or the first problem, naming the chunk.
pub fn verify_recording(
    manifest: &Manifest,
    public_key: &[u8],
    fetch: impl FnMut(u32) -> Option<Vec<u8>>,
) -> Result<Vec<Record>, FormatError> {
    let mut v = check_recording(manifest, public_key, fetch);
    match v.problems.is_empty() {
        true => Ok(v.records),
        false => Err(v.problems.swap_remove(0)),
    }
}

/// Everything a check of one recording found.
#[derive(Debug, Default)]
pub struct Verification {
    /// Records of the chunks that verified, in order.
    pub records: Vec<Record>,
    /// Every problem, each naming the manifest or a chunk.
    pub problems: Vec<FormatError>,
}

/// Like [`verify_recording`], but carries on past a bad chunk (the next one
/// is checked against the hash the manifest lists) and reports every
/// problem.
pub fn check_recording(
    manifest: &Manifest,
    public_key: &[u8],
    mut fetch: impl FnMut(u32) -> Option<Vec<u8>>,
) -> Verification {
    let mut check = ChainCheck::new(manifest, public_key);
    let mut records = Vec::new();
    for i in 0..manifest.chunks.len() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        records.extend(check.chunk(index, fetch(index).as_deref()));
    }
    Verification {
        records,
        problems: check.problems,
    }
}

/// Checks a recording one chunk at a time, so a reader holds one chunk in
/// memory: first the manifest's signature, then each chunk in order.
pub struct ChainCheck<'a> {
    manifest: &'a Manifest,
    prev: String,
    /// Every problem so far, each naming the manifest or a chunk.
    pub problems: Vec<FormatError>,
}

impl<'a> ChainCheck<'a> {
    pub fn new(manifest: &'a Manifest, public_key: &[u8]) -> Self {
        let mut problems = Vec::new();
        if let Err(e) = manifest.verify(public_key) {
            problems.push(e);
        }
        Self {
            manifest,
            prev: String::new(),
            problems,
        }
    }

    /// Checks chunk `index` (`None`: the object is missing) and returns its
    /// records when it verifies.
    pub fn chunk(&mut self, index: u32, bytes: Option<&[u8]>) -> Vec<Record> {
        let Some(c) = self.manifest.chunks.get(index as usize) else {
            self.problems.push(FormatError::Manifest(format!(
                "chunk {index} is not listed"
            )));
            return Vec::new();
        };
        let chunk_err = |message: String| FormatError::Chunk { index, message };
        let prev = std::mem::replace(&mut self.prev, c.sha256.clone());
        if c.index != index {
            self.problems.push(FormatError::Manifest(format!(
                "chunk {} listed in place {index}",
                c.index
            )));
        }
        let Some(bytes) = bytes else {
            self.problems.push(chunk_err("missing".into()));
            return Vec::new();
        };
        let sha = sha256_hex(bytes);
        if sha != c.sha256 {
            self.problems.push(chunk_err(format!(
                "SHA-256 {sha} does not match the manifest's {}",
                c.sha256
            )));
            return Vec::new();
        }
        match read_chunk(bytes, &self.manifest.session.session_id, index, &prev) {
            Ok(records) if records.len() as u64 != c.events => {
                self.problems.push(chunk_err(format!(
                    "{} events, the manifest says {}",
                    records.len(),
                    c.events
                )));
                Vec::new()
            }
            Ok(records) => records,
            Err(e) => {
                self.problems.push(e);
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;
    use crate::RecordEvent;

    fn key() -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn meta() -> SessionMeta {
        SessionMeta {
            session_id: "s1".into(),
            identity: "sa:alice".into(),
            target: "orders".into(),
            agent: "edge-1".into(),
            policy_version: "p1".into(),
            started_ms: 1_000,
            ..SessionMeta::default()
        }
    }

    /// A recorded session of `n` statements, cut into small chunks.
    fn record(n: usize, key: &[u8]) -> (Manifest, Vec<Vec<u8>>, Vec<Record>) {
        let mut w = ChunkWriter::with_target("s1", 2_000);
        let mut chunks = Vec::new();
        let mut records = Vec::new();
        for i in 0..n {
            let r = Record {
                t: i as i64,
                event: RecordEvent::Query {
                    text: format!("select * from orders where id = {i} -- {}", "x".repeat(40)),
                },
            };
            if let Some(c) = w.push(&r).unwrap() {
                chunks.push(c);
            }
            records.push(r);
        }
        chunks.extend(w.finish().unwrap());
        let mut m = Manifest::new(
            &meta(),
            chunks.iter().map(Chunk::to_ref).collect(),
            9_000,
            "client disconnected",
        );
        m.sign(key).unwrap();
        (m, chunks.into_iter().map(|c| c.bytes).collect(), records)
    }

    #[test]
    fn a_recording_reads_back_whole_and_verifies() {
        let k = key();
        let (m, objects, records) = record(500, &k);
        assert!(objects.len() > 5, "{} chunks", objects.len());
        let m = Manifest::from_bytes(&m.to_bytes()).unwrap();
        let back = verify_recording(&m, &public_key(&k).unwrap(), |i| {
            objects.get(i as usize).cloned()
        })
        .unwrap();
        assert_eq!(back, records);
        // Compression pays for itself on SQL text.
        let plain: usize = records
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap().len())
            .sum();
        let stored: usize = objects.iter().map(Vec::len).sum();
        assert!(stored * 3 < plain, "{stored} bytes stored for {plain}");
    }

    #[test]
    fn tampering_is_reported_naming_the_chunk() {
        let k = key();
        let pk = public_key(&k).unwrap();
        let (m, objects, _) = record(300, &k);
        // A flipped byte in any chunk.
        for target in 0..objects.len() {
            let mut bad = objects.clone();
            let mid = bad[target].len() / 2;
            bad[target][mid] ^= 0x01;
            let e = verify_recording(&m, &pk, |i| bad.get(i as usize).cloned()).unwrap_err();
            assert!(
                matches!(e, FormatError::Chunk { index, .. } if index as usize == target),
                "{e}"
            );
        }
        // A deleted chunk.
        let e = verify_recording(&m, &pk, |i| (i != 2).then(|| objects[i as usize].clone()))
            .unwrap_err();
        assert_eq!(e.to_string(), "chunk 2: missing");
        // Two chunks swapped, with a manifest re-listing them (unsigned
        // again by someone without the key): the signature fails.
        let mut swapped = m.clone();
        swapped.chunks.swap(1, 2);
        let e = verify_recording(&swapped, &pk, |i| objects.get(i as usize).cloned()).unwrap_err();
        assert!(matches!(e, FormatError::Signature(_)), "{e}");
        // A replaced manifest signed by another key.
        let mut forged = m.clone();
        forged.end_reason = "nothing happened".into();
        forged.sign(&key()).unwrap();
        let e = verify_recording(&forged, &pk, |i| objects.get(i as usize).cloned()).unwrap_err();
        assert!(matches!(e, FormatError::Signature(_)), "{e}");
        // A chunk from another place in the chain under a matching manifest
        // entry: its header and the chain give it away.
        let mut k2 = m.clone();
        k2.chunks[1].sha256 = m.chunks[2].sha256.clone();
        k2.chunks[1].size = m.chunks[2].size;
        k2.sign(&k).unwrap();
        let e = verify_recording(&k2, &pk, |i| {
            objects.get(if i == 1 { 2 } else { i as usize }).cloned()
        })
        .unwrap_err();
        assert!(matches!(e, FormatError::Chunk { index: 1, .. }), "{e}");
    }

    #[test]
    fn hostile_objects_are_errors_not_panics() {
        for bytes in [vec![], vec![0u8; 10], b"not zstd at all".to_vec()] {
            assert!(read_chunk(&bytes, "s1", 0, "").is_err());
        }
        let junk = zstd::bulk::compress(b"{\"format\":1}\nnot json\n", 3).unwrap();
        assert!(read_chunk(&junk, "s1", 0, "").is_err());
        assert!(Manifest::from_bytes(b"{}").is_err());
    }

    #[test]
    fn terminal_sessions_export_to_asciicast_v2() {
        let records = vec![
            Record {
                t: 0,
                event: RecordEvent::TerminalOutput {
                    channel: 1,
                    data: "$ ".into(),
                    hex: String::new(),
                },
            },
            Record {
                t: 250,
                event: RecordEvent::TerminalInput {
                    channel: 1,
                    data: "ls\r".into(),
                    hex: String::new(),
                },
            },
            Record {
                t: 300,
                event: RecordEvent::Query {
                    text: "ignored".into(),
                },
            },
            Record {
                t: 1_500,
                event: RecordEvent::WindowSize {
                    channel: 1,
                    cols: 120,
                    rows: 40,
                },
            },
            Record {
                t: 1_750,
                event: RecordEvent::TerminalOutput {
                    channel: 1,
                    data: String::new(),
                    hex: hex::encode(b"a\x1b[0m\r\n"),
                },
            },
        ];
        let cast = crate::asciicast::export(1_700_000_000_123, 80, 24, &records);
        let lines: Vec<serde_json::Value> = cast
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"version": 2, "width": 80, "height": 24, "timestamp": 1_700_000_000})
        );
        assert_eq!(lines[1], serde_json::json!([0.0, "o", "$ "]));
        assert_eq!(lines[2], serde_json::json!([0.25, "i", "ls\r"]));
        assert_eq!(lines[3], serde_json::json!([1.5, "r", "120x40"]));
        assert_eq!(lines[4], serde_json::json!([1.75, "o", "a\u{1b}[0m\r\n"]));
        assert_eq!(lines.len(), 5);
    }
}
