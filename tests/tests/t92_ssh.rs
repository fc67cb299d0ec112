//! SSH through the gateway with OpenSSH's own clients against a real sshd:
//! exec semantics (exit status, signals, stdout and stderr apart), the
//! command guardrails on the corpus with markers proving refusals, held
//! commands and approvals, file transfers with scp (both protocols) and
//! sftp, forwarding, and the evidence each leaves. The target's key never
//! reaches the client, the recordings, the audit log or the logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use gatehouse_e2e::ssh::SshStack;
use gatehouse_e2e::{read_tree, wait_until};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `line` through the gateway with a deadline.
fn exec(s: &SshStack, line: &str) -> Output {
    let child = s
        .ssh()
        .arg("--")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
            panic!("{line:?} did not finish within 30 s");
        }
    }
}

/// The recordings of every session so far, as text.
fn recordings_text(s: &SshStack) -> String {
    let mut all = String::new();
    for (_, bytes) in read_tree(&s.stack.recordings) {
        let plain = zstd::decode_all(bytes.as_slice()).unwrap_or(bytes);
        all.push_str(&String::from_utf8_lossy(&plain));
    }
    all
}

/// The terminal input a recording holds, in order, as text.
fn terminal_input(recorded: &str) -> String {
    fn walk(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("type").and_then(|t| t.as_str()) == Some("terminal_input") {
                    out.push_str(m.get("data").and_then(|d| d.as_str()).unwrap_or(""));
                }
                m.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = String::new();
    for line in recorded.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            walk(&v, &mut out);
        }
    }
    out
}

fn private_key_body(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_string)
        .collect()
}

#[test]
fn exec_keeps_exit_status_signals_and_streams_apart_and_leaves_evidence() {
    let s = SshStack::start();
    // Who runs the command: the target's user, logged in by the agent.
    let out = exec(&s, "id -un");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), s.sshd.user);

    let out = exec(&s, "exit 7");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));

    // A stock OpenSSH client gets AES-GCM from the gateway (its own order
    // puts ChaCha20 and AES-CTR with an HMAC first, both dearer per byte).
    let out = s
        .ssh_with(&s.key, &["-o", "LogLevel=DEBUG1"])
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = text(&out.stderr);
    assert!(
        log.contains("kex: server->client cipher: aes128-gcm@openssh.com")
            && log.contains("kex: client->server cipher: aes128-gcm@openssh.com"),
        "{log}"
    );

    let out = exec(&s, "echo to-out; echo to-err >&2; exit 3");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert_eq!(text(&out.stderr), "to-err\n");

    // A command killed by a signal: the client reports it as it does
    // against the target directly.
    let direct = s
        .sshd
        .ssh()
        .arg("kill -TERM $$")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let through = exec(&s, "kill -TERM $$");
    assert_eq!(through.status.code(), direct.status.code());
    assert_ne!(through.status.code(), Some(0));

    // Big output arrives whole and in order.
    let out = exec(&s, "seq 1 200000");
    assert!(out.status.success());
    let want: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert!(text(&out.stdout) == want, "seq output differs");

    // A wrong credential is refused, and so is a target without a rule.
    let out = s
        .ssh_as("gh_not-a-key")
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    let bob = s.stack.create_account("bob", &["ops"]);
    let out = s
        .ssh_as(&bob)
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("sa:bob may not use a target named \"box\""),
        "{}",
        text(&out.stderr)
    );

    // Evidence: each exec is a command event with its decision, and its
    // end with the exit status; the recording holds the command and its
    // output.
    let events = wait_until("exec events", Duration::from_secs(20), || {
        let ev = s.stack.audit_events(&["--target", "box"]);
        ev.iter()
            .any(|e| {
                e["kind"] == "command"
                    && e["detail"].as_str().unwrap_or("").contains("exit status 7")
            })
            .then_some(ev)
    });
    assert!(
        events.iter().any(|e| e["kind"] == "command"
            && e["statement"] == "exit 7"
            && e["decision"] == "allow")
    );
    assert!(events.iter().any(|e| e["kind"] == "session_start"
        && e["identity"] == "sa:bob"
        && e["decision"] == "deny"));
    let rec = wait_until("recordings", Duration::from_secs(20), || {
        let r = recordings_text(&s);
        r.contains("to-err").then_some(r)
    });
    assert!(
        rec.contains("\"request\":\"exec\",\"detail\":\"echo to-out; echo to-err >&2; exit 3\"")
    );
    assert!(
        rec.contains("\"type\":\"exit\",\"channel\"") || rec.contains("\"status\":3"),
        "{rec}"
    );

    // The target's credential appears nowhere the caller or an auditor
    // looks.
    let secret = private_key_body(&s.sshd.client_key());
    let logs = [
        s.stack.server.log_text(),
        std::fs::read_to_string(s.stack.tmp.path().join("agent.log")).unwrap(),
    ];
    let audit = serde_json::to_string(&s.stack.audit_events(&[])).unwrap();
    for l in &secret {
        assert!(!rec.contains(l.as_str()), "key material in a recording");
        assert!(!audit.contains(l.as_str()), "key material in the audit log");
        for log in &logs {
            assert!(!log.contains(l.as_str()), "key material in a log");
        }
    }
}

