//! Command lines typed into an interactive shell, detected from the two
//! streams of its terminal: what the caller types and what the terminal
//! shows (the echo). Bytes in, lines out; the time is passed in.
//!
//! The detector keeps a model of the terminal's current line from the
//! output (printable text written at the cursor, carriage return, backspace,
//! cursor moves, erase-in-line, insert and delete; other escape sequences
//! and window titles skipped) and the typed text since the last Enter. When
//! the caller presses Enter it reports the line:
//!
//! - **from the echo** (`How::Echo`): the text after the prompt on the
//!   terminal's line, which includes what history recall, tab completion
//!   and line editing put there;
//! - **from the keystrokes** (`How::Typed`) when nothing was echoed yet (a
//!   fast paste: the shell echoes after the Enter) and the line was typed
//!   plainly (no recall, completion or cursor movement).
//!
//! Limits (stated, not hidden): a line shown in pieces across several
//! terminal lines (wrapping past the right edge, a prompt redrawn by the
//! shell) is reported as the last piece; an application with its own
//! screen (editors, pagers, `top`: the alternate screen) is not a shell,
//! and nothing typed there is reported; keystrokes with echo off (a
//! password prompt) are not reported when the prompt says so
//! (`password`, `passphrase`, `PIN`), and otherwise only as typed; what
//! the shell does with a line (aliases, functions, `history` expansion
//! such as `!!`) is not known here. Detection is an audit aid and a
//! tripwire, never the boundary: the boundary for commands is exec with
//! guardrails, and for shells the `ssh.shell` decision and approvals.

/// Typed text past this is not kept (the line is still reported, cut).
pub const MAX_LINE: usize = 4096;
/// Escape sequences longer than this are dropped.
const MAX_ESCAPE: usize = 64;

/// How a reported line was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// From the terminal's echo after the prompt.
    Echo,
    /// From the keystrokes, before any echo.
    Typed,
}

/// A command line the caller entered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    pub line: String,
    pub how: How,
    /// When the Enter arrived (ms, as passed in).
    pub at_ms: i64,
    /// Offset in the input chunk just past the Enter key.
    pub end: usize,
}

/// The detector of one terminal channel.
#[derive(Debug, Default)]
pub struct Detector {
    /// The terminal's current line and cursor column.
    screen: Vec<char>,
    cursor: usize,
    /// Where the cursor stood when the caller began typing this line.
    prompt_col: Option<usize>,
    /// The prompt's text then (to notice a password prompt).
    prompt_text: String,
    typed: Vec<char>,
    /// Recall, completion or cursor movement changed the line.
    edited: bool,
    alt_screen: bool,
    out_esc: Escape,
    in_esc: Escape,
    /// A UTF-8 sequence split across chunks, per direction.
    out_utf8: Vec<u8>,
    in_utf8: Vec<u8>,
}

#[derive(Debug, Default)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// Inside `ESC [`, with the bytes so far.
    Csi(Vec<u8>),
    /// Inside `ESC ]` (until BEL or ESC \).
    Osc(bool),
    /// `ESC O` (SS3): one more byte.
    Ss3,
}

// === impl Detector ===

