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

/// What a test baresip plays and how it is driven.
pub struct Options {
    /// Frequency of the sine it sends.
    pub tone_hz: u32,
    /// A ctrl_tcp port (enables control, the menu commands and recording).
    pub ctrl_port: Option<u16>,
    /// The network namespace it runs in (made by the test), and its
    /// address there; the test's own loopback otherwise.
    pub netns: Option<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tone_hz: 440,
            ctrl_port: None,
            netns: None,
        }
    }
}

/// A ctrl_tcp connection: netstring-framed JSON commands and events.
pub struct Control {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
    /// Every event seen so far, as JSON text.
    pub events: Vec<String>,
}

impl Control {
    pub fn connect(port: u16) -> Control {
        Control::connect_to("127.0.0.1".parse().unwrap(), port)
    }

    /// Connects to a baresip in network namespace `ns` at `ip`.
    pub fn connect_in(ns: &str, ip: &str, port: u16) -> Control {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        super::netns::in_netns(ns, move || Control::connect_to(ip, port))
    }

    fn connect_to(ip: std::net::IpAddr, port: u16) -> Control {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::net::TcpStream::connect((ip, port)) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    return Control {
                        stream,
                        buf: Vec::new(),
                        events: Vec::new(),
                    };
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("baresip control port {port}: {e}"),
            }
        }
    }

    pub fn command(&mut self, command: &str, params: &str) {
        use std::io::Write;
        let body = format!("{{\"command\":\"{command}\",\"params\":\"{params}\",\"token\":\"t\"}}");
        let frame = format!("{}:{body},", body.len());
        self.stream.write_all(frame.as_bytes()).unwrap();
    }

    /// Reads until an event containing `needle` arrives (true) or the time
    /// is up (false).
    pub fn wait_event(&mut self, needle: &str, timeout: Duration) -> bool {
        use std::io::Read;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.events.iter().any(|e| e.contains(needle)) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
            while let Some(colon) = self.buf.iter().position(|&b| b == b':') {
                let Some(len) = std::str::from_utf8(&self.buf[..colon])
                    .ok()
                    .and_then(|l| l.parse::<usize>().ok())
                else {
                    self.buf.clear();
                    break;
                };
                if self.buf.len() < colon + 1 + len + 1 {
                    break;
                }
                let msg =
                    String::from_utf8_lossy(&self.buf[colon + 1..colon + 1 + len]).into_owned();
                self.buf.drain(..colon + 1 + len + 1);
                if msg.contains("\"event\"") {
                    self.events.push(msg);
                }
            }
        }
    }
}

/// A recorded call: mono 16-bit PCM samples of a WAV file written by
/// baresip's sndfile module.
pub fn wav_samples(path: &Path) -> (u32, Vec<i16>) {
    let bytes = fs::read(path).unwrap();
    assert!(
        bytes.len() > 44 && &bytes[..4] == b"RIFF",
        "{} is not a WAV file",
        path.display()
    );
    let rate = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
    // Find the data chunk.
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        if id == b"data" {
            let data = &bytes[at + 8..(at + 8 + len).min(bytes.len())];
            return (
                rate,
                data.chunks_exact(2)
                    .map(|c| i16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            );
        }
        at += 8 + len + (len & 1);
    }
    panic!("{}: no data chunk", path.display());
}

/// The dominant frequency of a tone (from its zero crossings) and its RMS.
pub fn tone_of(rate: u32, samples: &[i16]) -> (f64, f64) {
    let crossings = samples
        .windows(2)
        .filter(|w| (w[0] < 0) != (w[1] < 0))
        .count();
    let seconds = samples.len() as f64 / f64::from(rate);
    let rms = (samples.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>()
        / samples.len().max(1) as f64)
        .sqrt();
    (crossings as f64 / 2.0 / seconds, rms)
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
        Baresip::start_with(parent, name, account, ca_cert, &Options::default())
    }

    /// Starts baresip with a tone of its own, a control port and call
    /// recording (`sndfile`: what it sends and what it hears, as WAV files
    /// in `DIR/rec`).
    pub fn start_with(
        parent: &Path,
        name: &str,
        account: &str,
        ca_cert: &Path,
        o: &Options,
    ) -> Baresip {
        require_tool("baresip");
        let dir = parent.join(format!("baresip-{name}"));
        fs::create_dir_all(dir.join("rec")).unwrap();
        let sip_port = free_port_pair();
        let rtp = super::free_port();
        let ip = o.netns.as_ref().map_or("127.0.0.1", |(_, ip)| ip.as_str());
        let config = format!(
            "poll_method epoll\n\
             sip_listen {ip}:{sip_port}\n\
             sip_cafile {ca}\n\
             net_interface {ip}\n\
             audio_player aubridge,{name}\n\
             audio_alert aubridge,{name}-alert\n\
             audio_source ausine,{tone}\n\
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
             statmode_default off\n\
             {control}",
            tone = o.tone_hz,
            control = match o.ctrl_port {
                Some(port) => format!(
                    "module sndfile.so\nmodule_app menu.so\nmodule_app ctrl_tcp.so\nctrl_tcp_listen {ip}:{port}\n"
                ),
                None => String::new(),
            },
            ca = ca_cert.display(),
            rtp_hi = rtp + 9,
            rec = dir.join("rec").display(),
        );
        fs::write(dir.join("config"), config).unwrap();
        fs::write(dir.join("accounts"), format!("{account}\n")).unwrap();
        fs::write(dir.join("contacts"), "").unwrap();
        let log = fs::File::create(dir.join("out.log")).unwrap();
        let mut command = match &o.netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "baresip"]);
                c
            }
            None => Command::new("baresip"),
        };
        let child = command
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
