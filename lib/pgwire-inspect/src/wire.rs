//! Bounds-checked decoders for the messages the inspector reads.
//!
//! pgwire's decoders (0.42) read counts and lengths with `Buf::get_*`, which
//! panics when a message is shorter than its counts claim; fuzzing found it
//! within seconds. The inspector reads untrusted bytes from both sides, so it
//! decodes the few messages it needs here, where every read is checked and
//! a short or inconsistent message is an error. pgwire still encodes what
//! the gateway sends (`build`).

/// A cursor over one message body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A NUL-terminated string (lossy UTF-8: the evidence keeps what it can).
    fn cstr(&mut self) -> Option<String> {
        let end = self.0.iter().position(|&b| b == 0)?;
        let s = String::from_utf8_lossy(self.take(end)?).into_owned();
        self.take(1)?;
        Some(s)
    }

    /// A count that can only be honest if that many items of at least
    /// `min_size` bytes follow (so a forged count cannot make us allocate).
    fn count(&mut self, min_size: usize) -> Option<usize> {
        let n = usize::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?));
        (n.saturating_mul(min_size) <= self.0.len()).then_some(n)
    }
}

/// The body of a whole message: after the type byte and the length.
fn body(msg: &[u8]) -> Reader<'_> {
    Reader(msg.get(5..).unwrap_or_default())
}

pub(crate) struct Parse {
    pub name: String,
    pub query: String,
    pub type_oids: Vec<u32>,
}

pub(crate) struct Bind {
    pub portal: String,
    pub statement: String,
    pub formats: Vec<i16>,
    pub parameters: Vec<Option<Vec<u8>>>,
}

pub(crate) fn query(msg: &[u8]) -> Option<String> {
    body(msg).cstr()
}

pub(crate) fn parse(msg: &[u8]) -> Option<Parse> {
    let mut r = body(msg);
    let name = r.cstr()?;
    let query = r.cstr()?;
    let n = r.count(4)?;
    let type_oids = (0..n).map(|_| r.u32()).collect::<Option<_>>()?;
    Some(Parse {
        name,
        query,
        type_oids,
    })
}

pub(crate) fn bind(msg: &[u8]) -> Option<Bind> {
    let mut r = body(msg);
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let n = r.count(2)?;
    let formats = (0..n).map(|_| r.i16()).collect::<Option<_>>()?;
    let n = r.count(4)?;
    let mut parameters = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        parameters.push(match usize::try_from(len) {
            Ok(len) => Some(r.take(len)?.to_vec()),
            Err(_) if len == -1 => None,
            Err(_) => return None,
        });
    }
    Some(Bind {
        portal,
        statement,
        formats,
        parameters,
    })
}

/// Execute: the portal name.
pub(crate) fn execute(msg: &[u8]) -> Option<String> {
    let mut r = body(msg);
    let portal = r.cstr()?;
    r.i32()?;
    Some(portal)
}

/// Describe or Close: the target kind (`S` statement, `P` portal) and name.
pub(crate) fn target(msg: &[u8]) -> Option<(u8, String)> {
    let mut r = body(msg);
    let kind = r.u8()?;
    Some((kind, r.cstr()?))
}

pub(crate) fn command_complete(msg: &[u8]) -> Option<String> {
    body(msg).cstr()
}

/// ErrorResponse / NoticeResponse: SQLSTATE and message.
pub(crate) fn error_fields(msg: &[u8]) -> Option<(String, String)> {
    let mut r = body(msg);
    let (mut code, mut message) = (String::new(), String::new());
    loop {
        match r.u8()? {
            0 => return Some((code, message)),
            b'C' => code = r.cstr()?,
            b'M' => message = r.cstr()?,
            _ => {
                r.cstr()?;
            }
        }
    }
}

/// One column of a RowDescription.
pub(crate) struct Column {
    pub name: String,
    pub table_oid: u32,
    pub type_oid: u32,
    pub format: i16,
}

/// RowDescription: the columns.
pub(crate) fn row_description(msg: &[u8]) -> Option<Vec<Column>> {
    let mut r = body(msg);
    // name (≥1 byte) + 18 bytes of fixed fields per column
    let n = r.count(19)?;
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.cstr()?;
        let table_oid = r.u32()?;
        r.take(2)?; // attribute number
        let type_oid = r.u32()?;
        r.take(6)?; // type size, type modifier
        let format = r.i16()?;
        cols.push(Column {
            name,
            table_oid,
            type_oid,
            format,
        });
    }
    Some(cols)
}

/// DataRow: the values (`None` for NULL).
pub(crate) fn data_row(msg: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut r = body(msg);
    let n = r.count(4)?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        values.push(match usize::try_from(len) {
            Ok(len) => Some(r.take(len)?),
            Err(_) if len == -1 => None,
            Err(_) => return None,
        });
    }
    Some(values)
}

/// CopyOutResponse: the overall format (0 text, 1 binary).
pub(crate) fn copy_out_format(msg: &[u8]) -> Option<u8> {
    body(msg).u8()
}

/// CopyData: the payload.
pub(crate) fn copy_data(msg: &[u8]) -> &[u8] {
    msg.get(5..).unwrap_or_default()
}

/// ParameterDescription: the parameter type OIDs.
pub(crate) fn parameter_description(msg: &[u8]) -> Option<Vec<u32>> {
    let mut r = body(msg);
    let n = r.count(4)?;
    (0..n).map(|_| r.u32()).collect()
}
