//! A small internet in network namespaces the test creates (root needed):
//! Parley on a "public" network, phones on a home network behind a router
//! that masquerades with random ports and forgets idle mappings quickly.
//! Only documentation address ranges are used, and everything disappears
//! with the namespaces when the lab is dropped.
//!
//! ```text
//!  [pbx ns] 203.0.113.1 ── 203.0.113.2 [nat ns] 198.51.100.1 ── 198.51.100.2 [phones ns]
//!                                  MASQUERADE --random
//! ```

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const PBX_IP: &str = "203.0.113.1";
pub const NAT_PUBLIC_IP: &str = "203.0.113.2";
pub const PHONES_IP: &str = "198.51.100.2";

pub struct NatLab {
    pub pbx: String,
    pub nat: String,
    pub phones: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NatLab {
    /// Builds the lab. The router forgets an idle TCP connection after
    /// `tcp_idle_secs` and an idle UDP mapping after `udp_idle_secs`.
    pub fn new(tcp_idle_secs: u32, udp_idle_secs: u32) -> NatLab {
        super::require_tool("ip");
        super::require_tool("iptables");
        let id = format!(
            "{:x}{}",
            std::process::id() & 0xffff,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let lab = NatLab {
            pbx: format!("parley-pbx-{id}"),
            nat: format!("parley-nat-{id}"),
            phones: format!("parley-ph-{id}"),
        };
        let (pb, no, ni, ph) = (
            format!("pb{id}"),
            format!("no{id}"),
            format!("ni{id}"),
            format!("ph{id}"),
        );
        for ns in [&lab.pbx, &lab.nat, &lab.phones] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        run(&[
            "ip", "link", "add", &pb, "type", "veth", "peer", "name", &no,
        ]);
        run(&["ip", "link", "set", &pb, "netns", &lab.pbx]);
        run(&["ip", "link", "set", &no, "netns", &lab.nat]);
        run(&[
            "ip", "link", "add", &ph, "type", "veth", "peer", "name", &ni,
        ]);
        run(&["ip", "link", "set", &ph, "netns", &lab.phones]);
        run(&["ip", "link", "set", &ni, "netns", &lab.nat]);
        for (ns, dev, addr) in [
            (&lab.pbx, &pb, "203.0.113.1/24"),
            (&lab.nat, &no, "203.0.113.2/24"),
            (&lab.nat, &ni, "198.51.100.1/24"),
            (&lab.phones, &ph, "198.51.100.2/24"),
        ] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run(&[
            "ip",
            "-n",
            &lab.phones,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ]);
        let in_nat = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &lab.nat];
            all.extend_from_slice(args);
            run(&all);
        };
        in_nat(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        in_nat(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &no,
            "-j",
            "MASQUERADE",
            "--random",
        ]);
        // The router's memory: short, so a test can outlast it.
        in_nat(&[
            "sysctl",
            "-qw",
            &format!("net.netfilter.nf_conntrack_tcp_timeout_established={tcp_idle_secs}"),
            &format!("net.netfilter.nf_conntrack_udp_timeout={udp_idle_secs}"),
            &format!("net.netfilter.nf_conntrack_udp_timeout_stream={udp_idle_secs}"),
        ]);
        lab
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for ns in [&self.pbx, &self.nat, &self.phones] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A network namespace with nothing but its loopback: a server bound to
/// all addresses there is reachable from that loopback only, and every
/// 127.0.0.0/8 address is one of the host's.
pub struct LoopbackNs {
    pub name: String,
}

impl LoopbackNs {
    pub fn new() -> LoopbackNs {
        super::require_tool("ip");
        let name = format!(
            "parley-lo-{:x}{}",
            std::process::id() & 0xffff,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        LoopbackNs { name }
    }
}

impl Drop for LoopbackNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` on a thread inside network namespace `ns`: sockets it opens
/// live there (and stay there when handed back).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a namespace file descriptor; only this thread moves.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}