/// The command corpus through real ssh exec: each line gets its expected
/// decision, and a refused line's marker proves it never ran (t91 shows
/// each marker does appear when the line runs directly).
#[test]
fn the_command_corpus_is_decided_through_real_ssh_and_refused_lines_never_run() {
    use std::os::unix::fs::PermissionsExt;
    let s = SshStack::start();
    let policy = include_str!("../../lib/policy/testdata/ssh-commands.yaml");
    // Held lines do not wait here: they are refused with the request's id.
    s.apply_policy(&format!("{policy}\napprovals:\n  wait_seconds: 0\n"));
    let markers = s.sshd.dir.join("markers");
    std::fs::create_dir(&markers).unwrap();
    std::fs::set_permissions(&markers, std::fs::Permissions::from_mode(0o777)).unwrap();
    let corpus = include_str!("../../lib/policy/testdata/ssh-commands.tsv");
    let mut problems = Vec::new();
    let (mut allowed, mut refused, mut held) = (0, 0, 0);
    for (no, entry) in corpus.lines().enumerate() {
        if entry.starts_with('#') || entry.trim().is_empty() {
            continue;
        }
        let (want, line) = entry.split_once('\t').unwrap();
        let marker = markers.join(format!("m{}", no + 1));
        let line = line
            .replace("\\n", "\n")
            .replace("@M@", &marker.display().to_string());
        let out = exec(&s, &line);
        let err = text(&out.stderr);
        let code = out.status.code();
        match want {
            "allow" => {
                allowed += 1;
                if code == Some(126) && err.contains("gatehouse:") {
                    problems.push(format!("line {}: refused, expected to run: {err}", no + 1));
                }
            }
            "deny" | "approve" => {
                if code != Some(126) {
                    problems.push(format!(
                        "line {}: exit {code:?}, expected 126: {line:?}",
                        no + 1
                    ));
                }
                let expected = if want == "deny" {
                    refused += 1;
                    "gatehouse: command refused by rule"
                } else {
                    held += 1;
                    "approval requested as request"
                };
                if !err.contains(expected) {
                    problems.push(format!(
                        "line {}: stderr {err:?}, expected {expected:?}",
                        no + 1
                    ));
                }
                if marker.exists() {
                    problems.push(format!(
                        "line {}: refused, but its marker exists: {line:?}",
                        no + 1
                    ));
                }
            }
            other => panic!("unknown decision {other}"),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(allowed + refused + held >= 80);
    assert!(refused >= 60 && held >= 5, "{refused} refused, {held} held");
    // Every refusal is audited with its rule, before anything ran.
    let events = s.stack.audit_events(&["--target", "box"]);
    let refusals = events
        .iter()
        .filter(|e| {
            e["kind"] == "command"
                && e["decision"] == "deny"
                && e["detail"].as_str().unwrap_or("").contains("by rule")
        })
        .count();
    assert!(
        refusals >= refused + held,
        "{refusals} command refusals audited"
    );
}

/// Starts `line` through the gateway and returns the running client and
/// the request id its "waiting for approval" line names.
fn held(
    s: &SshStack,
    line: &str,
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    let mut child = s
        .ssh()
        .arg("--")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    let id = first
        .split("waiting for approval ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no request id in {first:?}"))
        .to_string();
    (child, id, rx)
}

fn finish(mut child: std::process::Child) -> Option<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the held command did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_held_command_runs_once_after_approval_and_a_denied_one_never() {
    use std::os::unix::fs::PermissionsExt;
    let s = SshStack::start();
    s.apply_policy(
        "ssh:\n  commands:\n    rules:\n      - name: appends-need-approval\n        action: approve\n        message: appending needs a reviewer\n        programs: [tee]\napprovals:\n  wait_seconds: 60\n  approver_groups: [reviewers]\n",
    );
    let bob = s.stack.create_account("bob", &["reviewers"]);
    s.stack
        .cli_ok(&["roles", "grant", "reviewer", "group:reviewers"]);
    let dir = s.sshd.dir.join("approved");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let count = dir.join("count");
    let line = format!("echo ran | tee -a {}", count.display());

    let (child, id, _err) = held(&s, &line);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!count.exists(), "the held command ran before its approval");
    let ok = s
        .stack
        .cli_cmd(&bob, &["requests", "approve", &id, "--reason", "checked"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(finish(child), Some(0));
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "ran\n");

    let (child, id, err) = held(&s, &line);
    let no = s
        .stack
        .cli_cmd(&bob, &["requests", "deny", &id, "--reason", "not today"])
        .output()
        .unwrap();
    assert!(no.status.success(), "{no:?}");
    assert_eq!(finish(child), Some(126));
    let rest: Vec<String> = err.iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("was denied by sa:bob: not today")),
        "{rest:?}"
    );
    // Still one line: the approved run happened once, the denied one never.
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "ran\n");
}

