//! The registrar end to end: `parley serve` on loopback, driven by a phone
//! built on Parley's client state machine over UDP, TCP and TLS.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use parley::sip::digest::Algorithm;
use parley::sip::message::HeaderName;
use parley::sip::ua::RegisterOutcome;
use support::netns::{LoopbackNs, in_netns};
use support::phone::Phone;
use support::{DOMAIN, Parley, wait_until};

fn registered(o: &RegisterOutcome) -> bool {
    matches!(o, RegisterOutcome::Registered { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_over_udp_tcp_and_tls_with_either_algorithm() {
    let p = Parley::start("");
    p.add_extension("100", "password100", "off");
    let mut udp = Phone::udp(p.udp, "100", "password100").await;
    udp.reg.prefer = Algorithm::Sha256;
    let (o, resp) = udp.register().await;
    assert_eq!(
        o,
        RegisterOutcome::Registered { expires: 3600 },
        "{}",
        resp.reason()
    );
    assert!(resp.header(HeaderName::Date).is_some());

    let mut tcp = Phone::tcp(p.tcp, "100", "password100").await;
    tcp.reg.prefer = Algorithm::Md5;
    assert!(registered(&tcp.register().await.0));

    let mut tls = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "100", "password100").await;
    tls.reg.expires = 120;
    assert_eq!(
        tls.register().await.0,
        RegisterOutcome::Registered { expires: 120 }
    );

    // One extension, three devices: the 200 lists all of them.
    let contacts = udp.fetch_bindings().await;
    assert_eq!(contacts.len(), 3, "{contacts:?}");
    assert!(
        contacts
            .iter()
            .any(|c| c.contains("transport=tls") && c.contains("expires=120"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_offers_sha256_first_then_md5() {
    let p = Parley::start("");
    let mut phone = Phone::udp(p.udp, "100", "whatever1").await;
    let req = phone.reg.build();
    let resp = phone.request(req).await;
    assert_eq!(resp.status(), Some(401));
    let ch: Vec<&str> = resp.headers(HeaderName::WwwAuthenticate).collect();
    assert_eq!(ch.len(), 2);
    assert!(ch[0].contains("algorithm=SHA-256"), "{ch:?}");
    assert!(ch[1].contains("algorithm=MD5"), "{ch:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_binding_ends_with_its_connection() {
    let p = Parley::start("");
    p.add_extension("100", "password100", "off");
    let mut tls = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "100", "password100").await;
    assert!(registered(&tls.register().await.0));
    let mut udp = Phone::udp(p.udp, "100", "password100").await;
    assert_eq!(udp.fetch_bindings().await.len(), 1);
    drop(tls);
    assert!(p.wait_log("change=\"connection-closed\"", Duration::from_secs(5)));
    assert!(udp.fetch_bindings().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_devices_must_use_tls_and_strangers_learn_nothing() {
    // Loopback counts as "remote" here: the LAN is only 10.0.0.0/8.
    let p = Parley::start("[security]\nlan_networks = [\"10.0.0.0/8\"]\n");
    p.add_extension("100", "password100", "required-remote");
    let mut udp = Phone::udp(p.udp, "100", "password100").await;
    let (o, _) = udp.register().await;
    assert_eq!(
        o,
        RegisterOutcome::Failed {
            status: 403,
            reason: "TLS Required Outside The LAN".into(),
            min_expires: None
        }
    );
    assert!(p.wait_log(
        "registration refused by encryption policy",
        Duration::from_secs(5)
    ));
    let mut tcp = Phone::tcp(p.tcp, "100", "password100").await;
    assert!(matches!(
        tcp.register().await.0,
        RegisterOutcome::Failed { status: 403, .. }
    ));
    // Wrong password: the same 401 as for anyone, not the policy's 403.
    let mut stranger = Phone::udp(p.udp, "100", "not-the-password").await;
    assert!(matches!(
        stranger.register().await.0,
        RegisterOutcome::Failed { status: 401, .. }
    ));
    let mut tls = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "100", "password100").await;
    assert!(registered(&tls.register().await.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_block_the_source_for_that_extension_only() {
    let p = Parley::start("");
    p.add_extension("100", "password100", "off");
    p.add_extension("101", "password101", "off");
    let mut bad = Phone::udp(p.udp, "100", "stale-password").await;
    for _ in 0..5 {
        assert!(matches!(
            bad.register().await.0,
            RegisterOutcome::Failed { status: 401, .. }
        ));
    }
    assert!(p.wait_log("source blocked for this extension", Duration::from_secs(5)));
    let mut right = Phone::udp(p.udp, "100", "password100").await;
    let (o, _) = right.register().await;
    assert_eq!(
        o,
        RegisterOutcome::Failed {
            status: 403,
            reason: "Too Many Failed Attempts".into(),
            min_expires: None
        }
    );
    let mut colleague = Phone::udp(p.udp, "101", "password101").await;
    assert!(registered(&colleague.register().await.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_expire() {
    let p = Parley::start("[sip]\nmin_expires = 1\n");
    p.add_extension("100", "password100", "off");
    let mut phone = Phone::udp(p.udp, "100", "password100").await;
    phone.reg.expires = 2;
    assert_eq!(
        phone.register().await.0,
        RegisterOutcome::Registered { expires: 2 }
    );
    assert!(p.wait_log("change=\"expired\"", Duration::from_secs(5)));
    assert!(phone.fetch_bindings().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_pings_get_pongs_and_only_unregistered_connections_are_reaped() {
    let p = Parley::start("[sip]\nidle_timeout_secs = 1\n");
    p.add_extension("100", "password100", "off");
    let mut registered_conn = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "100", "password100").await;
    assert!(registered(&registered_conn.register().await.0));
    let mut idle = Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "x", "y").await;

    registered_conn.send(b"\r\n\r\n").await;
    assert_eq!(
        registered_conn
            .read_raw(Duration::from_secs(2))
            .await
            .as_deref(),
        Some(&b"\r\n"[..])
    );

    // The unregistered connection is closed after about a second, though
    // it keeps pinging: only whole SIP messages count as activity.
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            if !idle.try_send(b"\r\n\r\n").await {
                return true;
            }
            match idle.read_raw(Duration::from_millis(300)).await {
                Some(b) if b.is_empty() => return true,
                // A pong, or nothing yet.
                Some(_) | None => continue,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "idle connection was not reaped");
    // The registered one is still usable well past the idle timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let opts = registered_conn.options("keep1");
    assert_eq!(registered_conn.request(opts).await.status(), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_registrations_survive_a_restart() {
    let mut p = Parley::start("");
    p.add_extension("100", "password100", "off");
    let mut phone = Phone::udp(p.udp, "100", "password100").await;
    assert!(registered(&phone.register().await.0));
    let contact = phone.reg.contact_uri();
    // Give the batched store writer a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.restart();
    assert!(
        p.log().contains("UDP registrations restored"),
        "{}",
        p.log()
    );
    let mut other = Phone::udp(p.udp, "100", "password100").await;
    let bindings = other.fetch_bindings().await;
    assert_eq!(bindings.len(), 1);
    assert!(bindings[0].contains(&contact), "{bindings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_changes_reach_a_running_server() {
    let p = Parley::start("");
    let mut phone = Phone::udp(p.udp, "200", "password200").await;
    assert!(matches!(
        phone.register().await.0,
        RegisterOutcome::Failed { status: 401, .. }
    ));
    p.add_extension("200", "password200", "off");
    assert!(p.wait_log("extensions reloaded", Duration::from_secs(5)));
    let mut phone = Phone::udp(p.udp, "200", "password200").await;
    assert!(registered(&phone.register().await.0));

    // A new password: the old one stops working without a restart.
    let out = p.cli(&[
        "extension",
        "set-password",
        "200",
        "--password",
        "newpassword200",
    ]);
    assert!(out.status.success());
    let reloaded = wait_until(Duration::from_secs(5), || {
        p.log().matches("extensions reloaded").count() >= 2
    });
    assert!(reloaded);
    let mut old = Phone::udp(p.udp, "200", "password200").await;
    assert!(matches!(
        old.register().await.0,
        RegisterOutcome::Failed { status: 401, .. }
    ));
    let mut new = Phone::udp(p.udp, "200", "newpassword200").await;
    assert!(registered(&new.register().await.0));

    // Removing the extension drops its registrations.
    assert!(p.cli(&["extension", "remove", "200"]).status.success());
    assert!(p.wait_log("change=\"extension-removed\"", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_is_answered_on_every_transport() {
    let p = Parley::start("");
    for mut phone in [
        Phone::udp(p.udp, "x", "y").await,
        Phone::tcp(p.tcp, "x", "y").await,
        Phone::tls(p.tls, &p.ca_cert(), DOMAIN, "x", "y").await,
    ] {
        let req = phone.options("opt");
        let resp = phone.request(req).await;
        assert_eq!(resp.status(), Some(200));
        assert!(resp.header(HeaderName::Allow).unwrap().contains("REGISTER"));
        assert_eq!(resp.header(HeaderName::Accept), Some("application/sdp"));
        assert!(resp.header(HeaderName::Supported).is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_over_ipv6() {
    // Ports are probed on IPv4; on ::1 they are free in practice.
    let p = Parley::start_on("::1", "");
    p.add_extension("100", "password100", "off");
    let mut udp = Phone::udp(p.udp, "100", "password100").await;
    let (o, resp) = udp.register().await;
    assert!(registered(&o), "{}", resp.reason());
    // The response's Via records the IPv6 source.
    assert_eq!(resp.top_via().unwrap().param("received"), Some(Some("::1")));
    let mut tls = Phone::tls(p.tls, &p.ca_cert(), "::1", "100", "password100").await;
    assert!(registered(&tls.register().await.0));
    let contacts = udp.fetch_bindings().await;
    assert_eq!(contacts.len(), 2);
    assert!(
        contacts.iter().all(|c| c.contains("[::1]:")),
        "{contacts:?}"
    );
}

/// On a host with several addresses, a server bound to all of them must
/// answer a phone from the address the phone reached, and reach the phone
/// from it later: a phone, or the NAT in front of it, drops datagrams from
/// any other. (In a namespace of the test's own, whose only interface is
/// loopback, 127.0.0.2 is such a second address.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_all_addresses_answers_from_the_one_reached() {
    let ns = LoopbackNs::new();
    // Loopback outside the LAN networks, so the phone counts as remote
    // and gets Parley's own keep-alives.
    let p = Parley::start_in(
        Some(&ns.name),
        "0.0.0.0",
        "[sip]\nkeepalive_secs = 5\n[security]\nlan_networks = [\"10.0.0.0/8\"]\n",
    );
    p.add_extension("100", "password100", "off");
    let reached = SocketAddr::new("127.0.0.2".parse().unwrap(), p.udp.port());
    let sock = in_netns(&ns.name, || {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    });
    let mut phone = Phone::udp_on(sock, reached, "100", "password100");

    let req = phone.options("all-addresses");
    assert_eq!(phone.request(req).await.status(), Some(200));
    assert_eq!(phone.last_from, Some(reached));
    let (o, resp) = phone.register().await;
    assert!(registered(&o), "{}", resp.reason());
    assert_eq!(phone.last_from, Some(reached));

    // Parley's keep-alive to the registered phone: from the same address,
    // which its Via names too.
    let ping = phone
        .recv_within(Duration::from_secs(15))
        .await
        .expect("a keep-alive");
    assert_eq!(ping.method_str(), "OPTIONS");
    assert_eq!(phone.last_from, Some(reached));
    let sent_by = ping.top_via().unwrap().sent_by.to_owned();
    assert_eq!(sent_by, reached.to_string());
}
