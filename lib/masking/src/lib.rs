//! Inline masking of sensitive values.
//!
//! One multi-pattern pass (`regex_automata::meta::Regex` over every
//! detector's pattern at once) finds candidates; each candidate is then
//! validated the way its kind demands (Luhn and issuer ranges for payment
//! cards, mod-97 for IBANs, reserved ranges for US SSNs, octets for IPv4,
//! a full parse for IPv6), and only validated values are masked.
//!
//! Masks keep the value's shape (`j***@example.com`, `****-****-****-4242`,
//! `***-**-6789`) and never contain what a detector looks for, so masking a
//! masked value changes nothing. Pure: no I/O, bytes in, bytes out.

use std::collections::BTreeMap;

use regex_automata::meta::Regex;

/// What a detector looks for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Detector {
    Email,
    /// Payment card number: issuer range, length and Luhn check.
    Card,
    /// IBAN with its mod-97 check.
    Iban,
    /// US social security number (`123-45-6789`), reserved ranges excluded.
    UsSsn,
    /// Phone numbers in international (`+44 20 7946 0958`) or North American
    /// (`(415) 555-0100`, `415-555-0100`) form.
    Phone,
    Ipv4,
    Ipv6,
    /// JSON Web Tokens.
    Jwt,
    /// Well-known API key and secret formats (AWS, GitHub, Slack, Stripe,
    /// Google, PEM private keys).
    Secret,
    /// A custom regular expression, by name.
    Custom(String),
}

impl Detector {
    pub fn name(&self) -> &str {
        match self {
            Detector::Email => "email",
            Detector::Card => "card",
            Detector::Iban => "iban",
            Detector::UsSsn => "us_ssn",
            Detector::Phone => "phone",
            Detector::Ipv4 => "ipv4",
            Detector::Ipv6 => "ipv6",
            Detector::Jwt => "jwt",
            Detector::Secret => "secret",
            Detector::Custom(n) => n,
        }
    }

    /// Every built-in detector.
    pub fn builtin() -> Vec<Detector> {
        vec![
            Detector::Jwt,
            Detector::Secret,
            Detector::Email,
            Detector::Iban,
            Detector::Card,
            Detector::UsSsn,
            Detector::Ipv6,
            Detector::Ipv4,
            Detector::Phone,
        ]
    }

    /// Candidate patterns; the validator decides.
    fn patterns(&self) -> Vec<String> {
        const B: &str = r"(?-u:\b)";
        match self {
            Detector::Email => vec![format!(
                r"{B}[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{{2,24}}{B}"
            )],
            Detector::Card => vec![format!(r"{B}\d(?:[ \-]?\d){{11,18}}{B}")],
            Detector::Iban => vec![format!(r"{B}[A-Z]{{2}}\d{{2}}(?: ?[A-Z0-9]){{11,30}}{B}")],
            Detector::UsSsn => vec![format!(r"{B}\d{{3}}-\d{{2}}-\d{{4}}{B}")],
            Detector::Phone => vec![
                format!(
                    r"\+\d{{1,3}}[ .\-]?(?:\(\d{{1,4}}\)[ .\-]?)?\d{{1,4}}(?:[ .\-]?\d{{2,4}}){{1,4}}{B}"
                ),
                format!(r"(?:\(\d{{3}}\) ?|{B}\d{{3}}[\-. ])\d{{3}}[\-. ]\d{{4}}{B}"),
            ],
            Detector::Ipv4 => vec![format!(r"{B}(?:\d{{1,3}}\.){{3}}\d{{1,3}}{B}")],
            Detector::Ipv6 => vec![r"(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}".to_string()],
            Detector::Jwt => vec![
                r"eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{10,}".to_string(),
            ],
            Detector::Secret => vec![
                format!(r"{B}(?:AKIA|ASIA)[0-9A-Z]{{16}}{B}"),
                format!(r"{B}gh[pousr]_[A-Za-z0-9]{{36}}{B}"),
                format!(r"{B}github_pat_[A-Za-z0-9_]{{60,100}}{B}"),
                format!(r"{B}xox[abprs]-[A-Za-z0-9\-]{{10,}}"),
                format!(r"{B}(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{{16,}}{B}"),
                format!(r"{B}AIza[0-9A-Za-z_\-]{{35}}"),
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----".to_string(),
            ],
            Detector::Custom(_) => Vec::new(),
        }
    }
}