fn sha256_file(p: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .unwrap();
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// 100 MiB each way with scp (the SFTP protocol and the legacy one) and
/// sftp: equal hashes on both ends, and the recording and audit log name
/// each file with its size and SHA-256.
#[test]
fn scp_in_both_modes_and_sftp_move_files_whole_and_name_them_in_the_evidence() {
    use std::os::unix::fs::PermissionsExt;
    let s = SshStack::start();
    let local = s.stack.tmp.path().join("files");
    std::fs::create_dir(&local).unwrap();
    let remote = s.sshd.dir.join("files");
    std::fs::create_dir(&remote).unwrap();
    std::fs::set_permissions(&remote, std::fs::Permissions::from_mode(0o777)).unwrap();
    let src = local.join("up.bin");
    let st = std::process::Command::new("head")
        .args(["-c", "104857600", "/dev/urandom"])
        .stdout(std::fs::File::create(&src).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let want = sha256_file(&src);
    let size = std::fs::metadata(&src).unwrap().len();
    let mut names = Vec::new();
    for (mode, legacy) in [("sftp-mode", false), ("legacy", true)] {
        let up = remote.join(format!("{mode}-up.bin"));
        let mut c = s.scp();
        if legacy {
            c.arg("-O");
        }
        let out = c
            .arg(&src)
            .arg(s.remote(up.to_str().unwrap()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "scp {mode} up: {}", text(&out.stderr));
        assert_eq!(sha256_file(&up), want, "scp {mode} up");
        let down = local.join(format!("{mode}-down.bin"));
        let mut c = s.scp();
        if legacy {
            c.arg("-O");
        }
        let out = c
            .arg(s.remote(up.to_str().unwrap()))
            .arg(&down)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scp {mode} down: {}",
            text(&out.stderr)
        );
        assert_eq!(sha256_file(&down), want, "scp {mode} down");
        names.push(up.display().to_string());
    }
    let up = remote.join("sftp-up.bin");
    let down = local.join("sftp-down.bin");
    let batch = s.stack.tmp.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\nrename {} {}.renamed\n",
            src.display(),
            up.display(),
            up.display(),
            down.display(),
            up.display(),
            up.display()
        ),
    )
    .unwrap();
    let out = s.sftp(&batch).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    assert_eq!(sha256_file(&down), want, "sftp down");
    assert_eq!(sha256_file(&remote.join("sftp-up.bin.renamed")), want);
    names.push(up.display().to_string());

    // Each upload and download is named with its size and hash, in the
    // recording and in the audit log.
    let events = wait_until("file events", Duration::from_secs(30), || {
        let ev = s.stack.audit_events(&["--target", "box"]);
        let n = ev.iter().filter(|e| e["kind"] == "file_transfer").count();
        (n >= 7).then_some(ev)
    });
    for name in &names {
        for op in ["write", "read"] {
            let hit = events.iter().any(|e| {
                e["kind"] == "file_transfer"
                    && e["statement"] == format!("{op} {name}")
                    && e["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains(&format!("{size} bytes")) && d.contains(&want))
            });
            assert!(hit, "no audit event for {op} {name}: {events:#?}");
        }
    }
    assert!(
        events.iter().any(|e| e["kind"] == "file_transfer"
            && e["statement"] == format!("rename {}", up.display()))
    );
    let rec = wait_until("recordings", Duration::from_secs(30), || {
        let r = recordings_text(&s);
        r.contains("sftp-up.bin.renamed").then_some(r)
    });
    for name in &names {
        assert!(
            rec.contains(&format!(
                "\"op\":\"write\",\"path\":\"{name}\",\"bytes\":{size},\"sha256\":\"{want}\""
            )),
            "recording lacks the upload of {name}"
        );
    }
    // File contents are not kept: the recordings are far smaller than
    // what moved.
    let kept: usize = read_tree(&s.stack.recordings)
        .iter()
        .map(|(_, b)| b.len())
        .sum();
    assert!(kept < 4 << 20, "recordings hold {kept} bytes");
}

/// A loopback TCP server that echoes what it reads; its port.
fn echo_server() -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// What a connection to `port` gets back for `msg` (empty when the
/// gateway closes it).
fn through(port: u16, msg: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("forwarded port {port}: {e}"),
        }
    };
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(msg);
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < got.len() {
        match c.read(&mut got[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    got.truncate(n);
    got
}

#[test]
fn forwarding_follows_policy_and_agent_forwarding_is_refused() {
    let s = SshStack::start();
    let allowed = echo_server();
    let other = echo_server();
    s.apply_policy(&format!(
        "ssh:\n  forwarding:\n    local: true\n    local_to: [\"127.0.0.1:{allowed}\"]\n"
    ));
    let (l1, l2) = (gatehouse_e2e::free_port(), gatehouse_e2e::free_port());
    let mut fwd = s
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes"])
        .arg("-L")
        .arg(format!("{l1}:127.0.0.1:{allowed}"))
        .arg("-L")
        .arg(format!("{l2}:127.0.0.1:{other}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(through(l1, &payload), payload, "the allowed forward echoes");
    assert!(
        through(l2, b"hello").is_empty(),
        "the refused forward passed data"
    );
    let _ = fwd.kill();
    let _ = fwd.wait();

    // Remote forwarding is refused.
    let out = s
        .ssh()
        .args(["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"])
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("remote port forwarding failed"),
        "{}",
        text(&out.stderr)
    );

    // Allowed, the target listens, and a connection to its port reaches
    // the client's side.
    s.apply_policy("ssh:\n  forwarding:\n    remote: true\n");
    let back = echo_server();
    let remote = gatehouse_e2e::free_port();
    let mut rfwd = s
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("127.0.0.1:{remote}:127.0.0.1:{back}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let payload2: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        through(remote, &payload2),
        payload2,
        "a connection to the target's port echoes from the client's side"
    );
    let _ = rfwd.kill();
    let _ = rfwd.wait();
    // Port 0: the target chooses, and the client learns which.
    let mut any = s
        .ssh_with(&s.key, &["-o", "LogLevel=INFO"])
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("0:127.0.0.1:{back}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = any.stderr.take().unwrap();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            // "Allocated port N for remote forward to 127.0.0.1:P"
            if let Some(rest) = line.strip_prefix("Allocated port ") {
                let _ = port_tx.send(rest.split(' ').next().unwrap_or("").parse::<u16>());
            }
        }
    });
    let chosen = port_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("ssh names the port the target chose")
        .expect("a port number");
    assert_ne!(chosen, 0);
    assert_eq!(
        through(chosen, b"port zero"),
        b"port zero",
        "the port the target chose forwards to the client's side"
    );
    let _ = any.kill();
    let _ = any.wait();

    // Agent forwarding: the client has an agent and asks; the target gets
    // none.
    let sock = s.stack.tmp.path().join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("ssh-agent", Duration::from_secs(10), || {
        sock.exists().then_some(())
    });
    // Directly, the target would take it: the refusal is the gateway's.
    let direct = s
        .sshd
        .ssh()
        .args(["-o", "BatchMode=yes", "-A"])
        .arg("echo agent=${SSH_AUTH_SOCK:-none}")
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(text(&direct.stdout).starts_with("agent=/"), "{direct:?}");
    let out = s
        .ssh()
        .arg("-A")
        .arg("echo agent=${SSH_AUTH_SOCK:-none}")
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        text(&out.stdout).trim(),
        "agent=none",
        "{}",
        text(&out.stderr)
    );

    let events = wait_until("forward events", Duration::from_secs(20), || {
        let ev = s.stack.audit_events(&["--target", "box"]);
        ev.iter()
            .any(|e| e["kind"] == "forward" && e["decision"] == "deny")
            .then_some(ev)
    });
    assert!(events.iter().any(|e| {
        e["kind"] == "forward"
            && e["decision"] == "allow"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("local forward to 127.0.0.1:{allowed}"))
    }));
    assert!(events.iter().any(|e| {
        e["kind"] == "forward"
            && e["decision"] == "allow"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("200000 bytes in, 200000 bytes out")
    }));
    assert!(events.iter().any(|e| {
        e["kind"] == "forward"
            && e["decision"] == "deny"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("local forward to 127.0.0.1:{other}"))
    }));
    let detail = |e: &serde_json::Value| e["detail"].as_str().unwrap_or("").to_string();
    assert!(events.iter().any(|e| {
        e["kind"] == "forward"
            && e["decision"] == "deny"
            && detail(e).contains("remote forward: the target listens on")
            && detail(e).contains("does not allow it")
    }));
    assert!(events.iter().any(|e| {
        e["kind"] == "forward"
            && e["decision"] == "allow"
            && detail(e).starts_with("remote forward: the target listens on")
            && detail(e).ends_with(&format!(":{remote}"))
    }));
    assert!(events.iter().any(|e| {
        e["kind"] == "forward"
            && e["decision"] == "allow"
            && detail(e).starts_with(&format!(
                "remote forward connection on 127.0.0.1:{remote} from 127.0.0.1:"
            ))
    }));
    let closes = wait_until(
        "both forwards' close events",
        Duration::from_secs(20),
        || {
            let ev = s.stack.audit_events(&["--target", "box"]);
            let n = ev
                .iter()
                .filter(|e| {
                    e["kind"] == "forward"
                        && detail(e).contains("200000 bytes in, 200000 bytes out")
                })
                .count();
            (n >= 2).then_some(n)
        },
    );
    assert_eq!(closes, 2, "one close event per forwarded connection");
    // The recording names the remote forward and its connection.
    wait_until(
        "the remote forward's recording",
        Duration::from_secs(20),
        || {
            let rec = recordings_text(&s);
            (rec.contains("\"tcpip-forward\"") && rec.contains("\"forwarded-tcpip\"")).then_some(())
        },
    );
}

