//! Shared by the integration tests: start `parley` on loopback ports in a
//! fresh data directory, run its CLI, read its log, and talk SIP to it.
#![allow(dead_code)]

pub mod baresip;
pub mod capture;
pub mod linphone;
pub mod netns;
pub mod phone;
pub mod twinkle;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The realm the tests configure, so they can compute digests.
pub const REALM: &str = "parley.test";
pub const DOMAIN: &str = "parley.test";

pub struct Parley {
    pub dir: tempfile::TempDir,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: SocketAddr,
    pub https: SocketAddr,
    config: String,
    child: Option<Child>,
    starts: u32,
    /// The network namespace it runs in, if not the test's own.
    netns: Option<String>,
}

/// Ports handed out in this process, so parallel tests never pick the same one.
static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A port free for both UDP and TCP on 127.0.0.1.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let Ok(tcp) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut taken = TAKEN.lock().unwrap();
        if taken.contains(&port) {
            continue;
        }
        taken.push(port);
        return port;
    }
    panic!("no free port");
}

/// Fails with a clear message when a tool the test needs is not installed.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed; scripts/test-all.sh installs every package the tests need"
    );
}

impl Parley {
    /// Starts parley with the test defaults plus `extra` TOML (which may
    /// add keys to [sip] and [security] through the given sections).
    pub fn start(extra: &str) -> Parley {
        Parley::start_on("127.0.0.1", extra)
    }

    /// Starts parley listening on `ip` (`127.0.0.1` or `::1`).
    pub fn start_on(ip: &str, extra: &str) -> Parley {
        Parley::start_in(None, ip, extra)
    }

    /// Starts parley inside network namespace `netns` (made by the test),
    /// listening on `ip` there.
    pub fn start_in(netns: Option<&str>, ip: &str, extra: &str) -> Parley {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let tls_port = free_port();
        let https_port = free_port();
        let addr = |port: u16| -> SocketAddr { SocketAddr::new(ip.parse().unwrap(), port) };
        let mut p = Parley {
            udp: addr(port),
            tcp: addr(port),
            tls: addr(tls_port),
            https: addr(https_port),
            config: test_config(extra),
            dir,
            child: None,
            starts: 0,
            netns: netns.map(str::to_owned),
        };
        p.launch();
        p
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("certs/ca.crt")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("parley-{}.log", self.starts))
    }

    fn launch(&mut self) {
        self.starts += 1;
        let cfg = self.dir.path().join("parley.toml");
        fs::write(&cfg, &self.config).unwrap();
        let log = fs::File::create(self.log_path()).unwrap();
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_parley")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_parley")),
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--sip-udp")
            .arg(self.udp.to_string())
            .arg("--sip-tcp")
            .arg(self.tcp.to_string())
            .arg("--sip-tls")
            .arg(self.tls.to_string())
            .arg("--https")
            .arg(self.https.to_string())
            .arg("--domain")
            .arg(DOMAIN)
            .env("RUST_LOG", "parley=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start parley");
        self.child = Some(child);
        if !self.wait_log("Parley is ready", Duration::from_secs(30)) {
            panic!("parley did not start:\n{}", self.log());
        }
    }

    /// Stops the server (SIGTERM, as an admin would) and starts it again
    /// on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: sends SIGTERM to our own child process.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Runs `parley ARGS --data-dir DIR`.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(self.dir.path(), args, None)
    }

    /// Adds an extension with the CLI and waits until the running server
    /// has picked it up.
    pub fn add_extension(&self, number: &str, password: &str, encryption: &str) {
        let before = self.log().matches("extensions reloaded").count();
        let out = self.cli(&[
            "extension",
            "add",
            number,
            "--password",
            password,
            "--encryption",
            encryption,
        ]);
        assert!(
            out.status.success(),
            "extension add failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = wait_until(Duration::from_secs(10), || {
            self.log().matches("extensions reloaded").count() > before
        });
        assert!(seen, "the server did not reload its extensions");
    }

    /// The log of the current run.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }
}

impl Drop for Parley {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- parley log ----\n{}", self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the parley CLI against a data directory, with optional stdin.
pub fn cli(data_dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.args(args).arg("--data-dir").arg(data_dir);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("run parley");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The test configuration: our realm, SIPp and baresip 1.x on MD5-only
/// challenges, lockout thresholds low enough to reach in a test.
fn test_config(extra: &str) -> String {
    let mut sip = vec![
        format!("realm = \"{REALM}\""),
        "md5_only_user_agents = [\"SIPp/\", \"baresip v1.\"]".to_string(),
    ];
    let mut security = vec![
        "lockout_extension_failures = 5".to_string(),
        "lockout_source_failures = 40".to_string(),
    ];
    let mut other = String::new();
    let mut section = "";
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = match t {
                "[sip]" => "sip",
                "[security]" => "security",
                _ => {
                    other.push_str(line);
                    other.push('\n');
                    "other"
                }
            };
            continue;
        }
        if t.is_empty() {
            continue;
        }
        let key = t.split('=').next().unwrap_or("").trim();
        let list = match section {
            "sip" => &mut sip,
            "security" => &mut security,
            _ => {
                other.push_str(line);
                other.push('\n');
                continue;
            }
        };
        list.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
        list.push(t.to_string());
    }
    format!(
        "[sip]\n{}\n\n[security]\n{}\n\n{other}",
        sip.join("\n"),
        security.join("\n")
    )
}