/// Which detectors run, plus custom expressions.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Built-in detectors to run; all of them when empty.
    pub detectors: Vec<Detector>,
    /// `(name, regular expression)`: every match is masked.
    pub custom: Vec<(String, String)>,
}

/// A detector pattern or custom expression that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("masking pattern {name}: {message}")]
pub struct PatternError {
    pub name: String,
    pub message: String,
}

/// Values masked per detector (never the values themselves).
pub type Counts = BTreeMap<String, u64>;

/// A compiled set of detectors.
pub struct Masker {
    re: Regex,
    /// The detector of each pattern, by pattern index.
    kinds: Vec<Detector>,
    /// Custom expressions can match anything: no prefilter.
    has_custom: bool,
}

impl Masker {
    pub fn new(config: &Config) -> Result<Self, PatternError> {
        let builtin = if config.detectors.is_empty() {
            Detector::builtin()
        } else {
            config.detectors.clone()
        };
        let mut patterns = Vec::new();
        let mut kinds = Vec::new();
        for d in builtin {
            for p in d.patterns() {
                patterns.push(p);
                kinds.push(d.clone());
            }
        }
        for (name, p) in &config.custom {
            // Each custom expression compiles alone first, so an error names it.
            Regex::new(p).map_err(|e| PatternError {
                name: name.clone(),
                message: e.to_string(),
            })?;
            patterns.push(p.clone());
            kinds.push(Detector::Custom(name.clone()));
        }
        let re = Regex::new_many(&patterns).map_err(|e| PatternError {
            name: "built-in".into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            re,
            kinds,
            has_custom: !config.custom.is_empty(),
        })
    }

    /// A cheap pass over the bytes that rules out values no built-in
    /// detector can match, from each detector's necessary conditions: an
    /// e-mail has '@'; a card 12 digits; an IBAN, SSN or phone at least 7; an
    /// IPv4 address 4 digits and 3 dots; an IPv6 address a digit and 2
    /// colons; a JWT 2 dots and 28 bytes; a known key format 15 bytes with
    /// '_', '-' or 'A'.
    fn may_match(&self, v: &[u8]) -> bool {
        if self.has_custom {
            return true;
        }
        let (mut digits, mut dots, mut colons) = (0usize, 0usize, 0usize);
        let (mut at, mut key_mark) = (false, false);
        for b in v {
            match b {
                b'0'..=b'9' => digits += 1,
                b'.' => dots += 1,
                b':' => colons += 1,
                b'@' => at = true,
                b'_' | b'-' | b'A' => key_mark = true,
                _ => {}
            }
        }
        at || digits >= 7
            || (digits >= 4 && dots >= 3)
            || (digits >= 1 && colons >= 2)
            || (dots >= 2 && v.len() >= 28)
            || (key_mark && v.len() >= 15)
    }

    /// Masks every validated sensitive value in `text`, counting them per
    /// detector. `None` when nothing was masked (no copy is made).
    pub fn mask(&self, text: &[u8], counts: &mut Counts) -> Option<Vec<u8>> {
        if !self.may_match(text) {
            return None;
        }
        self.scan(text, counts)
    }

    /// The scan itself, without the prefilter.
    fn scan(&self, text: &[u8], counts: &mut Counts) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        for m in self.re.find_iter(text) {
            let Some(kind) = self.kinds.get(m.pattern().as_usize()) else {
                continue;
            };
            let Some(value) = text.get(m.range()) else {
                continue;
            };
            if !valid(kind, value) {
                continue;
            }
            let buf = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
            buf.extend_from_slice(text.get(copied..m.start()).unwrap_or_default());
            mask_value(kind, value, buf);
            copied = m.end();
            match counts.get_mut(kind.name()) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(kind.name().to_string(), 1);
                }
            }
        }
        let mut buf = out?;
        buf.extend_from_slice(text.get(copied..).unwrap_or_default());
        Some(buf)
    }
}

