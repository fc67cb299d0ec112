//! The commands a shell command line runs, found on a real bash parse.
//!
//! An SSH exec request carries one string that the target runs as
//! `$SHELL -c '<string>'`. [`commands`] parses it with a bash parser and
//! returns every simple command in it, wherever it sits: after `;`, `&&`,
//! `||` and `|`, in subshells, braces, loops, conditionals, function bodies,
//! `$(…)`, backticks, process substitutions, here-documents and assignment
//! values. Wrappers that run another command (`sudo`, `env`, `nohup`,
//! `xargs`, `timeout`, `find -exec`, …) are seen through, and so are scripts
//! handed to a shell (`sh -c '…'`, `bash -lc '…'`, `eval`, `watch`,
//! `su -c`, a here-document fed to `bash`).
//!
//! What a static parse cannot know is reported, never guessed:
//! - a program whose name the shell computes (`$cmd`, `$(…) args`, globs,
//!   brace expansion, ANSI-C quoting) is an [`Error::Computed`];
//! - an argument the shell expands is an [`Arg::Expanded`];
//! - a shell that reads a script the gateway cannot see (a pipe, a file) is
//!   marked [`Command::hidden_script`].
//!
//! Pure: no I/O, no clock.

pub mod detector;

use std::io::BufReader;

use brush_parser::ast;
use brush_parser::word::{WordPiece, WordPieceWithSource};

/// A command line longer than this is refused unparsed.
pub const MAX_LINE: usize = 64 << 10;
/// Scripts nested in scripts (`sh -c "sh -c '…'"`, `$(…)` in `$(…)`) deeper
/// than this are refused.
pub const MAX_DEPTH: usize = 8;
/// More simple commands than this in one line are refused.
pub const MAX_COMMANDS: usize = 1000;

/// Why a command line has no static reading.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the command line does not parse as a shell command: {0}")]
    Syntax(String),
    #[error("{0}")]
    Computed(String),
    #[error("scripts are nested more than {MAX_DEPTH} deep")]
    TooDeep,
    #[error("the command line is longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the command line runs more than {MAX_COMMANDS} commands")]
    TooMany,
}

/// One argument as the shell would pass it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    /// Known before the command runs: quotes and escapes removed.
    Literal(String),
    /// Computed by the shell (variables, substitutions, globs, braces,
    /// tildes, arithmetic): the text as written.
    Expanded(String),
}

impl Arg {
    /// The value if literal, else the text as written.
    pub fn text(&self) -> &str {
        match self {
            Arg::Literal(s) | Arg::Expanded(s) => s,
        }
    }

    pub fn literal(&self) -> Option<&str> {
        match self {
            Arg::Literal(s) => Some(s),
            Arg::Expanded(_) => None,
        }
    }
}

/// One simple command the line would run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The program as written, quotes removed (`rm`, `/bin/rm`).
    pub program: String,
    pub args: Vec<Arg>,
    /// The wrappers and shells it runs under, outermost first (`sudo`,
    /// `env`, `sh`).
    pub via: Vec<String>,
    /// A shell reading a script the gateway cannot see: from its input (a
    /// pipe) or from a file.
    pub hidden_script: bool,
}

impl Command {
    /// The program's name without its directory (`/usr/bin/rm` is `rm`).
    pub fn name(&self) -> &str {
        basename(&self.program)
    }

