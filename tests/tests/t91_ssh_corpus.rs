//! The SSH command corpus (`lib/policy/testdata/ssh-commands.tsv`) run as
//! written against a real sshd, without the gateway, shows the corpus is
//! honest: every line that must be refused creates its marker when it does
//! run (unless bash itself rejects its syntax), so a marker that stays
//! absent behind the gateway proves the refusal, not a broken line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gatehouse_cli::sshd::LocalSshd;

/// Runs `line` on the target through real ssh; (exit status, stderr), with
/// the status `None` when it ran past its deadline and was stopped.
fn run(sshd: &LocalSshd, line: &str) -> (Option<i32>, String) {
    let mut child = sshd
        .ssh()
        .arg("--")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

#[test]
fn every_refused_corpus_line_leaves_its_marker_when_run_directly() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = LocalSshd::start().unwrap();
    // The target really is this sshd, logged in as its user.
    let out = sshd.ssh().arg("id -un").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sshd.user);

    let markers = sshd.dir.join("markers");
    std::fs::create_dir(&markers).unwrap();
    std::fs::set_permissions(&markers, std::fs::Permissions::from_mode(0o777)).unwrap();
    let corpus = include_str!("../../lib/policy/testdata/ssh-commands.tsv");
    let mut problems = Vec::new();
    let (mut refused, mut syntax) = (0, 0);
    for (no, entry) in corpus.lines().enumerate() {
        if entry.starts_with('#') || entry.trim().is_empty() {
            continue;
        }
        let (want, line) = entry.split_once('\t').unwrap();
        let marker = markers.join(format!("m{}", no + 1));
        let line = line
            .replace("\\n", "\n")
            .replace("@M@", &marker.display().to_string());
        let (status, err) = run(&sshd, &line);
        if status == Some(255) {
            problems.push(format!("line {}: ssh failed: {err}", no + 1));
            continue;
        }
        if want == "allow" {
            continue;
        }
        refused += 1;
        if status == Some(2) && (err.contains("syntax error") || err.contains("unexpected EOF")) {
            syntax += 1;
            assert!(!Path::new(&marker).exists());
            continue;
        }
        if !marker.exists() {
            problems.push(format!(
                "line {}: ran directly ({status:?}) without creating its marker: {line:?} {err}",
                no + 1
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The corpus refuses most of its lines; a handful are syntax errors
    // bash refuses too.
    assert!(refused >= 60, "{refused} refused lines");
    assert!((1..=5).contains(&syntax), "{syntax} syntax errors");
}
