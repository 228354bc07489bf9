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
