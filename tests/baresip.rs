//! baresip, a real softphone, registering with Parley over TLS (with the
//! generated CA) and mandatory SRTP, and being refused where the policy
//! says so.

mod support;

use std::time::Duration;

use support::baresip::Baresip;
use support::phone::Phone;
use support::{DOMAIN, Parley};

fn account(ext: &str, password: &str, server: std::net::SocketAddr, transport: &str) -> String {
    let t = if transport == "udp" {
        String::new()
    } else {
        format!(";transport={transport}")
    };
    format!(
        "<sip:{ext}@{DOMAIN}{t}>;auth_pass={password};outbound=\"sip:{server}{t}\";regint=600;mediaenc=srtp-mand;answermode=auto;audio_codecs=pcmu"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_registers_over_tls_and_its_binding_ends_with_the_connection() {
    let p = Parley::start("");
    p.add_extension("100", "password100", "required");
    let mut phone = Baresip::start(
        p.data_dir(),
        "a",
        &account("100", "password100", p.tls, "tls"),
        &p.ca_cert(),
    );
    assert!(
        phone.wait_log("200 OK", Duration::from_secs(15)) && phone.log().contains("[1 binding]"),
        "baresip did not register"
    );
    assert!(p.log().contains("extension=100") && p.log().contains("flow=tls:127.0.0.1"));
    // baresip looks for its own Contact in the 200 and takes the expiry from it.
    assert!(phone.log().contains(";expires=600"), "{}", phone.log());

    // Extension 100 requires TLS everywhere, so the probe uses TLS too.
    let mut probe = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "100", "password100").await;
    let bindings = probe.fetch_bindings().await;
    assert_eq!(bindings.len(), 1);
    assert!(
        bindings[0].contains("transport=tls") && bindings[0].contains("+sip.instance"),
        "{bindings:?}"
    );

    phone.kill();
    assert!(p.wait_log("change=\"connection-closed\"", Duration::from_secs(10)));
    assert!(probe.fetch_bindings().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_over_udp_is_told_tls_is_required() {
    let p = Parley::start("");
    p.add_extension("101", "password101", "required");
    let phone = Baresip::start(
        p.data_dir(),
        "b",
        &account("101", "password101", p.udp, "udp"),
        &p.ca_cert(),
    );
    assert!(
        phone.wait_log(
            "403 TLS Required By Encryption Policy",
            Duration::from_secs(15)
        ),
        "baresip did not see the policy's reason"
    );
    assert!(
        p.log()
            .contains("registration refused by encryption policy")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_with_a_wrong_password_trips_the_lockout() {
    let p = Parley::start("");
    p.add_extension("102", "password102", "off");
    let phone = Baresip::start(
        p.data_dir(),
        "c",
        &account("102", "wrong-password", p.tls, "tls"),
        &p.ca_cert(),
    );
    assert!(
        p.wait_log("source blocked for this extension", Duration::from_secs(20)),
        "repeated failures did not lead to a block"
    );
    // The rest of baresip's burst of retries is refused outright.
    assert!(phone.wait_log("403 Too Many Failed Attempts", Duration::from_secs(20)));
    // Another extension from the same address is not affected.
    p.add_extension("103", "password103", "off");
    let mut other = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "103", "password103").await;
    assert!(matches!(
        other.register().await.0,
        parley::sip::ua::RegisterOutcome::Registered { .. }
    ));
}
