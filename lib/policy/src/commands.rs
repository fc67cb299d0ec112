//! SSH command guardrails: an exec line is decided on every simple command
//! a real shell parse finds in it (see `gatehouse-shell`).

use serde::{Deserialize, Serialize};

use crate::doc::{Action, DocError, Hours};
use crate::{RULE_DEFAULT, RULE_UNPARSEABLE, Subject, Verdict};
use gatehouse_shell::{Arg, Command};

/// The `ssh:` section of the policy document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    #[serde(default)]
    pub commands: CommandGuardrails,
    /// Interactive shells: `allow` (the default), `deny`, or `approve`
    /// (the shell waits for a reviewer; a time-bound grant covers later
    /// shells on the target).
    #[serde(default = "allow")]
    pub shell: Action,
    /// Port forwarding a session may use; none by default.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Environment variables a client may pass (globs); by default the
    /// locale (`LANG`, `LC_*`).
    #[serde(default = "default_env")]
    pub env: Vec<String>,
    /// Bytes of each channel's command output the recording keeps; later
    /// output is counted, and the recording says where it was cut.
    /// Terminal sessions are recorded whole.
    #[serde(default = "default_output_cap")]
    pub output_cap_bytes: u64,
    /// Whether SFTP and scp file contents are kept in the recording (by
    /// default only the operations, sizes and SHA-256).
    #[serde(default, skip_serializing_if = "crate::doc::is_false")]
    pub record_file_contents: bool,
    /// A line typed into an interactive shell that the command rules would
    /// refuse or hold: `close` (the default: the shell is closed before the
    /// line reaches it) or `flag` (it runs; its audit event says which rule
    /// it broke). Lines are detected from the terminal (see
    /// ARCHITECTURE.md for what detection cannot see).
    #[serde(default, skip_serializing_if = "TypedCommands::is_default")]
    pub typed_commands: TypedCommands,
    /// The longest an OpenSSH certificate from `gatehouse ssh login` is
    /// valid (`<n><d|h|m|s>`, default 8h); never past the caller's own
    /// access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_ttl: Option<String>,
}

/// What a refused line typed into an interactive shell does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypedCommands {
    #[default]
    Close,
    Flag,
}

impl TypedCommands {
    fn is_default(&self) -> bool {
        *self == Self::Close
    }
}

/// How long a caller's SSH certificate is valid at most, by default.
pub const DEFAULT_CERTIFICATE_TTL: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

impl Default for Ssh {
    fn default() -> Self {
        Self {
            commands: CommandGuardrails::default(),
            shell: Action::Allow,
            forwarding: Forwarding::default(),
            env: default_env(),
            output_cap_bytes: default_output_cap(),
            record_file_contents: false,
            typed_commands: TypedCommands::Close,
            certificate_ttl: None,
        }
    }
}

/// Which forwarding requests are allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forwarding {
    /// `ssh -L`: connections from the client to `host:port` as the target
    /// sees them; `local_to` lists the allowed `host:port` globs (empty:
    /// any, when `local` is set).
    #[serde(default, skip_serializing_if = "crate::doc::is_false")]
    pub local: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_to: Vec<String>,
    /// `ssh -R`: ports the target listens on for the client.
    #[serde(default, skip_serializing_if = "crate::doc::is_false")]
    pub remote: bool,
}

fn default_env() -> Vec<String> {
    vec!["LANG".into(), "LC_*".into()]
}

fn default_output_cap() -> u64 {
    1 << 20
}

impl Ssh {
    /// The longest a caller's SSH certificate may be valid.
    pub fn certificate_ttl(&self) -> std::time::Duration {
        self.certificate_ttl
            .as_deref()
            .and_then(|d| crate::doc::parse_duration(d).ok())
            .unwrap_or(DEFAULT_CERTIFICATE_TTL)
    }

    /// Whether a client may set environment variable `name`.
    pub fn env_allowed(&self, name: &str) -> bool {
        self.env.iter().any(|p| glob(p, name))
    }

    /// Whether a local forward to `host:port` is allowed.
    pub fn local_forward_allowed(&self, host: &str, port: u32) -> bool {
        let to = format!("{host}:{port}");
        self.forwarding.local
            && (self.forwarding.local_to.is_empty()
                || self.forwarding.local_to.iter().any(|p| glob(p, &to)))
    }
}

/// Rules for the commands an SSH exec line runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandGuardrails {
    #[serde(default = "allow")]
    pub default: Action,
    #[serde(default)]
    pub rules: Vec<CommandRule>,
}

impl Default for CommandGuardrails {
    fn default() -> Self {
        Self {
            default: Action::Allow,
            rules: Vec::new(),
        }
    }
}

fn allow() -> Action {
    Action::Allow
}

