//! SSH through the gateway: a real sshd as the target, the agent holding
//! its key, and OpenSSH's own `ssh`, `scp` and `sftp` as the caller, who
//! authenticates with a Gatehouse credential through `SSH_ASKPASS`.

use std::path::PathBuf;
use std::process::Command;

use gatehouse_cli::sshd::LocalSshd;

use crate::Stack;

/// A stack whose agent also serves SSH target `box` (the sshd), with
/// service account `alice` allowed on both targets.
pub struct SshStack {
    pub stack: Stack,
    pub sshd: LocalSshd,
    /// alice's API key.
    pub key: String,
    askpass: PathBuf,
    known_hosts: PathBuf,
}

impl SshStack {
    pub fn start() -> Self {
        Self::start_opts(&[])
    }

    /// With extra options for the server.
    pub fn start_opts(server_args: &[&str]) -> Self {
        let sshd = LocalSshd::start().unwrap();
        let extra = format!(
            "\n[[targets]]\nname = \"box\"\nkind = \"ssh\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nssh_key_file = \"{}\"\nssh_host_key = \"{}\"\n",
            sshd.port,
            sshd.user,
            sshd.client_key().display(),
            sshd.host_key
        );
        let (stack, key) = Stack::start_opts(false, &extra, server_args);
        stack.cli_ok(&[
            "targets", "create", "box", "--kind", "ssh", "--agent", "edge-1",
        ]);
        stack.cli_ok(&[
            "rules",
            "create",
            "--subject",
            "sa:alice",
            "--target",
            "box",
        ]);
        let askpass = stack.tmp.path().join("askpass.sh");
        crate::write_script(
            &askpass,
            "#!/bin/sh\nprintf '%s\\n' \"$GATEHOUSE_TEST_SSH_TOKEN\"\n",
        );
        let known_hosts = stack.tmp.path().join("gateway_known_hosts");
        Self {
            stack,
            sshd,
            key,
            askpass,
            known_hosts,
        }
    }

    /// Applies a policy document (YAML).
    pub fn apply_policy(&self, yaml: &str) {
        let f = self.stack.tmp.path().join("policy.yaml");
        std::fs::write(&f, yaml).unwrap();
        self.stack
            .cli_ok(&["policy", "apply", "-f", f.to_str().unwrap()]);
    }

    fn port(&self) -> String {
        self.stack.ssh_addr.rsplit_once(':').unwrap().1.to_string()
    }

    /// Options every OpenSSH client here uses: no user configuration, the
    /// gateway's host key learnt on first use into a file of this stack,
    /// the credential from the askpass helper.
    fn common(&self, c: &mut Command, token: &str) {
        c.args(["-F", "/dev/null"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PreferredAuthentications=keyboard-interactive,password",
                "-o",
                "NumberOfPasswordPrompts=1",
                "-o",
                "LogLevel=ERROR",
                // sftp -b asks for batch mode, which would skip the
                // askpass helper; the first value of an option wins.
                "-o",
                "BatchMode=no",
            ])
            .arg("-o")
            .arg(format!("User={}@box", self.sshd.user))
            .env("SSH_ASKPASS", &self.askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .env("GATEHOUSE_TEST_SSH_TOKEN", token);
    }

    /// `ssh` to target `box` through the gateway as alice; append options
    /// and the command.
    pub fn ssh(&self) -> Command {
        self.ssh_as(&self.key)
    }

    pub fn ssh_as(&self, token: &str) -> Command {
        self.ssh_with(token, &[])
    }

    /// `ssh` as [`Self::ssh_as`] with `first` before the common options (an
    /// option's first value wins: `-o LogLevel=INFO`, say).
    pub fn ssh_with(&self, token: &str, first: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(first);
        self.common(&mut c, token);
        c.args(["-p", &self.port()]).arg("127.0.0.1");
        c
    }

    /// A script that runs `ssh` through the gateway as alice with the
    /// rest of its arguments, for programs that take a command line
    /// (tmux).
    pub fn ssh_script(&self) -> PathBuf {
        let c = self.ssh();
        let quote =
            |a: &std::ffi::OsStr| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''"));
        let envs: Vec<String> = c
            .get_envs()
            .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), quote(v?))))
            .collect();
        let args: Vec<String> = c.get_args().map(quote).collect();
        let path = self.stack.tmp.path().join("ssh-gateway.sh");
        crate::write_script(
            &path,
            &format!(
                "#!/bin/sh\nexec env {} ssh \"$@\" {}\n",
                envs.join(" "),
                args.join(" ")
            ),
        );
        path
    }

    /// `scp` through the gateway (append `-O` for the legacy protocol, and
    /// the paths; the remote side is [`SshStack::remote`]).
    pub fn scp(&self) -> Command {
        let mut c = Command::new("scp");
        self.common(&mut c, &self.key);
        c.args(["-q", "-P", &self.port()]);
        c
    }

    /// `sftp` through the gateway in batch mode, reading commands from `batch`.
    pub fn sftp(&self, batch: &std::path::Path) -> Command {
        let mut c = Command::new("sftp");
        self.common(&mut c, &self.key);
        c.args(["-q", "-P", &self.port(), "-b"]).arg(batch);
        c.arg(self.remote(""));
        c
    }

    /// The gateway's side of an scp or sftp path (the login and target
    /// are the `User` option's).
    pub fn remote(&self, path: &str) -> String {
        if path.is_empty() {
            "127.0.0.1".into()
        } else {
            format!("127.0.0.1:{path}")
        }
    }
}
