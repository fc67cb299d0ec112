//! A throwaway OpenSSH server from the machine's `sshd`, on loopback, for
//! the tests and the SSH demo target. Its one login is an unprivileged
//! user: ourselves, or, when we are root, the `gatehouse-demo` system user
//! the project's dependency script creates. Started by root, the server
//! itself runs as root (with privilege separation) so that terminals work:
//! an sshd that is not root cannot hand out a pty (it must chown the tty
//! and write login records), so started by anyone else it serves commands
//! and file transfers only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The only login a root-started server accepts.
pub const DEMO_USER: &str = "gatehouse-demo";

/// A running server; stopped on drop.
pub struct LocalSshd {
    pub dir: PathBuf,
    pub port: u16,
    /// The one login the server accepts.
    pub user: String,
    /// Its host public key, as an OpenSSH public-key line.
    pub host_key: String,
    child: Child,
}

/// `/usr/sbin/sshd` (or `$SSHD`), when the machine has OpenSSH's server.
pub fn find_sshd() -> Option<PathBuf> {
    let p = std::env::var_os("SSHD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/sshd"));
    p.exists().then_some(p)
}

fn keygen(path: &Path, comment: &str) -> anyhow::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (install openssh-client)")?;
    anyhow::ensure!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl LocalSshd {
    /// Starts sshd on a free loopback port in a fresh directory under the
    /// system temp dir, accepting the key pair it makes (`client_key`)
    /// for [`LocalSshd::user`]. The directory is removed when it stops.
    pub fn start() -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let sshd = find_sshd().context("no sshd found (install openssh-server)")?;
        let root = crate::postgres::is_root();
        let user = if root {
            DEMO_USER.to_string()
        } else {
            std::env::var("USER").context("USER is not set")?
        };
        let dir = std::env::temp_dir().join(format!(
            "gatehouse-sshd-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        keygen(&dir.join("host_ed25519"), "gatehouse-demo-host")?;
        keygen(&dir.join("client_ed25519"), "gatehouse-demo-client")?;
        let client_pub = std::fs::read_to_string(dir.join("client_ed25519.pub"))?;
        std::fs::write(dir.join("authorized_keys"), &client_pub)?;
        let host_key = std::fs::read_to_string(dir.join("host_ed25519.pub"))?
            .trim()
            .to_string();
        let port = crate::postgres::free_port()?;
        let config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/host_ed25519\n\
             PidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             AllowUsers {user}\n\
             UsePAM no\n\
             StrictModes no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin no\n\
             AllowAgentForwarding yes\n\
             X11Forwarding no\n\
             PrintMotd no\n\
             Subsystem sftp internal-sftp\n\
             LogLevel VERBOSE\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("sshd_config"), config)?;
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if root {
            // sshd checks its privilege separation directory even when it
            // will not use it.
            std::fs::create_dir_all("/run/sshd")?;
            let st = Command::new("chown")
                .args(["-R", &format!("{DEMO_USER}:")])
                .arg(&dir)
                .status()?;
            anyhow::ensure!(st.success(), "chown of {} failed", dir.display());
        }
        argv.push(sshd.into_os_string());
        argv.extend(["-D", "-f"].map(Into::into));
        argv.push(dir.join("sshd_config").into_os_string());
        argv.push("-E".into());
        argv.push(dir.join("sshd.log").into_os_string());
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sshd")?;
        // The client's private key stays ours: ssh refuses a key others
        // can read.
        let key = dir.join("client_ed25519");
        if root {
            let st = Command::new("chown").arg("0:0").arg(&key).status()?;
            anyhow::ensure!(st.success(), "chown of {} failed", key.display());
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(
            dir.join("known_hosts"),
            format!("[127.0.0.1]:{port} {host_key}\n"),
        )?;
        let s = Self {
            dir,
            port,
            user,
            host_key,
            child,
        };
        s.wait_ready()?;
        Ok(s)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
        anyhow::bail!("sshd did not start listening: {}", log.trim())
    }

    /// The private key the server accepts for [`LocalSshd::user`].
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_ed25519")
    }

    /// `ssh` to this server with its key and its pinned host key, in batch
    /// mode and with no user configuration; append the command.
    pub fn ssh(&self) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ))
            .arg("-i")
            .arg(self.client_key())
            .args(["-p", &self.port.to_string(), "-l", &self.user, "127.0.0.1"]);
        c
    }
}

impl Drop for LocalSshd {
    fn drop(&mut self) {
        // sshd itself first: a runuser in between does not pass SIGKILL on.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("sshd.pid")) {
            let _ = Command::new("kill")
                .arg(pid.trim())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