impl Detector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an application with its own screen is running.
    pub fn in_alternate_screen(&self) -> bool {
        self.alt_screen
    }

    /// What the terminal shows: bytes from the target.
    pub fn output(&mut self, data: &[u8]) {
        for &b in data {
            self.output_byte(b);
        }
    }

    /// What the caller typed: bytes from the client. Returns the lines
    /// entered in this chunk.
    pub fn input(&mut self, data: &[u8], now_ms: i64) -> Vec<Detected> {
        let mut out = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            if let Some(line) = self.input_byte(b) {
                out.push(Detected {
                    line: line.0,
                    how: line.1,
                    at_ms: now_ms,
                    end: i + 1,
                });
            }
        }
        out
    }

    fn output_byte(&mut self, b: u8) {
        match std::mem::take(&mut self.out_esc) {
            Escape::None => {}
            Escape::Start => {
                self.out_esc = match b {
                    b'[' => Escape::Csi(Vec::new()),
                    b']' => Escape::Osc(false),
                    b'O' => Escape::Ss3,
                    _ => Escape::None,
                };
                return;
            }
            Escape::Csi(mut p) => {
                if (0x40..=0x7e).contains(&b) {
                    self.csi(&p, b);
                } else if p.len() < MAX_ESCAPE {
                    p.push(b);
                    self.out_esc = Escape::Csi(p);
                }
                return;
            }
            Escape::Osc(after_esc) => {
                if b == 0x07 || (after_esc && b == b'\\') {
                    return;
                }
                self.out_esc = Escape::Osc(b == 0x1b);
                return;
            }
            Escape::Ss3 => return,
        }
        match b {
            0x1b => self.out_esc = Escape::Start,
            b'\r' => self.cursor = 0,
            b'\n' => {
                self.screen.clear();
                self.cursor = 0;
                // A new line on the terminal before any typing moves the
                // prompt too.
                if self.typed.is_empty() {
                    self.prompt_col = None;
                }
            }
            0x08 => self.cursor = self.cursor.saturating_sub(1),
            0x07 | 0x00 => {}
            b if b < 0x20 || b == 0x7f => {}
            b => {
                if let Some(c) = utf8(&mut self.out_utf8, b) {
                    self.put(c);
                }
            }
        }
    }

    fn put(&mut self, c: char) {
        if self.alt_screen {
            return;
        }
        if self.cursor < self.screen.len() {
            if let Some(slot) = self.screen.get_mut(self.cursor) {
                *slot = c;
            }
        } else if self.screen.len() < MAX_LINE {
            while self.screen.len() < self.cursor {
                self.screen.push(' ');
            }
            self.screen.push(c);
        }
        self.cursor = (self.cursor + 1).min(MAX_LINE);
    }

    fn csi(&mut self, params: &[u8], fin: u8) {
        let text = String::from_utf8_lossy(params);
        if let Some(modes) = text.strip_prefix('?') {
            let alt = modes
                .split(';')
                .any(|m| m == "1049" || m == "47" || m == "1047");
            if alt && fin == b'h' {
                self.alt_screen = true;
                self.reset_line();
            } else if alt && fin == b'l' {
                self.alt_screen = false;
                self.screen.clear();
                self.cursor = 0;
                self.prompt_col = None;
            }
            return;
        }
        let n = text
            .split(';')
            .next()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        let n1 = n.clamp(1, MAX_LINE);
        match fin {
            b'C' => self.cursor = (self.cursor + n1).min(MAX_LINE),
            b'D' => self.cursor = self.cursor.saturating_sub(n1),
            b'G' => self.cursor = n1 - 1,
            b'K' => match n {
                0 => self.screen.truncate(self.cursor),
                1 => {
                    for c in self.screen.iter_mut().take(self.cursor) {
                        *c = ' ';
                    }
                }
                _ => self.screen.clear(),
            },
            b'P' => {
                let at = self.cursor.min(self.screen.len());
                let to = (at + n1).min(self.screen.len());
                self.screen.drain(at..to);
            }
            b'@' => {
                let at = self.cursor.min(self.screen.len());
                for _ in 0..n1.min(MAX_LINE.saturating_sub(self.screen.len())) {
                    self.screen.insert(at, ' ');
                }
            }
            // Erase the display, or move to another line: a new line.
            b'J' | b'H' | b'f' | b'A' | b'B' => {
                if fin == b'J' && n == 0 {
                    self.screen.truncate(self.cursor);
                } else {
                    self.screen.clear();
                    self.cursor = 0;
                }
            }
            _ => {}
        }
    }

    fn input_byte(&mut self, b: u8) -> Option<(String, How)> {
        match std::mem::take(&mut self.in_esc) {
            Escape::None => {}
            Escape::Start => {
                self.in_esc = match b {
                    b'[' => Escape::Csi(Vec::new()),
                    b'O' => Escape::Ss3,
                    _ => Escape::None,
                };
                // Alt-key editing (ESC b, ESC f, ESC .): the line changed.
                self.edited = true;
                return None;
            }
            Escape::Csi(mut p) => {
                if (0x40..=0x7e).contains(&b) {
                    self.edited = true;
                } else if p.len() < MAX_ESCAPE {
                    p.push(b);
                    self.in_esc = Escape::Csi(p);
                }
                return None;
            }
            Escape::Ss3 => {
                self.edited = true;
                return None;
            }
            Escape::Osc(_) => return None,
        }
        if self.alt_screen {
            return None;
        }
        if self.prompt_col.is_none() && b != b'\r' && b != b'\n' {
            self.prompt_col = Some(self.cursor);
            self.prompt_text = self.screen.iter().take(self.cursor).collect();
        }
        match b {
            b'\r' | b'\n' => return self.enter(),
            0x1b => self.in_esc = Escape::Start,
            0x7f | 0x08 => {
                self.typed.pop();
            }
            // ^U, ^C: the line is gone.
            0x15 | 0x03 => {
                self.typed.clear();
                if b == 0x03 {
                    self.reset_line();
                }
            }
            // ^W: the last word.
            0x17 => {
                while self.typed.last() == Some(&' ') {
                    self.typed.pop();
                }
                while self.typed.last().is_some_and(|c| *c != ' ') {
                    self.typed.pop();
                }
            }
            // Tab, ^R, ^P, ^N, ^A, ^E, ^B, ^F, ^K, ^Y, ^T: recall,
            // completion or editing.
            0x09 | 0x12 | 0x10 | 0x0e | 0x01 | 0x05 | 0x02 | 0x06 | 0x0b | 0x19 | 0x14 => {
                self.edited = true;
            }
            b if b < 0x20 => {}
            b => {
                if let Some(c) = utf8(&mut self.in_utf8, b)
                    && self.typed.len() < MAX_LINE
                {
                    self.typed.push(c);
                }
            }
        }
        None
    }

    fn enter(&mut self) -> Option<(String, How)> {
        let col = self.prompt_col.unwrap_or(self.cursor);
        let echoed: String = self.screen.iter().skip(col).collect();
        let echoed = echoed.trim().to_string();
        let typed: String = self.typed.iter().collect();
        let typed = typed.trim().to_string();
        let secret = looks_secret(&self.prompt_text);
        let found = if secret || (echoed.is_empty() && typed.is_empty()) {
            None
        } else if !echoed.is_empty() {
            Some((echoed, How::Echo))
        } else if !self.edited {
            Some((typed, How::Typed))
        } else {
            None
        };
        self.reset_line();
        found
    }

    /// Whether what the caller types now answers a secret's prompt (the
    /// terminal's line says `password`, `passphrase` or `PIN:`): such
    /// keystrokes are neither reported nor to be kept.
    pub fn at_secret_prompt(&self) -> bool {
        if self.alt_screen {
            return false;
        }
        match self.prompt_col {
            Some(_) => looks_secret(&self.prompt_text),
            None => {
                let before: String = self.screen.iter().take(self.cursor).collect();
                looks_secret(&before)
            }
        }
    }

    fn reset_line(&mut self) {
        self.typed.clear();
        self.edited = false;
        self.prompt_col = None;
        self.prompt_text.clear();
    }
}

