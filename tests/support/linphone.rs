//! Linphone (`linphone-daemon` from Debian's linphone-cli) as a test phone:
//! TLS with certificate checks, mandatory SDES SRTP, PCMU, driven over
//! the daemon's unix socket.
//!
//! Its quirks, learned the hard way: it never registers unless
//! `$HOME/.local/share/linphone` exists; it checks the server certificate
//! against a DNS name only (so it connects to `localhost`); with no sound
//! card, playback goes to a WAV through ALSA's `file` plugin and *no*
//! capture device is defined (a capture device that returns silence makes
//! it send nothing and grow without bound), and what it sends comes from
//! `incall-player-start`; its statistics events crash it, so they are
//! off; codecs are chosen with commands, not in the config file.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Most address space one daemon may take (a runaway one is stopped).
const MEMORY_LIMIT: u64 = 3 << 30;

pub struct Linphone {
    pub dir: PathBuf,
    socket: PathBuf,
    child: Child,
    conn: Option<UnixStream>,
    /// Every event popped so far.
    pub events: Vec<String>,
}

pub struct LinphoneAccount<'a> {
    pub ext: &'a str,
    pub password: &'a str,
    pub realm: &'a str,
    /// Parley's TLS listener; Linphone connects to it by the name `localhost`.
    pub tls: SocketAddr,
    pub ca_cert: &'a Path,
    /// First of 20 RTP ports of its own.
    pub rtp_base: u16,
}

/// Writes an 8 kHz mono 16-bit WAV holding `secs` of a `hz` tone.
pub fn write_tone_wav(path: &Path, hz: f64, secs: f64) {
    let rate = 8000u32;
    let n = (rate as f64 * secs) as u32;
    let mut data = Vec::with_capacity(n as usize * 2);
    for i in 0..n {
        let v = (8000.0 * (2.0 * std::f64::consts::PI * hz * i as f64 / rate as f64).sin()) as i16;
        data.extend_from_slice(&v.to_le_bytes());
    }
    let mut wav = Vec::new();
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&(rate * 2).to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(&data);
    std::fs::write(path, wav).unwrap();
}

impl Linphone {
    pub fn start(parent: &Path, name: &str, account: &LinphoneAccount) -> Linphone {
        let dir = parent.join(name);
        std::fs::create_dir_all(dir.join(".local/share/linphone")).unwrap();
        let heard = dir.join("heard.wav");
        std::fs::write(
            dir.join(".asoundrc"),
            format!(
                "pcm.!default {{\n  type asym\n  playback.pcm {{\n    type file\n    slave.pcm \"null\"\n    file \"{}\"\n    format \"wav\"\n  }}\n}}\n",
                heard.display()
            ),
        )
        .unwrap();
        let LinphoneAccount {
            ext,
            password,
            realm,
            tls,
            ca_cert,
            rtp_base,
        } = account;
        let dev = "ALSA Unknown: default";
        std::fs::write(
            dir.join("linphonerc"),
            format!(
                "[sip]\nsip_port=0\nsip_tcp_port=0\nsip_tls_port=-1\nroot_ca={ca}\nverify_server_certs=1\n\
                 verify_server_cn=1\nmedia_encryption=srtp\nmedia_encryption_mandatory=1\ndefault_proxy=0\n\
                 [rtp]\naudio_rtp_port={rtp_base}-{rtp_end}\n\
                 [sound]\nechocancellation=0\ntone_indications=0\nplayback_dev_id={dev}\nringer_dev_id={dev}\n\
                 capture_dev_id={dev}\nmedia_dev_id={dev}\n\
                 [video]\ncapture=0\ndisplay=0\nautomatically_initiate=0\nautomatically_accept=0\n\
                 [proxy_0]\nreg_proxy=<sip:localhost:{port};transport=tls>\nreg_identity=\"Ext {ext}\" <sip:{ext}@localhost>\n\
                 reg_expires=600\nreg_sendregister=1\npublish=0\ndial_escape_plus=0\n\
                 [auth_info_0]\nusername={ext}\npasswd={password}\nrealm={realm}\ndomain=localhost\n",
                ca = ca_cert.display(),
                rtp_end = rtp_base + 19,
                port = tls.port(),
            ),
        )
        .unwrap();
        let pipe = format!("parley-lp-{}-{name}-{rtp_base}", std::process::id());
        let socket = PathBuf::from("/tmp").join(&pipe);
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(dir.join("daemon.out")).unwrap();
        let mut cmd = Command::new("linphone-daemon");
        cmd.arg("--config")
            .arg(dir.join("linphonerc"))
            .args(["--pipe", &pipe, "--log"])
            .arg(dir.join("linphone.log"))
            .arg("--disable-stats-events")
            .current_dir(&dir)
            .env("HOME", &dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: MEMORY_LIMIT,
                    rlim_max: MEMORY_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("linphone-daemon runs");
        let mut phone = Linphone {
            dir,
            socket,
            child,
            conn: None,
            events: vec![],
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while phone.conn.is_none() {
            match UnixStream::connect(&phone.socket) {
                Ok(s) => phone.conn = Some(s),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("linphone-daemon socket: {e}\n{}", phone.log()),
            }
        }
        phone
    }

    /// Sends one command; returns the daemon's reply.
    pub fn command(&mut self, command: &str) -> String {
        let conn = self.conn.as_mut().unwrap();
        conn.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(5);
        conn.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(_) if !reply.is_empty() || Instant::now() > deadline => break,
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// Pops events until one contains `needle`.
    pub fn wait_event(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.events.iter().any(|e| e.contains(needle)) {
                return true;
            }
            let reply = self.command("pop-event");
            if reply.contains("Event:") {
                self.events.push(reply);
                continue;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_registered(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .command("register-status 1")
                .contains("LinphoneRegistrationOk")
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Offers PCMU only.
    pub fn pcmu_only(&mut self) {
        self.command("audio-codec-disable ALL");
        let r = self.command("audio-codec-enable PCMU/8000/1");
        assert!(r.contains("Status: Ok"), "{r}");
    }

    /// The id of the last call an event named.
    pub fn last_call_id(&self) -> Option<String> {
        self.events.iter().rev().find_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("Id: ").map(|s| s.trim().to_string()))
        })
    }

    /// What it played out: the far end's audio.
    pub fn heard(&self) -> PathBuf {
        self.dir.join("heard.wav")
    }

    pub fn log(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}\n{}",
            read(self.dir.join("daemon.out")),
            read(self.dir.join("linphone.log"))
        )
    }
}

impl Drop for Linphone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
