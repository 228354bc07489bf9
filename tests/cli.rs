//! The command line: extension management and start-up errors.

mod support;

use std::process::Command;

use parley::sip::ua::RegisterOutcome;
use support::phone::Phone;
use support::{Parley, cli};

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn extensions_are_added_listed_changed_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = cli(
        d,
        &[
            "extension",
            "add",
            "100",
            "--name",
            "Front desk",
            "--password",
            "secret-100",
        ],
        None,
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let out = cli(
        d,
        &["extension", "add", "101", "--encryption", "required"],
        Some("typed-password\n"),
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let (stdout, _) = text(&cli(d, &["extension", "list"], None));
    assert!(
        stdout.contains("100")
            && stdout.contains("Front desk")
            && stdout.contains("required-remote"),
        "{stdout}"
    );
    assert!(
        stdout.contains("101") && stdout.contains("required "),
        "{stdout}"
    );
    // Secrets are never shown back.
    assert!(!stdout.contains("secret-100"));

    let out = cli(
        d,
        &["extension", "add", "100", "--password", "another-one"],
        None,
    );
    assert!(!out.status.success());
    assert!(text(&out).1.contains("extension 100 already exists"));

    assert!(
        cli(
            d,
            &[
                "extension",
                "set-password",
                "100",
                "--password",
                "changed-secret"
            ],
            None
        )
        .status
        .success()
    );
    let out = cli(
        d,
        &[
            "extension",
            "set-password",
            "999",
            "--password",
            "changed-secret",
        ],
        None,
    );
    assert!(text(&out).1.contains("extension 999 does not exist"));

    // Only digests are stored: no password, old or new, is anywhere in the
    // data dir (database, journal, anything else), while the name is.
    let stored = data_dir_bytes(d);
    let holds = |needle: &[u8]| stored.windows(needle.len()).any(|w| w == needle);
    assert!(holds(b"Front desk"), "the scan reads the database");
    for password in ["secret-100", "changed-secret", "typed-password"] {
        assert!(!holds(password.as_bytes()), "{password} stored in clear");
    }

    assert!(
        cli(d, &["extension", "remove", "101"], None)
            .status
            .success()
    );
    let out = cli(d, &["extension", "remove", "101"], None);
    assert!(!out.status.success() && text(&out).1.contains("does not exist"));
    let (stdout, _) = text(&cli(d, &["extension", "list"], None));
    assert!(!stdout.contains("101"));
}

/// Every byte of every file under `dir`.
fn data_dir_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(p) = pending.pop() {
        for entry in std::fs::read_dir(&p).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                all.extend(std::fs::read(&path).unwrap());
            }
        }
    }
    all
}

