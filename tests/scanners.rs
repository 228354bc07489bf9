//! The tools attackers run against PBXs on the internet (SIPVicious:
//! `svwar` enumerates extensions, `svcrack` guesses passwords) pointed at
//! Parley. Each check has a control: the same tool against a target that
//! does leak (a registrar that answers unknown users with 404, or Parley
//! with its lockout turned up out of reach) must succeed, so a pass here
//! means Parley stopped the tool, not that the tool did not work.

mod support;

use std::net::UdpSocket;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{Parley, free_port, require_tool};

/// Scanned range; the extensions below sit inside it.
const RANGE: &str = "200-210";
/// One extension per encryption policy: what a policy demands must not show
/// before the credentials check out.
const EXTENSIONS: [(&str, &str); 3] = [
    ("201", "required"),
    ("205", "required-remote"),
    ("207", "off"),
];
const PASSWORD: &str = "letmein-205";
/// Where the real password sits in the cracking dictionary: well past the
/// per-extension lockout threshold of the test configuration (5).
const PASSWORD_POSITION: usize = 30;
/// SIPVicious's User-Agent. svcrack only computes MD5 digests, and Parley
/// offers SHA-256 first, which alone would stop it; listing the scanner as
/// an MD5-only client takes that out, so the lockout is what is tested.
const SCANNER_AGENT: &str = "friendly-scanner";
/// Longest a scanner may run. svcrack never gives up while the server
/// answers (a blocked source keeps getting 403), so it is interrupted.
const SCAN_LIMIT: Duration = Duration::from_secs(20);

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a SIPVicious tool against 127.0.0.1:`port` from a port of its own,
/// interrupted (SIGINT, which makes it print what it found) after `limit`.
fn sipvicious(tool: &str, args: &[&str], port: u16, limit: Duration) -> String {
    require_tool(tool);
    require_tool("timeout");
    let out = Command::new("timeout")
        .arg("-s")
        .arg("INT")
        .arg(format!("{}", limit.as_secs()))
        .arg(tool)
        .args(args)
        .args(["-p", &port.to_string(), "-P", &free_port().to_string()])
        .arg("127.0.0.1")
        .stdin(Stdio::null())
        .output()
        .expect("run sipvicious");
    output_text(&out)
}

fn svwar(method: &str, port: u16) -> String {
    // --force: without it svwar stops at once, because a challenge to a
    // made-up user tells it the server does not give extensions away.
    sipvicious(
        "svwar",
        &["--force", "-e", RANGE, "-m", method],
        port,
        SCAN_LIMIT,
    )
}

/// A registrar that leaks: 401 for extension 205, 404 for anyone else.
/// Serves until `stop` is set.
fn leaky_registrar(stop: Arc<AtomicBool>) -> u16 {
    let sock = UdpSocket::bind(("127.0.0.1", free_port())).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let port = sock.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, src)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.starts_with("SIP/2.0") {
                continue;
            }
            let head = text.split("\r\n\r\n").next().unwrap_or("");
            let mut lines = head.split("\r\n");
            let method = lines.next().unwrap_or("").split(' ').next().unwrap_or("");
            let mut copied = String::new();
            let mut known = false;
            for line in lines {
                let name = line
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                if ["via", "from", "to", "call-id", "cseq"].contains(&name.as_str()) {
                    copied.push_str(line);
                    copied.push_str("\r\n");
                }
                if name == "to" && line.contains("sip:205@") {
                    known = true;
                }
            }
            let (status, auth) = match (method, known) {
                ("OPTIONS", _) => ("200 OK", ""),
                (_, true) => (
                    "401 Unauthorized",
                    "WWW-Authenticate: Digest realm=\"x\", nonce=\"n\"\r\n",
                ),
                (_, false) => ("404 Not Found", ""),
            };
            let reply = format!("SIP/2.0 {status}\r\n{copied}{auth}Content-Length: 0\r\n\r\n");
            let _ = sock.send_to(reply.as_bytes(), src);
        }
    });
    port
}