/// One command guardrail. Every condition that is set must hold; an unset
/// one matches everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRule {
    pub name: String,
    pub action: Action,
    /// Shown to the client with the rule's name when it denies or holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Programs, as globs (`*`, `?`): a pattern without `/` matches the
    /// program's name (`/usr/bin/rm` is `rm`), one with `/` its path as
    /// written. A deny or approve rule also matches the wrappers a command
    /// runs under (`sudo rm` matches `sudo`); an allow rule only the program.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<String>,
    /// Globs that must each match some argument. An argument the shell
    /// expands at run time (a variable, a substitution, a glob) could be
    /// anything: it matches every pattern of a deny or approve rule, and
    /// none of an allow rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Matches only a shell that reads a script the gateway cannot see: from
    /// a pipe (`curl … | sh`) or a file (`bash deploy.sh`).
    #[serde(default, skip_serializing_if = "crate::doc::is_false")]
    pub hidden_script: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<Hours>,
}

impl CommandRule {
    fn matches(&self, c: &Command) -> bool {
        let strict = self.action != Action::Allow;
        let program = self.programs.is_empty()
            || self.programs.iter().any(|p| {
                program_matches(p, &c.program)
                    || (strict && c.via.iter().any(|v| program_matches(p, v)))
            });
        let args = self.args.iter().all(|p| {
            c.args.iter().any(|a| match a {
                Arg::Literal(t) => glob(p, t),
                Arg::Expanded(_) => strict,
            })
        });
        program && args && (!self.hidden_script || c.hidden_script)
    }
}

fn program_matches(pattern: &str, program: &str) -> bool {
    if pattern.contains('/') {
        glob(pattern, program)
    } else {
        glob(pattern, program.rsplit('/').next().unwrap_or(program))
    }
}

/// `*` (any run), `?` (one character) and `[…]`/`[!…]` (one character of
/// a set, or not of it; `a-z` ranges); everything else literal.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => t.get(ti).and_then(|c| class(&p, pi, *c)),
            Some(c) => (Some(c) == t.get(ti)).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                pi += len;
                ti += 1;
            }
            (None, Some((sp, st))) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            (None, None) => return false,
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|c| *c == '*')
}

/// Whether `c` is in the set opening at `p[at]` (`[`); the set's length in
/// the pattern when it is. An unclosed `[` is a literal.
fn class(p: &[char], at: usize, c: char) -> Option<usize> {
    let mut i = at + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let start = i;
    let mut hit = false;
    while let Some(&x) = p.get(i) {
        if x == ']' && i > start {
            return (hit != negate).then_some(i + 1 - at);
        }
        if p.get(i + 1) == Some(&'-')
            && let Some(&hi) = p.get(i + 2)
            && hi != ']'
        {
            hit |= (x..=hi).contains(&c);
            i += 3;
        } else {
            hit |= x == c;
            i += 1;
        }
    }
    (c == '[').then_some(1)
}

pub(crate) fn validate(s: &Ssh) -> Result<(), DocError> {
    if let Some(d) = &s.certificate_ttl {
        crate::doc::parse_duration(d)
            .map_err(|m| DocError::Ssh(format!("certificate_ttl: {m}")))?;
    }
    let mut names = std::collections::HashSet::new();
    for (i, r) in s.commands.rules.iter().enumerate() {
        let err = |m: String| DocError::CommandRule {
            index: i + 1,
            message: m,
        };
        if r.name.trim().is_empty() {
            return Err(err("a rule needs a name".into()));
        }
        if !names.insert(r.name.as_str()) {
            return Err(err(format!("rule name \"{}\" is used twice", r.name)));
        }
        if r.programs.iter().chain(&r.args).any(String::is_empty) {
            return Err(err(format!(
                "rule \"{}\": an empty program or argument pattern",
                r.name
            )));
        }
        if let Some(h) = &r.hours {
            crate::doc::check_hours(h).map_err(|m| err(format!("rule \"{}\": {m}", r.name)))?;
        }
    }
    Ok(())
}