/// tmux on a socket of the test's own.
struct Tmux {
    sock: std::path::PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap();
        text(&out.stdout)
    }

    /// A 100x30 session `gh` that runs ssh through the gateway with a
    /// terminal (after half a second) and then prints its exit status.
    fn start_ssh(&self, script: &std::path::Path) {
        self.run(&[
            "new-session",
            "-d",
            "-s",
            "gh",
            "-x",
            "100",
            "-y",
            "30",
            &format!(
                "sleep 0.5; {} -tt; echo ssh-exited-$?; sleep 30",
                script.display()
            ),
        ]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "gh"])
    }

    fn wait_for(&self, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.screen().contains(what) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what:?} never appeared on the screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// An interactive shell in a real terminal: the prompt and output appear,
/// a window resize reaches the target, and the replay reproduces every
/// byte the client's terminal received.
#[test]
fn an_interactive_shell_under_tmux_resizes_and_replays_byte_for_byte() {
    let s = SshStack::start();
    let script = s.ssh_script();
    let tmux = Tmux {
        sock: s.stack.tmp.path().join("tmux.sock"),
    };
    let raw = s.stack.tmp.path().join("pane.raw");
    // ssh starts once the pane's output is piped to the file.
    tmux.start_ssh(&script);
    tmux.run(&[
        "pipe-pane",
        "-o",
        "-t",
        "gh",
        &format!("cat >> {}", raw.display()),
    ]);
    tmux.wait_for(":~$");
    tmux.run(&["send-keys", "-t", "gh", "echo hi-$((6*7))", "Enter"]);
    tmux.wait_for("hi-42");
    tmux.run(&["resize-window", "-t", "gh", "-x", "120", "-y", "40"]);
    tmux.run(&["send-keys", "-t", "gh", "stty size", "Enter"]);
    tmux.wait_for("40 120");
    // A secret typed at a password prompt (echo off) is not recorded.
    tmux.run(&[
        "send-keys",
        "-t",
        "gh",
        "read -s -p 'Password: ' pw; echo got-${#pw}",
        "Enter",
    ]);
    tmux.wait_for("Password: ");
    tmux.run(&["send-keys", "-t", "gh", "hunter2-xyzzy", "Enter"]);
    tmux.wait_for("got-13");
    tmux.run(&["send-keys", "-t", "gh", "exit", "Enter"]);
    tmux.wait_for("ssh-exited-0");
    // What the pane received from ssh (the pane's own shell printed the
    // last line).
    let all = std::fs::read(&raw).unwrap();
    let seen = all
        .strip_suffix(b"ssh-exited-0\r\n")
        .expect("the pane's last line")
        .to_vec();
    assert!(contains_bytes(&seen, b"hi-42"));

    let sessions: serde_json::Value =
        serde_json::from_str(&s.stack.cli_ok(&["sessions", "list", "-o", "json"])).unwrap();
    let id = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["target"] == "box")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let played = wait_until("the recording", Duration::from_secs(30), || {
        let out = s.stack.cli(&["sessions", "replay", &id, "--speed", "0"]);
        out.status.success().then_some(out.stdout)
    });
    assert!(
        played == seen,
        "the replay differs from what the terminal received:\n{:?}\n{:?}",
        text(&played),
        text(&seen)
    );
    let recorded = recordings_text(&s);
    let typed = terminal_input(&recorded);
    assert!(
        typed.contains("stty size"),
        "keystrokes recorded: {typed:?}"
    );
    assert!(
        typed.contains("*************\r"),
        "the answer to the password prompt is kept as stars: {typed:?}"
    );
    assert!(
        !recorded.contains("hunter2"),
        "the secret typed at the password prompt is in the recording"
    );
    // The window sizes are in the recording, and asciicast players read it.
    let cast = s
        .stack
        .cli_ok(&["sessions", "replay", &id, "--format", "asciicast"]);
    let mut lines = cast.lines();
    let head: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        (
            head["version"].as_i64(),
            head["width"].as_i64(),
            head["height"].as_i64()
        ),
        (Some(2), Some(100), Some(30))
    );
    assert!(
        lines.any(|l| l.contains("\"r\"") && l.contains("120x40")),
        "{cast}"
    );

    // Lines typed into a shell: each is audited (read from the keystrokes
    // or, after history recall, from the echo), and one the command rules
    // refuse closes the shell before its Enter reaches it.
    s.apply_policy(
        "ssh:\n  commands:\n    rules:\n      - {name: no-touch, action: deny, programs: [touch]}\n",
    );
    let marker = format!("/tmp/gatehouse-typed-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    tmux.run(&["kill-session", "-t", "gh"]);
    tmux.start_ssh(&script);
    tmux.wait_for(":~$");
    let typed = "echo typed-$((40+2))";
    tmux.run(&["send-keys", "-t", "gh", typed, "Enter"]);
    tmux.wait_for("typed-42");
    tmux.run(&["send-keys", "-t", "gh", "Up"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tmux.screen().matches(typed).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(50));
    }
    tmux.run(&["send-keys", "-t", "gh", "Enter"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The command line shows `typed-$((40+2))`; its output, `typed-42`.
    while tmux.screen().matches("typed-42").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", tmux.screen());
        std::thread::sleep(Duration::from_millis(50));
    }
    tmux.run(&["send-keys", "-t", "gh", &format!("touch {marker}"), "Enter"]);
    tmux.wait_for("ssh-exited-126");
    assert!(
        tmux.screen().contains("refused by rule \"no-touch\""),
        "{}",
        tmux.screen()
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the refused line ran"
    );
    let events = wait_until("typed-line events", Duration::from_secs(20), || {
        let ev = s.stack.audit_events(&["--target", "box"]);
        ev.iter()
            .any(|e| {
                e["kind"] == "command"
                    && e["decision"] == "deny"
                    && e["statement"] == format!("touch {marker}").as_str()
            })
            .then_some(ev)
    });
    let detail_of = |how: &str| {
        events.iter().any(|e| {
            e["kind"] == "command"
                && e["decision"] == "allow"
                && e["statement"] == typed
                && e["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("typed in an interactive shell ({how})"))
        })
    };
    assert!(detail_of("read from the keystrokes") || detail_of("read from the echo"));
    assert!(
        detail_of("read from the echo"),
        "the recalled line: {events:?}"
    );
    assert!(events.iter().any(|e| {
        e["kind"] == "command"
            && e["statement"] == format!("touch {marker}").as_str()
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("the shell was closed")
    }));
}

fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `gatehouse ssh login` and `gatehouse ssh config`: plain `ssh <target>`
/// with the printed configuration logs in with the certificate and trusts
/// the gateway by its host certificate (no password, no prompt, nothing
/// learnt); an expired certificate, one from another CA and one of a
/// revoked identity are refused, and the refusals are audited.
#[test]
fn ssh_login_certificates_work_with_plain_ssh_and_bad_ones_are_refused() {
    let s = SshStack::start();
    let home = s.stack.tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cli = |args: &[&str]| {
        let out = s
            .stack
            .cli_cmd(&s.key, args)
            .env("HOME", &home)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gatehouse {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    };
    let said = cli(&["ssh", "login"]);
    assert!(said.contains("sa:alice"), "{said}");
    let cert = std::fs::read_to_string(home.join(".ssh/gatehouse-cert.pub")).unwrap();
    assert!(
        cert.starts_with("ssh-ed25519-cert-v01@openssh.com "),
        "{cert}"
    );
    let config = cli(&["ssh", "config"]);
    assert!(config.contains("\nHost box\n"), "{config}");
    let port = s.stack.ssh_addr.rsplit_once(':').unwrap().1;
    assert!(
        config
            .lines()
            .any(|l| l.starts_with("# @cert-authority ")
                && l.contains(&format!("[127.0.0.1]:{port}"))),
        "{config}"
    );
    let config_file = home.join(".ssh/config");
    std::fs::write(&config_file, &config).unwrap();
    let known = home.join(".ssh/gatehouse_known_hosts");
    let known_before = std::fs::read_to_string(&known).unwrap();

    // Plain ssh with that configuration; BatchMode forbids every prompt.
    let plain = |config_file: &Path, line: &str| {
        std::process::Command::new("ssh")
            .arg("-F")
            .arg(config_file)
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .arg("box")
            .arg(line)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = plain(&config_file, "id -un");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), s.sshd.user);
    assert_eq!(
        std::fs::read_to_string(&known).unwrap(),
        known_before,
        "the gateway was trusted by its certificate, nothing learnt"
    );
    // The same configuration with another key and certificate.
    let default_key = home.join(".ssh/gatehouse");
    let config_for = |key: &Path| {
        let c = config
            .replace(
                &format!("IdentityFile {}\n", default_key.display()),
                &format!("IdentityFile {}\n", key.display()),
            )
            .replace(
                &format!("CertificateFile {}-cert.pub", default_key.display()),
                &format!("CertificateFile {}-cert.pub", key.display()),
            );
        assert_ne!(c, config);
        let f = key.with_extension("config");
        std::fs::write(&f, c).unwrap();
        f
    };

    // An expired certificate.
    let short = home.join(".ssh/short");
    cli(&[
        "ssh",
        "login",
        "--ttl",
        "2s",
        "--key-file",
        short.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_secs(4));
    let out = plain(&config_for(&short), "id -un");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );

    // A certificate for the same identity from a CA of the caller's own.
    let forged = s.stack.tmp.path().join("forged");
    std::fs::create_dir_all(&forged).unwrap();
    for name in ["ca", "user"] {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(forged.join(name))
            .status()
            .unwrap();
        assert!(st.success());
    }
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(forged.join("ca"))
        .args(["-I", "sa:alice", "-n", "sa:alice", "-V", "-5m:+1h"])
        .arg(forged.join("user.pub"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = plain(&config_for(&forged.join("user")), "id -un");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));

    // Revoking the identity refuses the certificate it still holds.
    s.stack.cli_ok(&[
        "identities",
        "revoke",
        "sa:alice",
        "--reason",
        "left the team",
    ]);
    let out = plain(&config_file, "id -un");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));

    let events = wait_until("certificate events", Duration::from_secs(20), || {
        let ev = s.stack.audit_events(&[]);
        let detail = |e: &serde_json::Value| e["detail"].as_str().unwrap_or("").to_string();
        let refused = |why: &str| {
            ev.iter().any(|e| {
                e["kind"] == "session_start"
                    && e["decision"] == "deny"
                    && detail(e).contains("SSH certificate")
                    && detail(e).contains(why)
            })
        };
        (refused("not signed by this cluster's SSH CA") && refused("revoked")).then_some(ev)
    });
    assert!(events.iter().any(|e| {
        e["kind"] == "login"
            && e["identity"] == "sa:alice"
            && e["decision"] == "allow"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("SSH certificate serial")
    }));
    assert!(events.iter().any(|e| e["kind"] == "session_start"
        && e["identity"] == "sa:alice"
        && e["decision"] == "allow"
        && e["target"] == "box"));
}

