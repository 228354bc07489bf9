//! baresip 1.x as a real softphone in tests: a private config directory,
//! no sound card (a sine source and a null sink), a SIP trace in its log.
//!
//! Quirks that shape this file: baresip opens TLS on its SIP port + 1; it
//! colours its log with ANSI codes; it never verifies the server's
//! certificate (so it cannot test Parley's); with stdin closed, the
//! `stdio` module must not be loaded.

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{require_tool, wait_until};

pub struct Baresip {
    pub dir: PathBuf,
    child: Option<Child>,
}

/// Two consecutive ports free for UDP and TCP (baresip uses P and P + 1).
fn free_port_pair() -> u16 {
    for _ in 0..200 {
        let p = super::free_port();
        let Some(next) = p.checked_add(1) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", next)).is_ok()
            && UdpSocket::bind(("127.0.0.1", next)).is_ok()
        {
            return p;
        }
    }
    panic!("no free port pair");
}

impl Baresip {
    /// Starts baresip with one account line (see the accounts file format
    /// of baresip 1.x) in a directory under `parent`.
    pub fn start(parent: &Path, name: &str, account: &str, ca_cert: &Path) -> Baresip {
        require_tool("baresip");
        let dir = parent.join(format!("baresip-{name}"));
        fs::create_dir_all(dir.join("rec")).unwrap();
        let sip_port = free_port_pair();
        let rtp = super::free_port();
        let config = format!(
            "poll_method epoll\n\
             sip_listen 127.0.0.1:{sip_port}\n\
             sip_cafile {ca}\n\
             net_interface 127.0.0.1\n\
             audio_player aubridge,{name}\n\
             audio_alert aubridge,{name}-alert\n\
             audio_source ausine,440\n\
             ausrc_srate 48000\n\
             auplay_srate 48000\n\
             ausrc_channels 2\n\
             auplay_channels 2\n\
             rtp_ports {rtp}-{rtp_hi}\n\
             module_path /usr/lib/baresip/modules\n\
             module g711.so\n\
             module ausine.so\n\
             module aubridge.so\n\
             module srtp.so\n\
             module_tmp uuid.so\n\
             module_tmp account.so\n\
             snd_path {rec}\n\
             statmode_default off\n",
            ca = ca_cert.display(),
            rtp_hi = rtp + 9,
            rec = dir.join("rec").display(),
        );
        fs::write(dir.join("config"), config).unwrap();
        fs::write(dir.join("accounts"), format!("{account}\n")).unwrap();
        fs::write(dir.join("contacts"), "").unwrap();
        let log = fs::File::create(dir.join("out.log")).unwrap();
        let child = Command::new("baresip")
            .arg("-f")
            .arg(&dir)
            .arg("-s")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start baresip");
        Baresip {
            dir,
            child: Some(child),
        }
    }

    /// The log without colour codes.
    pub fn log(&self) -> String {
        let raw = fs::read(self.dir.join("out.log")).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&raw))
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// Kills the process at once (its TLS connection drops without an
    /// unregister, as when a phone loses power).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- baresip {} log ----\n{}",
                self.dir.display(),
                self.log()
            );
        }
        self.kill();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