impl Masker {
    /// Masks the values of one row; `None` when nothing was masked,
    /// otherwise every value, masked or not, in order.
    pub fn mask_row(&self, values: &[&[u8]], counts: &mut Counts) -> Option<Vec<Vec<u8>>> {
        let changes = self.mask_values(values, counts);
        if changes.is_empty() {
            return None;
        }
        let mut row: Vec<Vec<u8>> = values.iter().map(|v| v.to_vec()).collect();
        for (i, m) in changes {
            if let Some(slot) = row.get_mut(i) {
                *slot = m;
            }
        }
        Some(row)
    }

    /// Masks the values of one row and returns only the changed ones, by
    /// index (what the data path needs: unchanged values are not copied).
    /// Values the prefilter keeps are joined with NUL (which text values
    /// cannot contain and no detector matches across), scanned once, and
    /// split again.
    pub fn mask_values(&self, values: &[&[u8]], counts: &mut Counts) -> Vec<(usize, Vec<u8>)> {
        // Values the prefilter rules out are not scanned at all; the rest
        // are scanned together.
        let candidates: Vec<usize> = (0..values.len())
            .filter(|i| values.get(*i).is_some_and(|v| self.may_match(v)))
            .collect();
        let text = |i: &usize| values.get(*i).copied().unwrap_or_default();
        if candidates.len() <= 1 || candidates.iter().any(|i| text(i).contains(&0)) {
            // One value, or not text (NUL inside): value by value.
            candidates
                .iter()
                .filter_map(|i| self.scan(text(i), counts).map(|m| (*i, m)))
                .collect()
        } else {
            let mut joined = Vec::with_capacity(candidates.iter().map(|i| text(i).len() + 1).sum());
            for (n, i) in candidates.iter().enumerate() {
                if n > 0 {
                    joined.push(0);
                }
                joined.extend_from_slice(text(i));
            }
            let Some(out) = self.scan(&joined, counts) else {
                return Vec::new();
            };
            candidates
                .iter()
                .zip(out.split(|b| *b == 0))
                .filter(|(i, m)| text(i) != *m)
                .map(|(i, m)| (*i, m.to_vec()))
                .collect()
        }
    }
}

fn digits(v: &[u8]) -> Vec<u8> {
    v.iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect()
}

/// Whether a candidate really is what its detector looks for.
fn valid(kind: &Detector, v: &[u8]) -> bool {
    match kind {
        Detector::Card => card_ok(v),
        Detector::Iban => iban_ok(v),
        Detector::UsSsn => ssn_ok(v),
        Detector::Phone => (7..=15).contains(&digits(v).len()),
        Detector::Ipv4 => v.split(|b| *b == b'.').all(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|s| s.parse::<u8>().ok())
                .is_some()
        }),
        // A real address has a digit and at least two groups ("a::b" and a
        // cast's "::" are words, not addresses).
        Detector::Ipv6 => {
            v.iter().any(u8::is_ascii_digit)
                && v.split(|b| *b == b':').filter(|g| !g.is_empty()).count() >= 2
                && std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                    .is_some()
        }
        _ => true,
    }
}

