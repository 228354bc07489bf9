//! Packet capture on loopback with `dumpcap` (from Debian's tshark), read
//! back by a small pcap reader: what really crossed the wire.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Capture {
    child: Child,
    path: PathBuf,
}

/// One captured IPv4 UDP datagram.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl Capture {
    /// Captures loopback traffic matching a BPF `filter` into `dir`.
    pub fn start(dir: &Path, filter: &str) -> Capture {
        super::require_tool("dumpcap");
        let path = dir.join("capture.pcap");
        let log = std::fs::File::create(dir.join("dumpcap.log")).unwrap();
        let child = Command::new("dumpcap")
            .args(["-q", "-i", "lo", "-P", "-f", filter, "-w"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dumpcap runs");
        // The file appears once the capture is running.
        assert!(
            super::wait_until(Duration::from_secs(10), || path
                .metadata()
                .is_ok_and(|m| m.len() >= 24)),
            "dumpcap did not start: {}",
            std::fs::read_to_string(dir.join("dumpcap.log")).unwrap_or_default()
        );
        Capture { child, path }
    }

    /// Stops the capture and returns the UDP datagrams it saw.
    pub fn stop(mut self) -> Vec<Datagram> {
        // SAFETY: signals our own child; SIGINT makes dumpcap flush and exit.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
        read_pcap(&std::fs::read(&self.path).unwrap())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a classic pcap file of Ethernet (loopback) frames; keeps IPv4 UDP.
fn read_pcap(bytes: &[u8]) -> Vec<Datagram> {
    let u16be = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let u32le = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(u32le(bytes, 0), 0xa1b2_c3d4, "a little-endian pcap file");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32le(bytes, at + 8) as usize;
        let frame = &bytes[at + 16..(at + 16 + len).min(bytes.len())];
        at += 16 + len;
        // Ethernet: type IPv4; IPv4: protocol UDP.
        if frame.len() < 14 + 20 + 8 || u16be(frame, 12) != 0x0800 || frame[14 + 9] != 17 {
            continue;
        }
        let ip_len = usize::from(frame[14] & 0x0f) * 4;
        let udp = &frame[14 + ip_len..];
        let udp_len = usize::from(u16be(udp, 4)).min(udp.len());
        out.push(Datagram {
            src_port: u16be(udp, 0),
            dst_port: u16be(udp, 2),
            payload: udp[8..udp_len].to_vec(),
        });
    }
    out
}