/// The decision on one SSH exec line: each command in it is decided by the
/// first rule that matches it (or the default), and the strictest of those
/// decides. A line without a static reading is denied.
pub fn judge_command(doc: &crate::PolicyDoc, who: &Subject, now_ms: i64, line: &str) -> Verdict {
    let default = CommandGuardrails::default();
    let g = doc.ssh.as_ref().map_or(&default, |s| &s.commands);
    let cmds = match gatehouse_shell::commands(line) {
        Ok(c) => c,
        Err(e) => {
            return Verdict {
                action: Action::Deny,
                rule: RULE_UNPARSEABLE.into(),
                message: format!("{e}; only commands the gateway can read are run"),
            };
        }
    };
    let applies: Vec<&CommandRule> = g
        .rules
        .iter()
        .filter(|r| {
            crate::subject_in(&r.identities, &r.groups, &r.targets, who)
                && crate::hours_match(&r.hours, now_ms)
        })
        .collect();
    let mut worst: Option<Verdict> = None;
    for c in &cmds {
        let v = match applies.iter().find(|r| r.matches(c)) {
            Some(r) => Verdict {
                action: r.action,
                rule: r.name.clone(),
                message: r.message.clone().unwrap_or_else(|| {
                    format!("`{}` matched rule \"{}\"", bounded(&c.display()), r.name)
                }),
            },
            None => Verdict {
                action: g.default,
                rule: RULE_DEFAULT.into(),
                message: format!("`{}` is not allowed by any rule", bounded(&c.display())),
            },
        };
        crate::keep_strictest(&mut worst, v);
    }
    worst.unwrap_or_else(|| Verdict {
        action: g.default,
        rule: RULE_DEFAULT.into(),
        message: "the command line runs nothing".into(),
    })
}

fn bounded(s: &str) -> String {
    let mut out: String = s.chars().flat_map(char::escape_default).take(120).collect();
    if s.chars().flat_map(char::escape_default).nth(120).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("mkfs*", "mkfs.ext4"));
        assert!(glob("-*r*", "-rf"));
        assert!(glob("-*r*", "-fr"));
        assert!(!glob("-*r*", "-f"));
        assert!(glob("/etc/shadow*", "/etc/shadow-"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*.sh", "x.sh"));
        assert!(!glob("*.sh", "x.shx"));
        assert!(glob("-[ce]*", "-c"));
        assert!(glob("-[!-]*[ce]*", "-Bc"));
        assert!(!glob("-[!-]*[ce]*", "--version"));
        assert!(!glob("-[ce]*", "--version"));
        assert!(glob("[a-c]x", "bx"));
        assert!(!glob("[!a-c]x", "bx"));
        assert!(glob("[x", "[x"));
    }

    /// The corpus: `allow|deny|approve <TAB> line`, `@M@` a marker path the
    /// line would create (or keep) if it ran.
    #[test]
    fn the_command_corpus_has_the_expected_decisions() {
        let doc =
            crate::PolicyDoc::from_yaml(include_str!("../testdata/ssh-commands.yaml")).unwrap();
        let who = Subject::default();
        let mut failures = Vec::new();
        let mut n = 0;
        for (no, line) in include_str!("../testdata/ssh-commands.tsv")
            .lines()
            .enumerate()
        {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (want, cmd) = line.split_once('\t').unwrap();
            let cmd = cmd.replace("\\n", "\n").replace("@M@", "/tmp/marker");
            let v = judge_command(&doc, &who, 0, &cmd);
            n += 1;
            if v.action.as_str() != want {
                failures.push(format!("line {}: {cmd:?}: want {want}, got {v:?}", no + 1));
            }
        }
        assert!(n >= 80, "the corpus holds {n} lines");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn no_ssh_section_allows_what_parses_and_denies_what_does_not() {
        let doc = crate::PolicyDoc::default();
        let who = Subject::default();
        assert_eq!(
            judge_command(&doc, &who, 0, "rm -rf /tmp/x").action,
            Action::Allow
        );
        let v = judge_command(&doc, &who, 0, "echo 'unterminated");
        assert_eq!(
            (v.action, v.rule.as_str()),
            (Action::Deny, RULE_UNPARSEABLE)
        );
    }

    #[test]
    fn the_readme_example_is_a_valid_document_and_decides_as_it_says() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("ssh:\n  commands:").unwrap();
        let end = start + readme[start..].find("```").unwrap();
        let doc = crate::PolicyDoc::from_yaml(&readme[start..end]).unwrap();
        let who = Subject::default();
        let judge = |l: &str| judge_command(&doc, &who, 0, l);
        assert_eq!(judge("sudo rm -rf /srv/x").rule, "no-recursive-delete");
        assert_eq!(judge("curl -fsS https://x | sh").rule, "no-pipe-to-shell");
        assert_eq!(judge("kill -9 1").action, Action::Approve);
        assert_eq!(judge("$X -rf /").rule, RULE_UNPARSEABLE);
        assert_eq!(judge("rm $FLAGS /srv/x").action, Action::Deny);
        assert_eq!(judge("ls -l /srv").action, Action::Allow);
    }

    #[test]
    fn rules_are_validated() {
        let bad = "ssh:\n  commands:\n    rules:\n      - {name: a, action: deny}\n      - {name: a, action: deny}\n";
        assert!(
            crate::PolicyDoc::from_yaml(bad)
                .unwrap_err()
                .to_string()
                .contains("used twice")
        );
        let bad = "ssh:\n  commands:\n    rules:\n      - {name: a, action: deny, prgrams: [rm]}\n";
        assert!(crate::PolicyDoc::from_yaml(bad).is_err());
    }
}