/// Luhn check, length and issuer (IIN) ranges of the major networks.
fn card_ok(v: &[u8]) -> bool {
    // Separators, if any, must be one kind.
    let seps: Vec<u8> = v.iter().copied().filter(|b| !b.is_ascii_digit()).collect();
    if seps.windows(2).any(|w| w.first() != w.get(1)) {
        return false;
    }
    let d = digits(v);
    let len = d.len();
    if !(12..=19).contains(&len) {
        return false;
    }
    let prefix = |n: usize| -> u32 {
        d.iter()
            .take(n)
            .fold(0u32, |acc, x| acc * 10 + u32::from(*x))
    };
    let (p1, p2, p3, p4, p6) = (prefix(1), prefix(2), prefix(3), prefix(4), prefix(6));
    let issuer = match () {
        _ if p1 == 4 => matches!(len, 13 | 16 | 19),
        _ if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) => len == 16,
        _ if p2 == 34 || p2 == 37 => len == 15,
        _ if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 => (16..=19).contains(&len),
        _ if (3528..=3589).contains(&p4) => (16..=19).contains(&len),
        _ if (300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39 => {
            (14..=19).contains(&len)
        }
        _ if p2 == 62 || (622126..=622925).contains(&p6) => (16..=19).contains(&len),
        _ if p2 == 50 || (56..=69).contains(&p2) => (12..=19).contains(&len),
        _ => false,
    };
    issuer && luhn(&d)
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, x)| {
            let x = u32::from(*x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// ISO 13616: move the first four characters to the end, letters to
/// numbers, remainder mod 97 must be 1.
fn iban_ok(v: &[u8]) -> bool {
    let s: Vec<u8> = v.iter().copied().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let (head, tail) = s.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.iter().chain(head) {
        let n = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if n >= 10 {
            (rem * 100 + n) % 97
        } else {
            (rem * 10 + n) % 97
        };
    }
    rem == 1
}

/// Area 000, 666 and 900–999, group 00 and serial 0000 are never issued.
fn ssn_ok(v: &[u8]) -> bool {
    let d = digits(v);
    let num = |r: std::ops::Range<usize>| {
        d.get(r)
            .map(|s| s.iter().fold(0u32, |a, x| a * 10 + u32::from(*x)))
    };
    match (num(0..3), num(3..5), num(5..9)) {
        (Some(area), Some(group), Some(serial)) => {
            area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
        }
        _ => false,
    }
}

/// Writes the mask of `v` into `out`.
fn mask_value(kind: &Detector, v: &[u8], out: &mut Vec<u8>) {
    let star_all = |keep_last: usize, out: &mut Vec<u8>| {
        let total = v.iter().filter(|b| b.is_ascii_alphanumeric()).count();
        let mut seen = 0;
        for b in v {
            if b.is_ascii_alphanumeric() {
                seen += 1;
                out.push(if seen > total.saturating_sub(keep_last) {
                    *b
                } else {
                    b'*'
                });
            } else {
                out.push(*b);
            }
        }
    };
    match kind {
        Detector::Email => {
            // First character of the local part, then the domain as is.
            let at = v.iter().position(|b| *b == b'@').unwrap_or(0);
            out.extend_from_slice(v.get(..1).unwrap_or_default());
            out.extend_from_slice(b"***");
            out.extend_from_slice(v.get(at..).unwrap_or_default());
        }
        Detector::Card => star_all(4, out),
        Detector::UsSsn => star_all(4, out),
        Detector::Phone => star_all(2, out),
        Detector::Iban => {
            // Country code and the last four kept.
            out.extend_from_slice(v.get(..2).unwrap_or_default());
            let rest = v.get(2..).unwrap_or_default();
            let total = rest.iter().filter(|b| b.is_ascii_alphanumeric()).count();
            let mut seen = 0;
            for b in rest {
                if b.is_ascii_alphanumeric() {
                    seen += 1;
                    out.push(if seen > total.saturating_sub(4) {
                        *b
                    } else {
                        b'*'
                    });
                } else {
                    out.push(*b);
                }
            }
        }
        Detector::Ipv4 | Detector::Ipv6 => {
            for b in v {
                out.push(if b.is_ascii_hexdigit() { b'*' } else { *b });
            }
        }
        Detector::Jwt => out.extend_from_slice(b"eyJ***.***.***"),
        Detector::Secret => {
            // A recognisable prefix (up to the first separator, at most 4
            // characters), then stars.
            let keep = v
                .iter()
                .position(|b| *b == b'_' || *b == b'-')
                .map_or(4, |p| p + 1)
                .min(v.len());
            out.extend_from_slice(v.get(..keep.min(4)).unwrap_or_default());
            out.extend_from_slice(b"********");
        }
        Detector::Custom(_) => star_all(0, out),
    }
}

#[cfg(test)]
mod tests;
