//! Twinkle (`twinkle-console`) as a LAN desk phone: UDP or TCP, plain RTP,
//! G.711 µ-law, driven through its standard input.
//!
//! Its quirks: the only arguments it takes are profile names, so every
//! setting is in files under its own HOME; server addresses carry no
//! `sip:` prefix; its voice-activity detection and noise reduction treat a
//! steady tone as noise (turned off). Audio is ALSA only: the microphone is
//! the `file` plugin reading a FIFO that must be written in real time,
//! 320-byte frames every 20 ms, and Twinkle's open of that FIFO blocks its
//! whole SIP stack until a writer is there, so a feeder thread always holds
//! it open (and opens it again after each call). What it plays goes to
//! `speaker.raw` (raw 16-bit 8 kHz), emptied at every new audio session.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct Twinkle {
    pub dir: PathBuf,
    sip_port: u16,
    child: Child,
    stdin: ChildStdin,
    stop: Arc<AtomicBool>,
    feeder: Option<std::thread::JoinHandle<()>>,
}

pub struct TwinkleAccount<'a> {
    pub ext: &'a str,
    pub password: &'a str,
    /// Parley's UDP or TCP address.
    pub server: SocketAddr,
    /// `udp` or `tcp`.
    pub transport: &'a str,
    /// The tone it sends into every call.
    pub tone_hz: f64,
    pub auto_answer: bool,
}

impl Twinkle {
    pub fn start(parent: &Path, name: &str, account: &TwinkleAccount) -> Twinkle {
        Self::start_on(parent, name, account, super::free_port())
    }

    /// Stops this phone and starts a fresh Twinkle in its place, on the
    /// same SIP port, so its Contact and its binding stay the same.
    pub fn replace(self, parent: &Path, name: &str, account: &TwinkleAccount) -> Twinkle {
        let sip_port = self.sip_port;
        drop(self);
        Self::start_on(parent, name, account, sip_port)
    }

    fn start_on(parent: &Path, name: &str, account: &TwinkleAccount, sip_port: u16) -> Twinkle {
        let dir = parent.join(name);
        let conf = dir.join(".twinkle");
        std::fs::create_dir_all(&conf).unwrap();
        let rtp_port = super::free_port() & !1;
        std::fs::write(
            conf.join("twinkle.sys"),
            format!(
                "dev_ringtone=alsa:null\ndev_speaker=alsa:tw_spk\ndev_mic=alsa:tw_mic\n\
                 validate_audio_dev=no\nalsa_play_period_size=128\nalsa_capture_period_size=32\n\
                 log_show_sip=yes\nsip_port={sip_port}\nrtp_port={rtp_port}\n\
                 play_ringtone=no\nplay_ringback=no\n"
            ),
        )
        .unwrap();
        let TwinkleAccount {
            ext,
            password,
            server,
            transport,
            ..
        } = account;
        std::fs::write(
            conf.join("phone.cfg"),
            format!(
                "user_name={ext}\nuser_domain={domain}\nuser_display=Desk {ext}\nauth_realm=\n\
                 auth_name={ext}\nauth_pass={password}\noutbound_proxy={server}\n\
                 all_requests_to_proxy=yes\nnon_resolvable_to_proxy=yes\nregistrar={server}\n\
                 registration_time=600\nregister_at_startup=yes\ncodecs=g711u\nptime=20\n\
                 speex_dsp_vad=no\nspeex_dsp_agc=no\nspeex_dsp_aec=no\nspeex_dsp_nrd=no\n\
                 dtmf_transport=rfc2833\nsip_transport={transport}\nzrtp_enabled=no\n\
                 mwi_sollicited=no\npres_publish_startup=no\n",
                domain = super::DOMAIN,
            ),
        )
        .unwrap();
        if account.auto_answer {
            std::fs::write(conf.join("phone.svc"), "dnd=no\nauto_answer=yes\n").unwrap();
        }
        let fifo = dir.join("mic.fifo");
        let speaker = dir.join("speaker.raw");
        std::fs::write(
            dir.join(".asoundrc"),
            format!(
                "pcm.tw_mic {{\n type file\n slave.pcm \"null\"\n file \"/dev/null\"\n infile \"{}\"\n format \"raw\"\n}}\n\
                 pcm.tw_spk {{\n type file\n slave.pcm \"null\"\n file \"{}\"\n format \"raw\"\n}}\n",
                fifo.display(),
                speaker.display()
            ),
        )
        .unwrap();
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");

        let stop = Arc::new(AtomicBool::new(false));
        let feeder = {
            let stop = stop.clone();
            let hz = account.tone_hz;
            std::thread::spawn(move || feed(&fifo, hz, &stop))
        };
        let out = std::fs::File::create(dir.join("out.log")).unwrap();
        let mut child = Command::new("twinkle-console")
            .arg("phone.cfg")
            .current_dir(&dir)
            .env("HOME", &dir)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("twinkle-console runs");
        let stdin = child.stdin.take().unwrap();
        Twinkle {
            dir,
            sip_port,
            child,
            stdin,
            stop,
            feeder: Some(feeder),
        }
    }

    pub fn command(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .unwrap();
        self.stdin.flush().unwrap();
    }

    /// What it printed: its state changes.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.join("out.log")).unwrap_or_default()
    }

    /// Waits until its output holds `needle` at least `count` times.
    pub fn wait_output(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.output().matches(needle).count() >= count)
    }

    /// Its SIP trace.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(".twinkle/twinkle.log")).unwrap_or_default()
    }

    /// What it played out in its last audio session: the far end's audio.
    pub fn heard(&self) -> Vec<i16> {
        std::fs::read(self.dir.join("speaker.raw"))
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect()
    }
}

/// Writes a tone into the microphone FIFO in real time, one 20 ms frame
/// at a time, whenever Twinkle has it open.
fn feed(fifo: &Path, hz: f64, stop: &AtomicBool) {
    let mut phase = 0.0f64;
    let step = 2.0 * std::f64::consts::PI * hz / 8000.0;
    while !stop.load(Ordering::Relaxed) {
        // Non-blocking: fails with ENXIO until Twinkle opens its end.
        let Ok(mut f) = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
        else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let start = Instant::now();
        let mut frames = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let mut frame = [0u8; 320];
            for s in frame.chunks_exact_mut(2) {
                let v = (8000.0 * phase.sin()) as i16;
                s.copy_from_slice(&v.to_le_bytes());
                phase = (phase + step) % (2.0 * std::f64::consts::PI);
            }
            match f.write(&frame) {
                Ok(_) => {}
                // The FIFO is full: Twinkle reads at its own pace.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Twinkle closed it (the call ended): wait for the next call.
                Err(_) => break,
            }
            frames += 1;
            let next = start + Duration::from_millis(20) * frames;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
}

impl Drop for Twinkle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(f) = self.feeder.take() {
            let _ = f.join();
        }
    }
}
