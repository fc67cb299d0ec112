//! SSH path benchmark: 1 GiB through scp (both directions) and through
//! `ssh … cat` (both directions), directly to a real sshd and through the
//! whole gateway path (SSH ingress → server → QUIC → agent → sshd, audit
//! and recording on), interleaved in one run. Prints throughput, the ratio
//! to direct, the gateway's CPU time per GiB (server and agent) and the
//! largest resident set of each gateway process during the transfer.
//!
//! Run with `bash benches/ssh-path.sh` (builds release binaries first).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_e2e::ssh::SshStack;

const SIZE: u64 = 1 << 30;

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

struct Run {
    secs: f64,
    cpu_ticks: u64,
    /// Largest VmRSS (KiB) of each gateway process while it ran.
    rss_kib: [u64; 2],
}

fn measure(mut cmd: Command, gateway: [u32; 2]) -> Run {
    let before = [cpu_ticks(gateway[0]), cpu_ticks(gateway[1])];
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rss = [0u64; 2];
    loop {
        for (i, pid) in gateway.iter().enumerate() {
            rss[i] = rss[i].max(proc_field(*pid, "status", "VmRSS:"));
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{:?} failed", cmd.get_program());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = [cpu_ticks(gateway[0]), cpu_ticks(gateway[1])];
    Run {
        secs,
        cpu_ticks: (after[0] - before[0]) + (after[1] - before[1]),
        rss_kib: rss,
    }
}

fn main() {
    let s = SshStack::start();
    let server = s.stack.server.child.id();
    let agent = s.stack.agent.as_ref().unwrap().child.id();
    let gateway = [server, agent];
    let tick = 100.0; // USER_HZ on Linux
    let dir = s.stack.tmp.path();
    let file = dir.join("one-gib.bin");
    let st = Command::new("head")
        .args(["-c", &SIZE.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&file).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    // The target reads the same file for downloads.
    let remote = s.sshd.dir.join("one-gib.bin");
    std::fs::copy(&file, &remote).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&remote, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (f, r) = (file.display().to_string(), remote.display().to_string());
    let direct_remote = |p: &str| format!("{}@127.0.0.1:{p}", s.sshd.user);
    let direct_scp = || {
        let mut c = Command::new("scp");
        c.args([
            "-q",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            s.sshd.dir.join("known_hosts").display()
        ))
        .arg("-i")
        .arg(s.sshd.client_key())
        .args(["-P", &s.sshd.port.to_string()]);
        c
    };
    type Make<'a> = Box<dyn Fn(bool) -> Command + 'a>;
    let workloads: Vec<(&str, Make)> = vec![
        (
            "scp upload",
            Box::new(|gw| {
                let mut c = if gw { s.scp() } else { direct_scp() };
                c.arg(&f).arg(if gw {
                    s.remote("/dev/null")
                } else {
                    direct_remote("/dev/null")
                });
                c
            }),
        ),
        (
            "scp download",
            Box::new(|gw| {
                let mut c = if gw { s.scp() } else { direct_scp() };
                c.arg(if gw { s.remote(&r) } else { direct_remote(&r) })
                    .arg("/dev/null");
                c
            }),
        ),
        (
            "ssh cat upload",
            Box::new(|gw| {
                let mut c = if gw { s.ssh() } else { s.sshd.ssh() };
                c.arg("cat > /dev/null")
                    .stdin(std::fs::File::open(&file).unwrap());
                c
            }),
        ),
        (
            "ssh cat download",
            Box::new(|gw| {
                let mut c = if gw { s.ssh() } else { s.sshd.ssh() };
                c.arg(format!("cat {r}")).stdin(Stdio::null());
                c
            }),
        ),
    ];
    println!(
        "1 GiB each, direct vs through the gateway (audit and recording on), one interleaved run"
    );
    println!(
        "{:<18} {:>12} {:>12} {:>8} {:>16} {:>22}",
        "workload",
        "direct MB/s",
        "gateway MB/s",
        "ratio",
        "gw CPU s/GiB",
        "gw peak RSS server/agent"
    );
    for (name, make) in &workloads {
        let d = measure(make(false), gateway);
        let g = measure(make(true), gateway);
        let mbs = |r: &Run| SIZE as f64 / r.secs / 1e6;
        println!(
            "{:<18} {:>12.0} {:>12.0} {:>7.2}x {:>16.2} {:>13} / {} MiB",
            name,
            mbs(&d),
            mbs(&g),
            d.secs / g.secs,
            g.cpu_ticks as f64 / tick,
            g.rss_kib[0] / 1024,
            g.rss_kib[1] / 1024
        );
    }
}