/// Collects a UTF-8 sequence byte by byte; a broken one is dropped.
fn utf8(buf: &mut Vec<u8>, b: u8) -> Option<char> {
    if b < 0x80 {
        buf.clear();
        return Some(char::from(b));
    }
    if b & 0xc0 != 0x80 {
        buf.clear();
    }
    buf.push(b);
    if buf.len() > 4 {
        buf.clear();
        return None;
    }
    match std::str::from_utf8(buf) {
        Ok(s) => {
            let c = s.chars().next();
            buf.clear();
            c
        }
        Err(e) if e.error_len().is_some() => {
            buf.clear();
            None
        }
        Err(_) => None,
    }
}

/// A prompt for a secret, by its words.
fn looks_secret(prompt: &str) -> bool {
    let p = prompt.to_lowercase();
    p.contains("password") || p.contains("passphrase") || p.contains("pin:")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a script of (output, input) steps and returns the lines.
    fn check(steps: &[(&str, &str)], expect: &[(&str, How)]) {
        let mut d = Detector::new();
        let mut got = Vec::new();
        for (i, (out, inp)) in steps.iter().enumerate() {
            d.output(out.as_bytes());
            for x in d.input(inp.as_bytes(), i as i64) {
                got.push((x.line, x.how));
            }
        }
        let want: Vec<(String, How)> = expect.iter().map(|(l, h)| (l.to_string(), *h)).collect();
        assert_eq!(got, want, "steps {steps:?}");
    }

    #[test]
    fn an_echoed_line_is_read_after_the_prompt() {
        check(
            &[
                ("\x1b]0;me@box: ~\x07me@box:~$ ", "l"),
                ("l", "s -la"),
                ("s -la", "\r"),
            ],
            &[("ls -la", How::Echo)],
        );
    }

    #[test]
    fn a_paste_before_any_echo_is_read_as_typed() {
        check(
            &[("$ ", "rm -rf /tmp/x\r")],
            &[("rm -rf /tmp/x", How::Typed)],
        );
    }

    #[test]
    fn history_recall_and_completion_are_read_from_the_echo() {
        // Up arrow: bash redraws the line with the recalled command.
        check(
            &[("$ ", "\x1b[A"), ("rm -rf /tmp/x", "\r")],
            &[("rm -rf /tmp/x", How::Echo)],
        );
        // Tab completion appends to the echoed line.
        check(
            &[
                ("$ ", "cat /etc/pas"),
                ("cat /etc/pas", "\t"),
                ("swd ", "\r"),
            ],
            &[("cat /etc/passwd", How::Echo)],
        );
        // Recall without any echo yet is not guessed.
        check(&[("$ ", "\x1b[A\r")], &[]);
    }

    #[test]
    fn line_editing_is_followed() {
        // Backspace erases on screen (BS, space, BS) and in the typed text.
        check(
            &[("$ ", "lsx"), ("lsx", "\x7f"), ("\x08 \x08", "\r")],
            &[("ls", How::Echo)],
        );
        check(&[("$ ", "rm x\x15ls\r")], &[("ls", How::Typed)]);
        check(&[("$ ", "echo a b\x17c\r")], &[("echo a c", How::Typed)]);
        // ^C abandons the line.
        check(&[("$ ", "rm -rf /\x03"), ("^C\r\n$ ", "\r")], &[]);
        // Erase to the end of the line after a cursor move.
        check(
            &[("$ ", "abc"), ("abc\x1b[2D\x1b[K", "\r")],
            &[("a", How::Echo)],
        );
    }

    #[test]
    fn applications_with_their_own_screen_are_not_shells() {
        check(
            &[
                ("$ ", "vim x\r"),
                ("\x1b[?1049h~\r\n~", ":wq\r"),
                ("\x1b[?1049l$ ", "id\r"),
            ],
            &[("vim x", How::Typed), ("id", How::Typed)],
        );
    }

    #[test]
    fn a_secret_prompt_is_known_before_and_while_the_secret_is_typed() {
        let mut d = Detector::default();
        d.output(b"me@box:~$ ");
        assert!(!d.at_secret_prompt());
        d.input(b"sudo -v\r", 1);
        d.output(b"sudo -v\r\n[sudo] password for me: ");
        assert!(d.at_secret_prompt());
        d.input(b"hun", 3);
        assert!(d.at_secret_prompt(), "still answering the prompt");
        d.input(b"ter2\r", 4);
        d.output(b"\r\nme@box:~$ ");
        assert!(!d.at_secret_prompt());
    }

    #[test]
    fn password_prompts_are_not_reported() {
        check(&[("[sudo] password for me: ", "hunter2\r")], &[]);
        check(&[("Enter passphrase: ", "s3cret\r")], &[]);
    }

    #[test]
    fn lines_are_reported_per_enter_with_their_offset() {
        let mut d = Detector::new();
        d.output(b"$ ");
        let got = d.input(b"true\rfalse\r", 7);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].end, got[1].end, got[1].at_ms), (5, 11, 7));
        assert_eq!(got[1].line, "false");
    }

    #[test]
    fn utf8_split_across_chunks_is_kept() {
        let mut d = Detector::new();
        d.output("$ ".as_bytes());
        let s = "echo héllo\r".as_bytes();
        let mut got = Vec::new();
        for chunk in s.chunks(1) {
            got.extend(d.input(chunk, 0));
        }
        assert_eq!(got.first().map(|x| x.line.as_str()), Some("echo héllo"));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded() {
        let mut d = Detector::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            d.output(&bytes);
            let _ = d.input(&bytes, 0);
        }
        assert!(d.screen.len() <= MAX_LINE && d.typed.len() <= MAX_LINE);
    }
}
