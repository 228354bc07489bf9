//! Registration with SIPp (Debian's sip-tester), an independent SIP
//! implementation, over UDP and TCP: digest auth, wrong passwords, binding
//! fetch, 423, expiry, unregister, and the lockout that follows repeated
//! failures. The scenarios live in tests/sipp/.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{DOMAIN, Parley, free_port, require_tool};

const USERS: u32 = 4;
const FIRST_USER: u32 = 100_000;

struct Sipp<'a> {
    parley: &'a Parley,
    dir: PathBuf,
    transport: &'static str,
    port: u16,
}

/// What one scenario run did: its exit code and its log lines.
struct Run {
    code: i32,
    log: String,
}

impl<'a> Sipp<'a> {
    fn new(parley: &'a Parley, transport: &'static str) -> Sipp<'a> {
        require_tool("sipp");
        let dir = parley.data_dir().join(format!("sipp-{transport}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut csv = String::from("SEQUENTIAL\n");
        for u in FIRST_USER..FIRST_USER + USERS {
            csv.push_str(&format!("{u};pw{u}\n"));
        }
        std::fs::write(dir.join("users.csv"), csv).unwrap();
        Sipp {
            parley,
            dir,
            transport,
            port: free_port(),
        }
    }

    /// Runs a scenario for `calls` users (from the first), with `expires`.
    fn run(&self, scenario: &str, calls: u32, expires: u32) -> Run {
        self.run_with_csv(scenario, calls, expires, &self.dir.join("users.csv"))
    }

    fn run_with_csv(&self, scenario: &str, calls: u32, expires: u32, csv: &Path) -> Run {
        let log = self.dir.join(format!("{scenario}.log"));
        let _ = std::fs::remove_file(&log);
        let server = if self.transport == "u1" {
            self.parley.udp
        } else {
            self.parley.tcp
        };
        let out = Command::new("sipp")
            .arg(server.to_string())
            .arg("-sf")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/sipp")
                    .join(format!("{scenario}.xml")),
            )
            .args([
                "-t",
                self.transport,
                "-i",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ])
            .arg("-inf")
            .arg(csv)
            .args([
                "-key",
                "domain",
                DOMAIN,
                "-key",
                "expires",
                &expires.to_string(),
            ])
            .args(["-auth_uri", DOMAIN, "-m", &calls.to_string(), "-r", "20"])
            .args([
                "-timeout",
                "20s",
                "-timeout_error",
                "-nostdin",
                "-trace_logs",
                "-log_file",
            ])
            .arg(&log)
            .current_dir(&self.dir)
            .output()
            .expect("run sipp");
        Run {
            code: out.status.code().unwrap_or(-1),
            log: std::fs::read_to_string(&log).unwrap_or_default(),
        }
    }
}

fn start() -> Parley {
    let p = Parley::start("[sip]\nmin_expires = 2\n");
    for u in FIRST_USER..FIRST_USER + USERS {
        p.add_extension(&u.to_string(), &format!("pw{u}"), "off");
    }
    p
}

fn check_transport(transport: &'static str) {
    let p = start();
    let sipp = Sipp::new(&p, transport);

    let r = sipp.run("register_auth", USERS, 300);
    assert_eq!(r.code, 0, "register: {}", r.log);
    for u in FIRST_USER..FIRST_USER + USERS {
        let line = r
            .log
            .lines()
            .find(|l| l.contains(&format!("REGISTERED user={u} ")))
            .expect("logged");
        assert!(line.contains(";expires=300"), "{line}");
    }

    let r = sipp.run("register_wrong_password", 1, 300);
    assert_eq!(r.code, 0, "a wrong password must be refused: {}", r.log);
    assert!(r.log.contains("REJECTED user=100000 status=401"));

    let r = sipp.run("register_interval_too_brief", 1, 300);
    assert_eq!(r.code, 0, "423: {}", r.log);
    assert!(r.log.contains("min_expires=2"), "{}", r.log);

    let r = sipp.run("register_fetch", 1, 300);
    assert_eq!(r.code, 0, "fetch: {}", r.log);
    let line = r
        .log
        .lines()
        .find(|l| l.starts_with("BINDINGS"))
        .unwrap()
        .to_owned();
    if transport == "t1" {
        // Each sipp run opens its own TCP connection and closes it at the
        // end: a TCP binding lives only as long as its connection.
        assert!(
            line.contains("contacts=|||"),
            "TCP bindings end with their connection: {line}"
        );
        assert!(p.log().contains("change=\"connection-closed\""));
        return;
    }
    assert!(
        line.contains(&format!(":{};transport=", sipp.port)),
        "{line}"
    );

    let r = sipp.run("unregister", 1, 0);
    assert_eq!(r.code, 0, "unregister: {}", r.log);
    let r = sipp.run("register_fetch", 1, 300);
    assert!(
        r.log.contains("BINDINGS user=100000 contacts=|||"),
        "binding gone: {}",
        r.log
    );

    // Contact: * removes every binding of the user.
    let r = sipp.run("unregister_all", 2, 0);
    assert_eq!(r.code, 0, "unregister all: {}", r.log);

    // A short registration expires on its own.
    let r = sipp.run("register_auth", 1, 2);
    assert_eq!(r.code, 0, "{}", r.log);
    assert!(p.wait_log("change=\"expired\"", Duration::from_secs(6)));
    let r = sipp.run("register_fetch", 1, 300);
    assert!(
        r.log.contains("BINDINGS user=100000 contacts=|||"),
        "expired: {}",
        r.log
    );
}

#[test]
fn sipp_registers_over_udp() {
    check_transport("u1");
}

#[test]
fn sipp_registers_over_tcp() {
    check_transport("t1");
}

#[test]
fn sipp_wrong_passwords_lead_to_a_block() {
    let p = start();
    let sipp = Sipp::new(&p, "u1");
    // Five wrong attempts for the same user from one address...
    let csv = sipp.dir.join("one.csv");
    std::fs::write(&csv, "SEQUENTIAL\n100001;pw100001\n100001;pw100001\n100001;pw100001\n100001;pw100001\n100001;pw100001\n").unwrap();
    let r = sipp.run_with_csv("register_wrong_password", 5, 300, &csv);
    assert_eq!(r.code, 0, "{}", r.log);
    assert!(p.wait_log("source blocked for this extension", Duration::from_secs(5)));
    // ...and now the right password fails too, for that user only.
    let right = sipp.dir.join("right.csv");
    std::fs::write(&right, "SEQUENTIAL\n100001;pw100001\n").unwrap();
    let r = sipp.run_with_csv("register_auth", 1, 300, &right);
    assert_ne!(r.code, 0, "a blocked source must not register");
    let other = sipp.dir.join("other.csv");
    std::fs::write(&other, "SEQUENTIAL\n100002;pw100002\n").unwrap();
    let r = sipp.run_with_csv("register_auth", 1, 300, &other);
    assert_eq!(
        r.code, 0,
        "another extension from the same address still registers: {}",
        r.log
    );
}