/// Before authentication every SSH stage has the handshake deadline, and
/// the listener the connection caps of the other listeners: a client
/// silent before its version line, one stalled in the key exchange, and a
/// real ssh whose answer to the token prompt comes too late are each
/// closed by the deadline; connections from one address past its cap are
/// turned away at once; ssh from elsewhere keeps working meanwhile.
#[test]
fn ssh_stages_before_authentication_have_deadlines_and_connections_are_capped() {
    let s = SshStack::start_opts(&[
        "--handshake-timeout-secs",
        "2",
        "--max-unauthenticated-per-source",
        "20",
    ]);
    let addr: std::net::SocketAddr = s.stack.ssh_addr.parse().unwrap();
    let ip = |a: &str| a.parse::<std::net::IpAddr>().unwrap();
    let rt = gatehouse_e2e::rt();
    let (silent, in_kex, capped, exec) = rt.block_on(async {
        let silent = tokio::spawn(gatehouse_e2e::stalled(addr, ip("127.0.2.1"), 10, b"", 10));
        let in_kex = tokio::spawn(gatehouse_e2e::stalled(
            addr,
            ip("127.0.2.2"),
            10,
            b"SSH-2.0-stalled\r\n",
            10,
        ));
        let capped = tokio::spawn(gatehouse_e2e::stalled(addr, ip("127.0.2.3"), 30, b"", 30));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut ssh = s.ssh();
        ssh.arg("echo still-served").stdin(Stdio::null());
        let exec = tokio::task::spawn_blocking(move || ssh.output().unwrap());
        (
            silent.await.unwrap(),
            in_kex.await.unwrap(),
            capped.await.unwrap(),
            exec.await.unwrap(),
        )
    });
    assert_eq!(
        text(&exec.stdout),
        "still-served\n",
        "{}",
        text(&exec.stderr)
    );
    let held = |w: &[Duration]| {
        w.iter()
            .filter(|d| **d >= Duration::from_millis(1500) && **d < Duration::from_secs(5))
            .count()
    };
    assert_eq!(
        held(&silent),
        10,
        "silent before the version line: {silent:?}"
    );
    assert_eq!(held(&in_kex), 10, "stalled in the key exchange: {in_kex:?}");
    let turned_away = capped
        .iter()
        .filter(|d| **d < Duration::from_secs(1))
        .count();
    assert_eq!(
        (turned_away, held(&capped)),
        (10, 20),
        "20 held to the deadline, the rest turned away: {capped:?}"
    );
    assert!(
        s.stack
            .server
            .log_text()
            .contains("unauthenticated connections over the limit closed")
    );

    // A real client that answers the token prompt after the deadline.
    let slow = s.stack.tmp.path().join("slow-askpass.sh");
    gatehouse_e2e::write_script(
        &slow,
        "#!/bin/sh\nsleep 4\nprintf '%s\\n' \"$GATEHOUSE_TEST_SSH_TOKEN\"\n",
    );
    let out = s
        .ssh()
        .env("SSH_ASKPASS", &slow)
        .arg("echo logged-in")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("logged-in"));
}