#[test]
fn bad_extension_input_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&[&str], &str)] = &[
        (
            &["extension", "add", "1 0", "--password", "long-enough"],
            "invalid extension number",
        ),
        (
            &["extension", "add", "100", "--password", "short"],
            "at least 8 characters",
        ),
        (
            &[
                "extension",
                "add",
                "100",
                "--password",
                "long-enough",
                "--encryption",
                "sometimes",
            ],
            "unknown encryption policy",
        ),
        (
            &[
                "extension",
                "add",
                "100",
                "--password",
                "long-enough",
                "--generate-password",
            ],
            "cannot be used with",
        ),
    ];
    for (args, want) in cases {
        let out = cli(d, args, None);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(text(&out).1.contains(want), "{args:?}: {:?}", text(&out));
    }
    let out = cli(d, &["extension", "add", "100"], Some(""));
    assert!(text(&out).1.contains("no password given"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_password_is_shown_once_and_works() {
    let p = Parley::start("");
    let before = p.log().matches("extensions reloaded").count();
    let out = p.cli(&[
        "extension",
        "add",
        "300",
        "--generate-password",
        "--encryption",
        "off",
    ]);
    let (stdout, _) = text(&out);
    let pw = stdout
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .expect("the generated password is printed")
        .to_owned();
    assert_eq!(pw.len(), 20);
    assert!(support::wait_until(
        std::time::Duration::from_secs(10),
        || { p.log().matches("extensions reloaded").count() > before }
    ));
    let mut phone = Phone::udp(p.udp, "300", &pw).await;
    assert!(matches!(
        phone.register().await.0,
        RegisterOutcome::Registered { .. }
    ));
}

fn serve_fails(args: &[&str], config: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(args);
    if let Some(c) = config {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, c).unwrap();
        cmd.arg("--config").arg(path);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "serve should refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_setting_stops_start_up_naming_the_key() {
    let err = serve_fails(&[], Some("[sip]\nmax_expires = 10\nmin_expires = 60\n"));
    assert!(
        err.contains("`sip.max_expires`") && err.contains("must not be below"),
        "{err}"
    );
    let err = serve_fails(
        &[],
        Some("[security]\nlan_networks = [\"not a network\"]\n"),
    );
    assert!(err.contains("`security.lan_networks`"), "{err}");
    let err = serve_fails(&[], Some("[sip]\ntypo_key = 1\n"));
    assert!(
        err.contains("`sip.typo_key`") && err.contains("unknown field"),
        "{err}"
    );
    let err = serve_fails(&["--sip-udp", "nowhere"], None);
    assert!(err.contains("`sip.udp`"), "{err}");
    let err = serve_fails(&["--rtp-ports", "9-3"], None);
    assert!(err.contains("`media.rtp_ports`"), "{err}");
}

#[test]
fn a_port_in_use_is_reported() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = serve_fails(
        &[
            "--sip-udp",
            &addr,
            "--sip-tcp",
            "off",
            "--sip-tls",
            "off",
            "--https",
            "off",
        ],
        None,
    );
    assert!(
        err.contains(&format!("cannot listen on udp {addr}")),
        "{err}"
    );
}

#[test]
fn call_history_is_listed_newest_first() {
    use parley::media::{LegId, LegReport};
    use parley::pbx::cdr::{CallRecord, EndedBy, LegRecord, Outcome};
    use parley::sip::transport::Transport;
    use parley::srtp::Suite;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (stdout, _) = text(&cli(d, &["calls", "list"], None));
    assert!(stdout.contains("no calls yet"), "{stdout}");

    let media = LegReport {
        id: LegId(1),
        suite: Some(Suite::AesCm128HmacSha1_80),
        remote: Some("203.0.113.9:40000".parse().unwrap()),
        received_packets: 4000,
        received_bytes: 688_000,
        lost: 0,
        jitter_ms: 1.5,
        auth_failures: 0,
        rtcp_auth_failures: 0,
        replays: 0,
        wrong_source: 0,
        sent_packets: 4000,
        sent_bytes: 728_000,
        srtp_refused: 0,
        remote_fraction_lost: Some(0.0),
        remote_jitter_ms: Some(2.0),
        mos_received: Some(4.41),
        mos_sent: Some(4.38),
    };
    let answered = CallRecord {
        call_ref: "c-1".into(),
        caller: "200".into(),
        callee: "201".into(),
        started_unix_ms: 1_795_000_000_000,
        answered_unix_ms: Some(1_795_000_003_000),
        ended_unix_ms: 1_795_000_083_500,
        outcome: Outcome::Answered,
        sip_status: 200,
        sip_reason: "OK".into(),
        ended_by: Some(EndedBy::Callee),
        caller_leg: LegRecord {
            transport: Transport::Tls,
            tls_version: Some("TLSv1.3".into()),
            srtp: Some(Suite::AesCm128HmacSha1_80),
            media: Some(media),
        },
        callee_leg: Some(LegRecord {
            transport: Transport::Udp,
            tls_version: None,
            srtp: None,
            media: None,
        }),
    };
    let busy = CallRecord {
        call_ref: "c-2".into(),
        started_unix_ms: 1_795_000_100_000,
        answered_unix_ms: None,
        ended_unix_ms: 1_795_000_101_000,
        outcome: Outcome::Busy,
        sip_status: 486,
        sip_reason: "Busy Here".into(),
        ended_by: None,
        caller_leg: LegRecord {
            srtp: Some(Suite::AesCm128HmacSha1_32),
            media: None,
            ..answered.caller_leg.clone()
        },
        callee_leg: None,
        ..answered.clone()
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let store = parley::store::Store::open(d).await.unwrap();
            store.insert_call(&answered).await.unwrap();
            store.insert_call(&busy).await.unwrap();
            // The call reference is unique: a second write of the same call fails.
            assert!(store.insert_call(&busy).await.is_err());
            let rows = store.recent_calls(10).await.unwrap();
            assert_eq!(rows.len(), 2);
            assert_eq!(rows[1].duration_ms, 80_500);
            // Which suite each leg used is kept.
            assert_eq!(
                rows[1].caller_srtp.as_deref(),
                Some("AES_CM_128_HMAC_SHA1_80")
            );
            assert_eq!(
                rows[0].caller_srtp.as_deref(),
                Some("AES_CM_128_HMAC_SHA1_32")
            );
            assert_eq!(rows[1].callee_srtp, None);
            let media: serde_json::Value =
                serde_json::from_str(rows[1].caller_media.as_deref().unwrap()).unwrap();
            assert_eq!(media["received"]["packets"], 4000);
            assert_eq!(media["sent"]["mos"], 4.38);
            store.close().await;
        });

    let (stdout, stderr) = text(&cli(d, &["calls", "list"], None));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}{stderr}");
    assert!(
        lines[1].contains("busy")
            && lines[1].contains("486 Busy Here")
            && lines[1].contains("tls TLSv1.3 SRTP/32"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("2026-11-18 11:06:40"), "{}", lines[2]);
    assert!(
        lines[2].contains("answered") && lines[2].contains("0:01:20"),
        "{}",
        lines[2]
    );
    assert!(
        lines[2].contains("tls TLSv1.3 SRTP/80") && lines[2].contains("udp RTP"),
        "{}",
        lines[2]
    );
    assert!(lines[2].contains("4.4/4.4"), "{}", lines[2]);
    let (stdout, _) = text(&cli(d, &["calls", "list", "--limit", "1"], None));
    assert_eq!(stdout.lines().count(), 2);
    let out = cli(d, &["calls", "list", "--limit", "0"], None);
    assert!(!out.status.success());
}

/// The extension commands read the server's config file when given one:
/// its data dir, and its realm, which passwords are hashed with (an
/// extension added with another realm could never authenticate).
#[test]
fn extension_commands_follow_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("parley.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[sip]\nrealm = \"pbx.example.com\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = run(&["extension", "add", "100", "--password", "secret-100"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let (stdout, _) = text(&run(&["extension", "list"]));
    assert!(stdout.contains("100"), "{stdout}");
    let realms: Vec<String> = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = parley::store::Store::open(&data).await.unwrap();
        let list = store.list_extensions().await.unwrap();
        list.into_iter().map(|e| e.realm).collect()
    });
    assert_eq!(realms, ["pbx.example.com"]);
    let bad = std::fs::write(&cfg, "[sip]\nrealm = 5\n");
    bad.unwrap();
    let out = run(&["extension", "list"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("configuration"), "{:?}", text(&out));
}