#[test]
fn svwar_finds_no_extension_with_any_method() {
    // Control: svwar does find the extension a leaky registrar gives away.
    let stop = Arc::new(AtomicBool::new(false));
    let leaky = leaky_registrar(stop.clone());
    let found = svwar("REGISTER", leaky);
    stop.store(true, Ordering::Relaxed);
    assert!(
        found.contains("| 205") && found.contains("reqauth"),
        "control failed: svwar did not find the extension a leaky registrar exposes:\n{found}"
    );

    let p = Parley::start("");
    for (number, policy) in EXTENSIONS {
        p.add_extension(number, &format!("pw-{number}-long"), policy);
    }
    for method in ["REGISTER", "INVITE", "OPTIONS"] {
        let out = svwar(method, p.udp.port());
        assert!(
            !out.contains("| Extension") && out.contains("found nothing"),
            "svwar told Parley's extensions apart with {method}:\n{out}"
        );
    }
    // Unauthenticated requests are not failed guesses: nobody got blocked.
    assert!(
        !p.log().contains("blocked"),
        "a scan without passwords led to a block"
    );
}

fn dictionary(dir: &std::path::Path) -> std::path::PathBuf {
    let mut words: Vec<String> = (0..40).map(|i| format!("guess-{i:02}")).collect();
    words.insert(PASSWORD_POSITION, PASSWORD.to_string());
    let path = dir.join("dictionary.txt");
    std::fs::write(&path, words.join("\n") + "\n").unwrap();
    path
}

fn svcrack(p: &Parley, extension: &str) -> String {
    let dict = dictionary(p.data_dir());
    sipvicious(
        "svcrack",
        &["-u", extension, "-d", dict.to_str().unwrap()],
        p.udp.port(),
        SCAN_LIMIT,
    )
}

fn scanner_config(extension_failures: u32, source_failures: u32) -> String {
    format!(
        "[sip]\nmd5_only_user_agents = [\"SIPp/\", \"baresip v1.\", \"{SCANNER_AGENT}\"]\n\
         [security]\nlockout_extension_failures = {extension_failures}\n\
         lockout_source_failures = {source_failures}\n"
    )
}

#[test]
fn svcrack_is_stopped_by_the_lockout_before_it_reaches_the_password() {
    // Control: with the lockout out of reach, svcrack finds the password.
    let open = Parley::start(&scanner_config(1000, 1000));
    open.add_extension("205", PASSWORD, "required-remote");
    let out = svcrack(&open, "205");
    assert!(
        out.contains(PASSWORD),
        "control failed: svcrack did not crack a weakly defended extension:\n{out}"
    );
    drop(open);

    // The test configuration: a source is blocked for an extension after
    // 5 failures, long before the dictionary reaches the password.
    let p = Parley::start(&scanner_config(5, 40));
    p.add_extension("205", PASSWORD, "required-remote");
    let started = Instant::now();
    let out = svcrack(&p, "205");
    assert!(
        started.elapsed() >= SCAN_LIMIT - Duration::from_secs(1),
        "svcrack stopped early, so it was not kept out by the block:\n{out}"
    );
    assert!(
        !out.contains(PASSWORD),
        "svcrack found the password:\n{out}"
    );
    assert!(out.contains("found nothing"), "svcrack output:\n{out}");
    let log = p.log();
    assert_eq!(
        log.matches("authentication failed").count(),
        5,
        "every guess after the fifth must be refused unchecked:\n{log}"
    );
    assert!(log.contains("source blocked for this extension"), "{log}");
    assert!(
        !log.contains("registration changed"),
        "svcrack registered:\n{log}"
    );

    // The same attack on a number that does not exist ends the same way,
    // so the block does not tell the attacker which numbers are real.
    let out = svcrack(&p, "209");
    assert!(out.contains("found nothing"), "svcrack output:\n{out}");
    let log = p.log();
    assert_eq!(log.matches("authentication failed").count(), 10, "{log}");
    assert_eq!(
        log.matches("source blocked for this extension").count(),
        2,
        "{log}"
    );
}
