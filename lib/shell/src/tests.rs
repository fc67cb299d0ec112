#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;

/// Each command as `[via>]name arg…`, literal arguments plain and expanded
/// ones in braces.
fn seen(line: &str) -> Vec<String> {
    commands(line)
        .unwrap_or_else(|e| panic!("{line}: {e}"))
        .iter()
        .map(|c| {
            let mut s = String::new();
            for v in &c.via {
                s.push_str(basename(v));
                s.push('>');
            }
            s.push_str(c.name());
            for a in &c.args {
                match a {
                    Arg::Literal(t) => s.push_str(&format!(" {t}")),
                    Arg::Expanded(t) => s.push_str(&format!(" {{{t}}}")),
                }
            }
            if c.hidden_script {
                s.push_str(" [hidden]");
            }
            s
        })
        .collect()
}

#[test]
fn lists_pipes_and_groups_are_walked() {
    assert_eq!(seen("ls -l; uptime"), ["ls -l", "uptime"]);
    assert_eq!(
        seen("true && rm -f x || echo no"),
        ["true", "rm -f x", "echo no"]
    );
    assert_eq!(
        seen("ps aux | grep x | wc -l"),
        ["ps aux", "grep x", "wc -l"]
    );
    assert_eq!(seen("(cd /tmp && rm y)"), ["cd /tmp", "rm y"]);
    assert_eq!(seen("{ id; whoami; }"), ["id", "whoami"]);
    assert_eq!(seen("sleep 1 & kill %1"), ["sleep 1", "kill %1"]);
    assert_eq!(seen("! false"), ["false"]);
}

#[test]
fn control_flow_and_function_bodies_are_walked() {
    assert_eq!(seen("for f in a b; do rm $f; done"), ["rm {$f}"]);
    assert_eq!(
        seen("if test -f x; then cat x; else touch x; fi"),
        ["test -f x", "cat x", "touch x"]
    );
    assert_eq!(
        seen("while read l; do echo $l; done < f"),
        ["read l", "echo {$l}"]
    );
    assert_eq!(seen("case $1 in a) reboot ;; esac"), ["reboot"]);
    assert_eq!(
        seen("f() { shutdown -h now; }; f"),
        ["shutdown -h now", "f"]
    );
    assert_eq!(
        seen("[[ $(id -u) == 0 ]] && echo root"),
        ["id -u", "echo root"]
    );
}

#[test]
fn substitutions_run_their_commands() {
    assert_eq!(seen("echo $(rm -rf /)"), ["rm -rf /", "echo {$(rm -rf /)}"]);
    assert_eq!(seen("echo `reboot`"), ["reboot", "echo {`reboot`}"]);
    assert_eq!(
        seen("echo \"$(cat /etc/shadow)\""),
        ["cat /etc/shadow", "echo {$(cat /etc/shadow)}"]
    );
    assert_eq!(
        seen("diff <(ls a) <(ls b)"),
        ["ls a", "ls b", "diff {<(…)} {<(…)}"]
    );
    assert_eq!(seen("X=$(halt) true"), ["halt", "true"]);
    assert_eq!(seen("cat > $(mktemp)"), ["mktemp", "cat"]);
    assert_eq!(seen("cat <<EOF\n$(poweroff)\nEOF\n"), ["poweroff", "cat"]);
    assert_eq!(seen("cat <<'EOF'\n$(poweroff)\nEOF\n"), ["cat"]);
}

#[test]
fn quoting_is_removed_before_judging() {
    assert_eq!(seen("'r''m' -rf /"), ["rm -rf /"]);
    assert_eq!(seen("\\rm -rf /"), ["rm -rf /"]);
    assert_eq!(seen("\"rm\" \"-rf\" /"), ["rm -rf /"]);
    assert_eq!(seen("r\\m x"), ["rm x"]);
    assert_eq!(seen("/bin/rm x"), ["rm x"]);
    assert_eq!(seen("echo 'a b' \"c d\""), ["echo a b c d"]);
    assert_eq!(
        commands("echo 'a b'").unwrap()[0].args,
        [Arg::Literal("a b".into())]
    );
}

#[test]
fn expansions_are_marked_and_globs_in_quotes_are_not() {
    assert_eq!(seen("rm -rf /*"), ["rm -rf {/*}"]);
    assert_eq!(seen("rm -rf '/*'"), ["rm -rf /*"]);
    assert_eq!(seen("rm ~/x"), ["rm {~/x}"]);
    assert_eq!(seen("cp a{,.bak}"), ["cp {a{,.bak}}"]);
    assert_eq!(seen("echo $((1+2))"), ["echo {$((1+2))}"]);
}