    /// The command as one line, for evidence and messages.
    pub fn display(&self) -> String {
        let mut out = self.program.clone();
        for a in &self.args {
            out.push(' ');
            out.push_str(a.text());
        }
        out
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Every simple command `line` runs, in the order written.
pub fn commands(line: &str) -> Result<Vec<Command>, Error> {
    if line.len() > MAX_LINE {
        return Err(Error::TooLong);
    }
    let mut w = Walker { out: Vec::new() };
    w.script(line, 0, &[])?;
    Ok(w.out)
}

struct Walker {
    out: Vec<Command>,
}

/// A word as the shell would pass it, and what it runs while expanding.
struct Resolved {
    text: String,
    literal: bool,
}

fn options() -> brush_parser::ParserOptions {
    brush_parser::ParserOptions {
        // bash's non-interactive defaults: no extended globs.
        enable_extended_globbing: false,
        ..Default::default()
    }
}

fn parse(script: &str) -> Result<ast::Program, Error> {
    let run =
        || brush_parser::Parser::new(BufReader::new(script.as_bytes()), &options()).parse_program();
    // The parser is third-party code fed bytes from the network: a panic in
    // it is a refusal, not a crash.
    match std::panic::catch_unwind(run) {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(Error::Syntax(e.to_string())),
        Err(_) => Err(Error::Syntax("the parser gave up".into())),
    }
}

impl Walker {
    fn script(&mut self, text: &str, depth: usize, via: &[String]) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep);
        }
        let program = parse(text)?;
        for cc in &program.complete_commands {
            self.list(cc, depth, via)?;
        }
        Ok(())
    }

    fn list(&mut self, l: &ast::CompoundList, depth: usize, via: &[String]) -> Result<(), Error> {
        for ast::CompoundListItem(and_or, _) in &l.0 {
            self.pipeline(&and_or.first, depth, via)?;
            for next in &and_or.additional {
                match next {
                    ast::AndOr::And(p) | ast::AndOr::Or(p) => self.pipeline(p, depth, via)?,
                }
            }
        }
        Ok(())
    }

    fn pipeline(&mut self, p: &ast::Pipeline, depth: usize, via: &[String]) -> Result<(), Error> {
        for c in &p.seq {
            self.command(c, depth, via)?;
        }
        Ok(())
    }

    fn command(&mut self, c: &ast::Command, depth: usize, via: &[String]) -> Result<(), Error> {
        match c {
            ast::Command::Simple(s) => self.simple(s, depth, via),
            ast::Command::Compound(cc, redirects) => {
                self.compound(cc, depth, via)?;
                if let Some(r) = redirects {
                    for r in &r.0 {
                        self.redirect(r, depth, via)?;
                    }
                }
                Ok(())
            }
            // A function's body runs if it is called: judge it as if it were.
            ast::Command::Function(f) => {
                self.compound(&f.body.0, depth, via)?;
                if let Some(r) = &f.body.1 {
                    for r in &r.0 {
                        self.redirect(r, depth, via)?;
                    }
                }
                Ok(())
            }
            ast::Command::ExtendedTest(t, redirects) => {
                self.test_expr(&t.expr, depth, via)?;
                if let Some(r) = redirects {
                    for r in &r.0 {
                        self.redirect(r, depth, via)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn test_expr(
        &mut self,
        e: &ast::ExtendedTestExpr,
        depth: usize,
        via: &[String],
    ) -> Result<(), Error> {
        match e {
            ast::ExtendedTestExpr::And(a, b) | ast::ExtendedTestExpr::Or(a, b) => {
                self.test_expr(a, depth, via)?;
                self.test_expr(b, depth, via)
            }
            ast::ExtendedTestExpr::Not(a) | ast::ExtendedTestExpr::Parenthesized(a) => {
                self.test_expr(a, depth, via)
            }
            ast::ExtendedTestExpr::UnaryTest(_, w) => self.word(&w.value, depth, via).map(drop),
            ast::ExtendedTestExpr::BinaryTest(_, a, b) => {
                self.word(&a.value, depth, via)?;
                self.word(&b.value, depth, via).map(drop)
            }
        }
    }

    fn compound(
        &mut self,
        c: &ast::CompoundCommand,
        depth: usize,
        via: &[String],
    ) -> Result<(), Error> {
        use ast::CompoundCommand as C;
        match c {
            C::Arithmetic(a) => arithmetic(&a.expr.value),
            C::ArithmeticForClause(f) => {
                for e in [&f.initializer, &f.condition, &f.updater]
                    .into_iter()
                    .flatten()
                {
                    arithmetic(&e.value)?;
                }
                self.list(&f.body.list, depth, via)
            }
            C::BraceGroup(b) => self.list(&b.list, depth, via),
            C::Subshell(s) => self.list(&s.list, depth, via),
            C::ForClause(f) => {
                for w in f.values.iter().flatten() {
                    self.word(&w.value, depth, via)?;
                }
                self.list(&f.body.list, depth, via)
            }
            C::CaseClause(k) => {
                self.word(&k.value.value, depth, via)?;
                for item in &k.cases {
                    for p in &item.patterns {
                        self.word(&p.value, depth, via)?;
                    }
                    if let Some(cmd) = &item.cmd {
                        self.list(cmd, depth, via)?;
                    }
                }
                Ok(())
            }
            C::IfClause(i) => {
                self.list(&i.condition, depth, via)?;
                self.list(&i.then, depth, via)?;
                for e in i.elses.iter().flatten() {
                    if let Some(cond) = &e.condition {
                        self.list(cond, depth, via)?;
                    }
                    self.list(&e.body, depth, via)?;
                }
                Ok(())
            }
            C::WhileClause(w) | C::UntilClause(w) => {
                self.list(&w.0, depth, via)?;
                self.list(&w.1.list, depth, via)
            }
            C::Coprocess(c) => self.command(&c.body, depth, via),
        }
    }

    /// Walks a redirection's words; gives the text a here-document or
    /// here-string feeds to the command's input.
    fn redirect(
        &mut self,
        r: &ast::IoRedirect,
        depth: usize,
        via: &[String],
    ) -> Result<Option<Resolved>, Error> {
        match r {
            ast::IoRedirect::File(_, _, target) => match target {
                ast::IoFileRedirectTarget::Filename(w)
                | ast::IoFileRedirectTarget::Duplicate(w) => {
                    self.word(&w.value, depth, via)?;
                    Ok(None)
                }
                ast::IoFileRedirectTarget::Fd(_) => Ok(None),
                ast::IoFileRedirectTarget::ProcessSubstitution(_, s) => {
                    self.list(&s.list, depth + 1, via)?;
                    Ok(None)
                }
            },
            ast::IoRedirect::HereDocument(_, h) => {
                if !h.requires_expansion {
                    return Ok(Some(Resolved {
                        text: h.doc.value.clone(),
                        literal: true,
                    }));
                }
                let pieces = brush_parser::word::parse_heredoc(&h.doc.value, &options())
                    .map_err(|e| Error::Syntax(e.to_string()))?;
                self.pieces(&h.doc.value, &pieces, true, depth, via)
                    .map(Some)
            }
            ast::IoRedirect::HereString(_, w) => self.word(&w.value, depth, via).map(Some),
            ast::IoRedirect::OutputAndError(w, _) => {
                self.word(&w.value, depth, via)?;
                Ok(None)
            }
        }
    }

    fn simple(
        &mut self,
        s: &ast::SimpleCommand,
        depth: usize,
        via: &[String],
    ) -> Result<(), Error> {
        use ast::CommandPrefixOrSuffixItem as Item;
        let mut words: Vec<(String, Resolved)> = Vec::new();
        let mut input: Option<Resolved> = None;
        let prefix = s.prefix.iter().flat_map(|p| p.0.iter());
        let suffix = s.suffix.iter().flat_map(|x| x.0.iter());
        let mut walk = |w: &mut Self, item: &Item| -> Result<(), Error> {
            match item {
                Item::IoRedirect(r) => {
                    if let Some(text) = w.redirect(r, depth, via)? {
                        input = Some(text);
                    }
                }
                Item::Word(word) => {
                    let r = w.word(&word.value, depth, via)?;
                    words.push((word.value.clone(), r));
                }
                Item::AssignmentWord(a, _) => match &a.value {
                    ast::AssignmentValue::Scalar(v) => {
                        w.word(&v.value, depth, via)?;
                    }
                    ast::AssignmentValue::Array(items) => {
                        for (k, v) in items {
                            if let Some(k) = k {
                                w.word(&k.value, depth, via)?;
                            }
                            w.word(&v.value, depth, via)?;
                        }
                    }
                },
                Item::ProcessSubstitution(_, sub) => {
                    w.list(&sub.list, depth + 1, via)?;
                    words.push(("<(…)".into(), expanded("<(…)")));
                }
            }
            Ok(())
        };
        for item in prefix {
            walk(self, item)?;
        }
        if let Some(w) = &s.word_or_name {
            walk(self, &Item::Word(w.clone()))?;
        }
        for item in suffix {
            walk(self, item)?;
        }
        let mut words = words.into_iter();
        let Some((raw, program)) = words.next() else {
            // Only assignments or redirections.
            return Ok(());
        };
        let args: Vec<Arg> = words.map(|(_, r)| to_arg(r)).collect();
        self.run(&raw, program, args, input, depth, via)
    }

    /// One command with its words resolved; wrappers and shells are seen
    /// through.
    fn run(
        &mut self,
        raw: &str,
        program: Resolved,
        args: Vec<Arg>,
        input: Option<Resolved>,
        depth: usize,
        via: &[String],
    ) -> Result<(), Error> {
        if !program.literal {
            return Err(Error::Computed(format!(
                "the program \"{raw}\" is computed when the command runs"
            )));
        }
        let program = program.text;
        let name = basename(&program).to_string();
        let mut inner_via = via.to_vec();
        inner_via.push(program.clone());
        match unwrap(&name, &args) {
            Inner::Command(rest) => {
                self.push(&program, &args, via, false)?;
                return self.inner(rest, input, depth, &inner_via);
            }
            Inner::Script(script) => {
                self.push(&program, &args, via, false)?;
                let Some(script) = script else {
                    return Err(Error::Computed(format!(
                        "the script {name} runs is computed when the command runs"
                    )));
                };
                return self.script(&script, depth + 1, &inner_via);
            }
            Inner::Shell { reads_input } => {
                if reads_input && let Some(input) = input {
                    self.push(&program, &args, via, false)?;
                    if !input.literal {
                        return Err(Error::Computed(format!(
                            "the script fed to {name} is computed when the command runs"
                        )));
                    }
                    return self.script(&input.text, depth + 1, &inner_via);
                }
                return self.push(&program, &args, via, true);
            }
            Inner::FindExec(execs) => {
                self.push(&program, &args, via, false)?;
                for rest in execs {
                    self.inner(rest, None, depth, &inner_via)?;
                }
                return Ok(());
            }
            Inner::None => {}
        }
        self.push(&program, &args, via, false)
    }

    /// The command a wrapper runs: its first word is the program.
    fn inner(
        &mut self,
        mut words: Vec<Arg>,
        input: Option<Resolved>,
        depth: usize,
        via: &[String],
    ) -> Result<(), Error> {
        if words.is_empty() {
            return Ok(());
        }
        if depth > MAX_DEPTH || via.len() > MAX_DEPTH * 4 {
            return Err(Error::TooDeep);
        }
        let first = words.remove(0);
        let program = match first {
            Arg::Literal(s) => Resolved {
                text: s,
                literal: true,
            },
            Arg::Expanded(s) => Resolved {
                text: s,
                literal: false,
            },
        };
        let raw = program.text.clone();
        self.run(&raw, program, words, input, depth + 1, via)
    }

    fn push(
        &mut self,
        program: &str,
        args: &[Arg],
        via: &[String],
        hidden_script: bool,
    ) -> Result<(), Error> {
        if self.out.len() >= MAX_COMMANDS {
            return Err(Error::TooMany);
        }
        self.out.push(Command {
            program: program.to_string(),
            args: args.to_vec(),
            via: via.to_vec(),
            hidden_script,
        });
        Ok(())
    }

    /// Resolves one word; every command it runs while expanding is walked.
    fn word(&mut self, w: &str, depth: usize, via: &[String]) -> Result<Resolved, Error> {
        let pieces =
            brush_parser::word::parse(w, &options()).map_err(|e| Error::Syntax(e.to_string()))?;
        self.pieces(w, &pieces, false, depth, via)
    }

    fn pieces(
        &mut self,
        src: &str,
        pieces: &[WordPieceWithSource],
        quoted: bool,
        depth: usize,
        via: &[String],
    ) -> Result<Resolved, Error> {
        let mut out = Resolved {
            text: String::new(),
            literal: true,
        };
        for p in pieces {
            let piece_src = src.get(p.start_index..p.end_index).unwrap_or(src);
            match &p.piece {
                WordPiece::Text(t) => {
                    if !quoted && expands(t) {
                        out.literal = false;
                    }
                    out.text.push_str(t);
                }
                WordPiece::SingleQuotedText(t) => out.text.push_str(t),
                WordPiece::AnsiCQuotedText(_) => {
                    out.literal = false;
                    out.text.push_str(piece_src);
                }
                WordPiece::DoubleQuotedSequence(inner)
                | WordPiece::GettextDoubleQuotedSequence(inner) => {
                    let r = self.pieces(src, inner, true, depth, via)?;
                    out.literal &= r.literal;
                    out.text.push_str(&r.text);
                }
                WordPiece::EscapeSequence(e) => {
                    let c = e.strip_prefix('\\').unwrap_or(e);
                    // Inside double quotes a backslash before another
                    // character stays.
                    if quoted && !matches!(c, "$" | "`" | "\"" | "\\" | "\n") {
                        out.text.push('\\');
                    }
                    if c != "\n" {
                        out.text.push_str(c);
                    }
                }
                WordPiece::TildeExpansion(_) => {
                    out.literal = false;
                    out.text.push_str(piece_src);
                }
                WordPiece::ParameterExpansion(_) => {
                    out.literal = false;
                    if runs_commands(piece_src) {
                        return Err(Error::Computed(format!(
                            "a command substitution inside \"{piece_src}\" cannot be judged"
                        )));
                    }
                    out.text.push_str(piece_src);
                }
                WordPiece::CommandSubstitution(s) | WordPiece::BackquotedCommandSubstitution(s) => {
                    out.literal = false;
                    self.script(s, depth + 1, via)?;
                    out.text.push_str(piece_src);
                }
                WordPiece::ArithmeticExpression(e) => {
                    out.literal = false;
                    arithmetic(&e.value)?;
                    out.text.push_str(piece_src);
                }
            }
        }
        Ok(out)
    }
}

fn expanded(s: &str) -> Resolved {
    Resolved {
        text: s.to_string(),
        literal: false,
    }
}

fn to_arg(r: Resolved) -> Arg {
    if r.literal {
        Arg::Literal(r.text)
    } else {
        Arg::Expanded(r.text)
    }
}

/// Unquoted text the shell would expand: globs and brace expansion.
fn expands(t: &str) -> bool {
    t.contains(['*', '?', '[']) || (t.contains('{') && (t.contains(',') || t.contains("..")))
}

/// Text that would run a command when the shell expands it.
fn runs_commands(t: &str) -> bool {
    t.contains("$(") || t.contains('`') || t.contains("<(") || t.contains(">(")
}

fn arithmetic(e: &str) -> Result<(), Error> {
    if runs_commands(e) {
        return Err(Error::Computed(format!(
            "a command substitution inside the arithmetic \"{e}\" cannot be judged"
        )));
    }
    Ok(())
}

/// What a program runs besides itself.
enum Inner {
    None,
    /// Another command: its words, program first.
    Command(Vec<Arg>),
    /// A script in a string (`sh -c`, `eval`, `watch`, `su -c`); `None`
    /// when the string is computed at run time.
    Script(Option<String>),
    /// A shell with no script string: it reads a file, or its input.
    Shell {
        reads_input: bool,
    },
    /// `find … -exec cmd … ;` (one entry per -exec).
    FindExec(Vec<Vec<Arg>>),
}

const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox", "fish", "rbash",
];

/// Options of a wrapper that take a value (as the next word when not
/// attached).
fn option_values(wrapper: &str) -> &'static [&'static str] {
    match wrapper {
        "sudo" => &[
            "-u",
            "-g",
            "-C",
            "-D",
            "-h",
            "-p",
            "-r",
            "-t",
            "-U",
            "-T",
            "--user",
            "--group",
            "--chdir",
            "--host",
            "--prompt",
            "--role",
            "--type",
            "--other-user",
            "--command-timeout",
            "--close-from",
        ],
        "doas" => &["-u", "-C"],
        "env" => &["-u", "-C", "--unset", "--chdir", "-S", "--split-string"],
        "nice" => &["-n", "--adjustment"],
        "ionice" => &["-c", "-n", "-p", "-P", "-u", "--class", "--classdata"],
        "timeout" => &["-s", "-k", "--signal", "--kill-after"],
        "stdbuf" => &["-i", "-o", "-e", "--input", "--output", "--error"],
        "chroot" => &["--userspec", "--groups"],
        "time" => &["-f", "-o", "--format", "--output"],
        "exec" => &["-a"],
        "xargs" => &[
            "-I",
            "-n",
            "-P",
            "-d",
            "-L",
            "-s",
            "-E",
            "-e",
            "-a",
            "--arg-file",
            "--delimiter",
            "--max-args",
            "--max-procs",
            "--max-lines",
            "--max-chars",
            "--replace",
            "--eof",
            "--process-slot-var",
        ],
        "flock" => &["-w", "-E", "--timeout", "--conflict-exit-code"],
        "taskset" => &[],
        "setsid" | "nohup" | "command" | "builtin" => &[],
        "watch" => &["-n", "-d", "--interval", "-q", "--equexit"],
        "su" | "runuser" => &["-s", "-g", "-G", "--shell", "--group", "--supp-group", "-w"],
        _ => &[],
    }
}

/// Skips a wrapper's options; gives the index of the first word after them.
fn skip_options(wrapper: &str, args: &[Arg]) -> usize {
    let takes = option_values(wrapper);
    let mut i = 0;
    while let Some(a) = args.get(i) {
        let t = a.text();
        if t == "--" {
            return i + 1;
        }
        if !t.starts_with('-') || t == "-" {
            return i;
        }
        let takes_value = if t.starts_with("--") {
            !t.contains('=') && takes.contains(&t)
        } else {
            // getopt: the first letter that takes a value takes the rest of
            // the cluster, or the next word when nothing is left.
            let letters = t.get(1..).unwrap_or_default();
            letters
                .char_indices()
                .find(|(_, c)| takes.iter().any(|o| o.len() == 2 && o.ends_with(*c)))
                .is_some_and(|(at, c)| at + c.len_utf8() == letters.len())
        };
        i += if takes_value { 2 } else { 1 };
    }
    i
}

fn literal_script(a: Option<&Arg>) -> Option<String> {
    a.and_then(Arg::literal).map(str::to_string)
}

fn unwrap(name: &str, args: &[Arg]) -> Inner {
    let rest = |from: usize| Inner::Command(args.get(from..).unwrap_or_default().to_vec());
    match name {
        "sudo" | "doas" => {
            let i = skip_options(name, args);
            // `sudo -s`/`-i` with no command opens a shell.
            rest(i)
        }
        "nohup" | "setsid" | "builtin" | "nice" | "ionice" | "stdbuf" | "exec" | "time"
        | "command" => rest(skip_options(name, args)),
        "env" => {
            let mut i = skip_options(name, args);
            // `env -S 'cmd args'` splits its string like a shell.
            if let Some(pos) = args.iter().position(|a| {
                matches!(a.text(), "-S" | "--split-string") || a.text().starts_with("-S")
            }) && pos < i
            {
                let s = match args.get(pos).map(Arg::text) {
                    Some("-S") | Some("--split-string") => literal_script(args.get(pos + 1)),
                    Some(t) => Some(t.trim_start_matches("-S").to_string()),
                    None => None,
                };
                return Inner::Script(s);
            }
            while args
                .get(i)
                .is_some_and(|a| a.literal().is_some_and(is_assignment))
            {
                i += 1;
            }
            rest(i)
        }
        "timeout" => rest(skip_options(name, args) + 1),
        "chroot" => rest(skip_options(name, args) + 1),
        "taskset" => {
            let i = skip_options(name, args);
            // taskset [-p] MASK cmd …
            rest(i + 1)
        }
        "flock" => {
            let i = skip_options(name, args);
            match args.get(i + 1).map(Arg::text) {
                Some("-c") | Some("--command") => Inner::Script(literal_script(args.get(i + 2))),
                _ => rest(i + 1),
            }
        }
        "xargs" => {
            let i = skip_options(name, args);
            if i >= args.len() {
                // xargs runs echo by default.
                Inner::Command(vec![Arg::Literal("echo".into())])
            } else {
                rest(i)
            }
        }
        "su" | "runuser" => match args
            .iter()
            .position(|a| matches!(a.text(), "-c" | "--command" | "--session-command"))
        {
            Some(p) => Inner::Script(literal_script(args.get(p + 1))),
            None => Inner::Shell { reads_input: false },
        },
        "eval" => {
            let mut s = String::new();
            for a in args {
                match a.literal() {
                    Some(t) => {
                        s.push_str(t);
                        s.push(' ');
                    }
                    None => return Inner::Script(None),
                }
            }
            Inner::Script(Some(s))
        }
        "watch" => {
            let i = skip_options(name, args);
            let words = args.get(i..).unwrap_or_default();
            if words.is_empty() {
                return Inner::None;
            }
            let mut s = String::new();
            for a in words {
                match a.literal() {
                    Some(t) => {
                        s.push_str(t);
                        s.push(' ');
                    }
                    None => return Inner::Script(None),
                }
            }
            Inner::Script(Some(s))
        }
        "find" => {
            let mut execs = Vec::new();
            let mut i = 0;
            while let Some(a) = args.get(i) {
                if matches!(a.text(), "-exec" | "-execdir" | "-ok" | "-okdir") {
                    let start = i + 1;
                    let mut end = start;
                    while args
                        .get(end)
                        .is_some_and(|a| !matches!(a.text(), ";" | "+"))
                    {
                        end += 1;
                    }
                    execs.push(args.get(start..end).unwrap_or_default().to_vec());
                    i = end + 1;
                } else {
                    i += 1;
                }
            }
            if execs.is_empty() {
                Inner::None
            } else {
                Inner::FindExec(execs)
            }
        }
        n if SHELLS.contains(&n) => shell(n, args),
        _ => Inner::None,
    }
}

/// A shell's own invocation: `-c script`, a script file, or its input.
fn shell(name: &str, args: &[Arg]) -> Inner {
    let mut i = 0;
    // busybox sh …
    if name == "busybox" {
        match args.first().map(Arg::text) {
            Some(s) if SHELLS.contains(&s) && s != "busybox" => i = 1,
            _ => return Inner::Command(args.to_vec()),
        }
    }
    let mut wants_script = false;
    while let Some(a) = args.get(i) {
        let t = a.text();
        if t == "--" || t == "-" {
            i += 1;
            break;
        }
        if let Some(flags) = t.strip_prefix('-').or_else(|| t.strip_prefix('+')) {
            if t.starts_with("--") {
                // Long options (--login, --norc, --rcfile FILE).
                if matches!(t, "--rcfile" | "--init-file") {
                    i += 1;
                }
                i += 1;
                continue;
            }
            if flags.contains('c') && t.starts_with('-') {
                wants_script = true;
            }
            // -o OPTION takes a value.
            if flags.contains('o') || flags.contains('O') {
                i += 1;
            }
            i += 1;
            continue;
        }
        break;
    }
    if wants_script {
        return Inner::Script(literal_script(args.get(i)));
    }
    Inner::Shell {
        reads_input: args.get(i).is_none(),
    }
}

fn is_assignment(t: &str) -> bool {
    match t.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests;
