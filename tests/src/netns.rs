//! A private network behind a MASQUERADE NAT, built from network
//! namespaces, for agents that dial out and are never dialled.
//!
//! ```text
//!  root namespace            router namespace                LAN namespace
//!  wan_host ── veth ── wan_router  [MASQUERADE]  lan_router ── veth ── lan_host
//!  (servers listen here)                                       (agent, target)
//! ```
//!
//! The LAN has a route to the WAN subnet only, through the router, and a
//! blackhole for everything else; the router forwards and masquerades out
//! of its WAN side. The namespaces (and with them the veth pairs) are
//! deleted on drop.

use std::process::Command;

/// The namespaces and addresses of one NAT.
pub struct NatNet {
    pub router_ns: String,
    pub lan_ns: String,
    /// The root namespace's address on the WAN link (servers bind here).
    pub wan_host: String,
    /// The router's outside address: what servers see as the agent's.
    pub wan_router: String,
    /// The agent's address inside the LAN.
    pub lan_host: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NatNet {
    /// Builds the namespaces; fails with the command that did not work.
    pub fn create() -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        let net = 16 + (id % 200);
        let n = Self {
            router_ns: format!("gh-router-{id}"),
            lan_ns: format!("gh-lan-{id}"),
            wan_host: format!("10.231.{net}.1"),
            wan_router: format!("10.231.{net}.2"),
            lan_host: format!("10.232.{net}.2"),
        };
        let lan_router = format!("10.232.{net}.1");
        let (wan_h, wan_r, lan_r, lan_h) = (
            format!("ghw{id}"),
            format!("ghwr{id}"),
            format!("ghlr{id}"),
            format!("ghl{id}"),
        );
        n.teardown();
        let (r, l) = (n.router_ns.as_str(), n.lan_ns.as_str());
        let steps: Vec<Vec<String>> = vec![
            vec!["ip", "netns", "add", r],
            vec!["ip", "netns", "add", l],
            vec![
                "ip", "link", "add", &wan_h, "type", "veth", "peer", "name", &wan_r,
            ],
            vec!["ip", "link", "set", &wan_r, "netns", r],
            vec![
                "ip",
                "addr",
                "add",
                &format!("{}/24", n.wan_host),
                "dev",
                &wan_h,
            ],
            vec!["ip", "link", "set", &wan_h, "up"],
            vec![
                "ip", "link", "add", &lan_r, "netns", r, "type", "veth", "peer", "name", &lan_h,
                "netns", l,
            ],
            vec![
                "ip",
                "-n",
                r,
                "addr",
                "add",
                &format!("{}/24", n.wan_router),
                "dev",
                &wan_r,
            ],
            vec![
                "ip",
                "-n",
                r,
                "addr",
                "add",
                &format!("{lan_router}/24"),
                "dev",
                &lan_r,
            ],
            vec!["ip", "-n", r, "link", "set", &wan_r, "up"],
            vec!["ip", "-n", r, "link", "set", &lan_r, "up"],
            vec!["ip", "-n", r, "link", "set", "lo", "up"],
            vec!["ip", "-n", r, "route", "add", "blackhole", "default"],
            vec![
                "ip",
                "netns",
                "exec",
                r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
            vec![
                "ip",
                "netns",
                "exec",
                r,
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                &wan_r,
                "-j",
                "MASQUERADE",
            ],
            vec![
                "ip",
                "-n",
                l,
                "addr",
                "add",
                &format!("{}/24", n.lan_host),
                "dev",
                &lan_h,
            ],
            vec!["ip", "-n", l, "link", "set", &lan_h, "up"],
            vec!["ip", "-n", l, "link", "set", "lo", "up"],
            vec![
                "ip",
                "-n",
                l,
                "route",
                "add",
                &format!("10.231.{net}.0/24"),
                "via",
                &lan_router,
            ],
            vec!["ip", "-n", l, "route", "add", "blackhole", "default"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            run(&args)?;
        }
        Ok(n)
    }

    /// A command run inside the LAN namespace.
    pub fn in_lan(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.lan_ns]).arg(program);
        c
    }

    /// Forgets every NAT mapping, as a router reboot or a mapping timeout
    /// would: the next packet out gets a fresh one.
    pub fn flush_mappings(&self) -> Result<(), String> {
        run(&["ip", "netns", "exec", &self.router_ns, "conntrack", "-F"])
    }

    fn teardown(&self) {
        for ns in [&self.lan_ns, &self.router_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for NatNet {
    fn drop(&mut self) {
        self.teardown();
    }
}