#[test]
fn wrappers_are_seen_through() {
    assert_eq!(seen("sudo rm -rf /"), ["sudo rm -rf /", "sudo>rm -rf /"]);
    assert_eq!(seen("sudo -u root -E rm x")[1], "sudo>rm x");
    assert_eq!(seen("sudo -uroot rm x")[1], "sudo>rm x");
    assert_eq!(seen("sudo -Eu root rm x")[1], "sudo>rm x");
    assert_eq!(seen("env -i A=1 B=2 rm x")[1], "env>rm x");
    assert_eq!(seen("env -S 'rm x'")[1], "env>rm x");
    assert_eq!(seen("nohup reboot &")[1], "nohup>reboot");
    assert_eq!(seen("timeout -s KILL 5 rm x")[1], "timeout>rm x");
    assert_eq!(seen("nice -n 10 ionice -c 3 rm x")[2], "nice>ionice>rm x");
    assert_eq!(seen("exec rm x")[1], "exec>rm x");
    assert_eq!(seen("command rm x")[1], "command>rm x");
    assert_eq!(seen("stdbuf -oL rm x")[1], "stdbuf>rm x");
    assert_eq!(seen("sudo env nohup rm x")[3], "sudo>env>nohup>rm x");
    assert_eq!(seen("ls | xargs -n 1 rm")[2], "xargs>rm");
    assert_eq!(seen("ls | xargs")[2], "xargs>echo");
    assert_eq!(
        seen("find / -name x -exec rm {} \\; -exec ls {} +"),
        [
            "find / -name x -exec rm {} ; -exec ls {} +",
            "find>rm {}",
            "find>ls {}"
        ]
    );
    assert_eq!(seen("flock /tmp/l -c 'rm x'")[1], "flock>rm x");
}

#[test]
fn scripts_handed_to_shells_are_parsed() {
    assert_eq!(seen("sh -c 'rm -rf /'")[1], "sh>rm -rf /");
    assert_eq!(
        seen("bash -lc \"reboot; ls\"")[1..],
        ["bash>reboot", "bash>ls"]
    );
    assert_eq!(
        seen("sudo bash -c 'sh -c \"halt\"'")[3],
        "sudo>bash>sh>halt"
    );
    assert_eq!(seen("eval 'rm' '-rf' '/'")[1], "eval>rm -rf /");
    assert_eq!(seen("su -c 'rm x' root")[1], "su>rm x");
    assert_eq!(seen("watch -n 1 'rm x'")[1], "watch>rm x");
    assert_eq!(seen("bash <<EOF\nrm x\nEOF\n")[1], "bash>rm x");
    assert_eq!(seen("bash <<< 'rm x'")[1], "bash>rm x");
    assert_eq!(seen("busybox sh -c 'rm x'")[1], "busybox>rm x");
}

#[test]
fn shells_reading_what_the_gateway_cannot_see_are_marked() {
    assert_eq!(seen("curl http://x | sh"), ["curl http://x", "sh [hidden]"]);
    assert_eq!(seen("bash ./deploy.sh"), ["bash ./deploy.sh [hidden]"]);
    assert_eq!(seen("sudo -s")[0], "sudo -s");
    assert_eq!(seen("bash -c ls")[1], "bash>ls");
}

#[test]
fn what_cannot_be_known_statically_is_an_error() {
    for line in [
        "$CMD -rf /",
        "$(echo rm) -rf /",
        "`echo rm` x",
        "/bin/r? x",
        "{rm,-rf,/}",
        "$'\\x72m' x",
        "eval \"$X\"",
        "sh -c \"$X\"",
        "sudo $CMD",
        "echo ${X:-$(rm -rf /)}",
        "echo $(( $(id -u) + 1 ))",
    ] {
        assert!(
            matches!(commands(line), Err(Error::Computed(_))),
            "{line}: {:?}",
            commands(line)
        );
    }
}

#[test]
fn malformed_and_oversized_lines_are_refused() {
    for line in [
        "echo 'unterminated",
        "if true; then",
        "(ls",
        "ls |",
        "echo $(ls",
    ] {
        assert!(
            matches!(commands(line), Err(Error::Syntax(_))),
            "{line}: {:?}",
            commands(line)
        );
    }
    assert_eq!(commands(&"a".repeat(MAX_LINE + 1)), Err(Error::TooLong));
    let nested = (0..4).fold("id".to_string(), |s, _| format!("sh -c {}", quote(&s)));
    assert_eq!(seen(&nested).last().unwrap(), "sh>sh>sh>sh>id");
    let nested = (0..MAX_DEPTH + 2).fold("id".to_string(), |s, _| format!("echo $({s})"));
    assert_eq!(commands(&nested), Err(Error::TooDeep));
    assert_eq!(
        commands(&"true;".repeat(MAX_COMMANDS + 1)),
        Err(Error::TooMany)
    );
    assert_eq!(commands("").unwrap(), []);
    assert_eq!(commands("X=1").unwrap(), []);
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A deterministic spread of short inputs over shell metacharacters.
    let alphabet: Vec<char> = "a$(){}[]'\"`\\|&;<>*?~=# \n\t-!%^,.0".chars().collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        let mut s = String::new();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 24) as usize;
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push(alphabet[(x % alphabet.len() as u64) as usize]);
        }
        let _ = commands(&s);
    }
}
