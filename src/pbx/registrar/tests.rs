use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::sip::message::Framing;

fn udp(port: u16) -> Flow {
    Flow::udp(
        "127.0.0.1:5060".parse().unwrap(),
        SocketAddr::from(([192, 0, 2, 5], port)),
    )
}

fn tls(conn: ConnId) -> Flow {
    Flow::stream(
        Transport::Tls,
        "127.0.0.1:5061".parse().unwrap(),
        SocketAddr::from(([198, 51, 100, 9], 40000)),
        conn,
    )
}

fn register(call_id: &str, cseq: u32, contacts: &[&str], expires: Option<&str>) -> Message {
    let mut t = format!(
        "REGISTER sip:pbx SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.5;branch=z9hG4bK{cseq}\r\n\
         From: <sip:100@pbx>;tag=a\r\nTo: <sip:100@pbx>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
    );
    for c in contacts {
        t.push_str(&format!("Contact: {c}\r\n"));
    }
    if let Some(e) = expires {
        t.push_str(&format!("Expires: {e}\r\n"));
    }
    t.push_str("Content-Length: 0\r\n\r\n");
    Message::parse(Bytes::from(t), Framing::Datagram).unwrap()
}

fn reg() -> Registrar {
    Registrar::new(RegistrarConfig {
        min_expires: 60,
        max_expires: 3600,
        default_expires: 1800,
        max_contacts: 3,
    })
}

fn kinds(changes: &[BindingChange]) -> Vec<Change> {
    changes.iter().map(|c| c.change).collect()
}

#[test]
fn expiry_comes_from_param_then_header_then_default_and_is_capped() {
    let t0 = Instant::now();
    let mut r = reg();
    r.register(
        t0,
        "100",
        &register(
            "c",
            1,
            &["<sip:100@192.0.2.5:5060>;expires=120"],
            Some("600"),
        ),
        udp(5060),
        None,
    )
    .unwrap();
    assert_eq!(r.bindings("100")[0].expires_in(t0), 120);
    r.register(
        t0,
        "100",
        &register("c", 2, &["<sip:100@192.0.2.5:5060>"], Some("600")),
        udp(5060),
        None,
    )
    .unwrap();
    assert_eq!(r.bindings("100")[0].expires_in(t0), 600);
    r.register(
        t0,
        "100",
        &register("c", 3, &["<sip:100@192.0.2.5:5060>"], None),
        udp(5060),
        None,
    )
    .unwrap();
    assert_eq!(r.bindings("100")[0].expires_in(t0), 1800);
    r.register(
        t0,
        "100",
        &register("c", 4, &["<sip:100@192.0.2.5:5060>;expires=99999"], None),
        udp(5060),
        None,
    )
    .unwrap();
    assert_eq!(r.bindings("100")[0].expires_in(t0), 3600);
    // A malformed expires parameter means the default.
    r.register(
        t0,
        "100",
        &register("c", 5, &["<sip:100@192.0.2.5:5060>;expires=soon"], None),
        udp(5060),
        None,
    )
    .unwrap();
    assert_eq!(r.bindings("100")[0].expires_in(t0), 1800);
    assert_eq!(r.count(), 1);
}

#[test]
fn too_brief_interval_is_refused_and_changes_nothing() {
    let t0 = Instant::now();
    let mut r = reg();
    let err = r
        .register(
            t0,
            "100",
            &register(
                "c",
                1,
                &[
                    "<sip:a@192.0.2.5>;expires=300",
                    "<sip:b@192.0.2.5>;expires=30",
                ],
                None,
            ),
            udp(5060),
            None,
        )
        .unwrap_err();
    assert_eq!(err, RegisterError::IntervalTooBrief { min_expires: 60 });
    assert_eq!(r.count(), 0);
}

#[test]
fn several_devices_refresh_and_unregister() {
    let t0 = Instant::now();
    let mut r = reg();
    let desk = "<sip:100@192.168.1.20:5060>";
    let soft = "<sip:100-x@198.51.100.9:40000;transport=tls>;+sip.instance=\"<urn:uuid:1>\"";
    let c = r
        .register(
            t0,
            "100",
            &register("desk", 1, &[desk], Some("300")),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Added]);
    let c = r
        .register(
            t0,
            "100",
            &register("soft", 1, &[soft], Some("300")),
            tls(7),
            Some("baresip"),
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Added]);
    assert_eq!(r.bindings("100").len(), 2);
    assert!(r.conn_has_bindings(7));

    let later = t0 + Duration::from_secs(100);
    let c = r
        .register(
            later,
            "100",
            &register("desk", 2, &[desk], Some("300")),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Refreshed]);
    assert_eq!(
        r.bindings("100")
            .iter()
            .find(|b| &*b.key == "sip:100@192.168.1.20:5060")
            .unwrap()
            .expires_in(later),
        300
    );

    let c = r
        .register(
            later,
            "100",
            &register("desk", 3, &["<sip:100@192.168.1.20:5060>;expires=0"], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Removed]);
    assert_eq!(r.bindings("100").len(), 1);
}

#[test]
fn same_instance_from_a_new_address_replaces_the_old_binding() {
    let t0 = Instant::now();
    let mut r = reg();
    let a = "<sip:100@10.0.0.5:5060>;+sip.instance=\"<urn:uuid:77>\";reg-id=1";
    let b = "<sip:100@10.0.0.9:6060>;+sip.instance=\"<urn:uuid:77>\";reg-id=1";
    r.register(t0, "100", &register("x", 1, &[a], None), udp(5060), None)
        .unwrap();
    let c = r
        .register(t0, "100", &register("y", 1, &[b], None), udp(6060), None)
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Refreshed]);
    assert_eq!(c[0].previous_flow, Some(udp(5060)));
    let bs = r.bindings("100");
    assert_eq!(bs.len(), 1);
    assert_eq!(&*bs[0].contact, "sip:100@10.0.0.9:6060");
    assert_eq!(bs[0].flow, udp(6060));
    assert_eq!(
        bs[0].contact_header(t0),
        "<sip:100@10.0.0.9:6060>;expires=1800;+sip.instance=\"<urn:uuid:77>\";reg-id=1"
    );
}

#[test]
fn a_full_extension_drops_the_binding_closest_to_expiry() {
    let t0 = Instant::now();
    let mut r = reg();
    for (i, exp) in [(1, 900), (2, 300), (3, 600)] {
        r.register(
            t0,
            "100",
            &register(
                &format!("c{i}"),
                1,
                &[&format!("<sip:100@192.0.2.{i}>;expires={exp}")],
                None,
            ),
            udp(5060),
            None,
        )
        .unwrap();
    }
    let c = r
        .register(
            t0,
            "100",
            &register("c4", 1, &["<sip:100@192.0.2.4>"], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Replaced, Change::Added]);
    assert_eq!(&*c[0].binding.contact, "sip:100@192.0.2.2");
    assert_eq!(r.bindings("100").len(), 3);
}

#[test]
fn wildcard_removes_all_only_with_expires_zero_alone() {
    let t0 = Instant::now();
    let mut r = reg();
    r.register(
        t0,
        "100",
        &register("c", 1, &["<sip:a@h>", "<sip:b@h>"], None),
        udp(5060),
        None,
    )
    .unwrap();
    assert_eq!(
        r.register(
            t0,
            "100",
            &register("d", 1, &["*"], Some("5")),
            udp(5060),
            None
        )
        .unwrap_err(),
        RegisterError::BadWildcard
    );
    assert_eq!(
        r.register(t0, "100", &register("d", 1, &["*"], None), udp(5060), None)
            .unwrap_err(),
        RegisterError::BadWildcard
    );
    assert_eq!(
        r.register(
            t0,
            "100",
            &register("d", 1, &["*", "<sip:a@h>"], Some("0")),
            udp(5060),
            None
        )
        .unwrap_err(),
        RegisterError::BadWildcard
    );
    // Same Call-ID, CSeq not higher: refused.
    assert_eq!(
        r.register(
            t0,
            "100",
            &register("c", 1, &["*"], Some("0")),
            udp(5060),
            None
        )
        .unwrap_err(),
        RegisterError::OutOfOrder
    );
    let c = r
        .register(
            t0,
            "100",
            &register("c", 2, &["*"], Some("0")),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Removed, Change::Removed]);
    assert_eq!(r.count(), 0);
}

#[test]
fn out_of_order_cseq_is_refused() {
    let t0 = Instant::now();
    let mut r = reg();
    r.register(
        t0,
        "100",
        &register("c", 5, &["<sip:a@h>"], None),
        udp(5060),
        None,
    )
    .unwrap();
    assert_eq!(
        r.register(
            t0,
            "100",
            &register("c", 4, &["<sip:a@h>"], None),
            udp(5060),
            None
        )
        .unwrap_err(),
        RegisterError::OutOfOrder
    );
    // A new Call-ID (the phone rebooted) may start over.
    assert!(
        r.register(
            t0,
            "100",
            &register("other", 1, &["<sip:a@h>"], None),
            udp(5060),
            None
        )
        .is_ok()
    );
}

#[test]
fn bad_contacts_are_refused() {
    let t0 = Instant::now();
    let mut r = reg();
    assert_eq!(
        r.register(
            t0,
            "100",
            &register("c", 1, &["<tel:+15551234>"], None),
            udp(5060),
            None
        )
        .unwrap_err(),
        RegisterError::UnsupportedContact
    );
    assert_eq!(
        r.register(
            t0,
            "100",
            &register("c", 1, &["<sip:a@h"], None),
            udp(5060),
            None
        )
        .unwrap_err(),
        RegisterError::MalformedContact
    );
    let many: Vec<String> = (0..=MAX_CONTACTS_PER_REQUEST)
        .map(|i| format!("<sip:{i}@h>"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        r.register(t0, "100", &register("c", 1, &many, None), udp(5060), None)
            .unwrap_err(),
        RegisterError::TooManyContacts
    );
}

#[test]
fn fetch_without_contact_changes_nothing() {
    let t0 = Instant::now();
    let mut r = reg();
    r.register(
        t0,
        "100",
        &register("c", 1, &["<sip:a@h>"], None),
        udp(5060),
        None,
    )
    .unwrap();
    let c = r
        .register(t0, "100", &register("c", 2, &[], None), udp(5060), None)
        .unwrap();
    assert!(c.is_empty());
    assert_eq!(r.count(), 1);
}

#[test]
fn bindings_expire_and_connections_take_theirs_along() {
    let t0 = Instant::now();
    let mut r = reg();
    r.register(
        t0,
        "100",
        &register("u", 1, &["<sip:a@h>;expires=60"], None),
        udp(5060),
        None,
    )
    .unwrap();
    r.register(
        t0,
        "101",
        &register("t", 1, &["<sip:b@h;transport=tls>;expires=3600"], None),
        tls(3),
        None,
    )
    .unwrap();
    assert_eq!(r.next_expiry(), Some(t0 + Duration::from_secs(60)));
    assert!(r.expire(t0 + Duration::from_secs(59)).is_empty());
    let c = r.expire(t0 + Duration::from_secs(60));
    assert_eq!(kinds(&c), vec![Change::Expired]);
    assert!(r.bindings("100").is_empty());

    let c = r.flow_closed(3);
    assert_eq!(kinds(&c), vec![Change::FlowClosed]);
    assert!(!r.conn_has_bindings(3));
    assert_eq!(r.count(), 0);
    // The old expiry entry of the closed flow's binding fires harmlessly.
    assert!(r.expire(t0 + Duration::from_secs(4000)).is_empty());
}

#[test]
fn a_binding_that_moves_to_another_connection_unpins_the_old_one() {
    let t0 = Instant::now();
    let mut r = reg();
    let c = "<sip:a@h;transport=tls>;+sip.instance=\"<urn:uuid:5>\"";
    r.register(t0, "100", &register("x", 1, &[c], None), tls(1), None)
        .unwrap();
    r.register(t0, "100", &register("x", 2, &[c], None), tls(2), None)
        .unwrap();
    assert!(!r.conn_has_bindings(1));
    assert!(r.conn_has_bindings(2));
    assert!(r.flow_closed(1).is_empty());
}

#[test]
fn refresh_storms_keep_the_expiry_heap_bounded() {
    let t0 = Instant::now();
    let mut r = reg();
    for i in 1..50_000u32 {
        r.register(
            t0,
            "100",
            &register("c", i, &["<sip:a@h>"], None),
            udp(5060),
            None,
        )
        .unwrap();
    }
    assert!(
        r.expiry.len() <= 2 * r.count() + 1025,
        "heap {}",
        r.expiry.len()
    );
}

#[test]
fn removed_extensions_lose_their_bindings() {
    let t0 = Instant::now();
    let mut r = reg();
    r.register(
        t0,
        "100",
        &register("c", 1, &["<sip:a@h>"], None),
        udp(5060),
        None,
    )
    .unwrap();
    r.register(
        t0,
        "101",
        &register("d", 1, &["<sip:b@h>"], None),
        udp(5060),
        None,
    )
    .unwrap();
    let c = r.retain_aors(|a| a == "101");
    assert_eq!(kinds(&c), vec![Change::ExtensionRemoved]);
    assert_eq!(r.count(), 1);
}

#[test]
fn refreshes_are_stored_only_when_the_stored_expiry_runs_low() {
    let t0 = Instant::now();
    let mut r = reg();
    let c = r
        .register(
            t0,
            "100",
            &register("c", 1, &["<sip:a@h>;expires=600"], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert!(c[0].store, "a new binding is stored");
    // 100 s later the stored expiry still has 500 of 600 s: no write.
    let c = r
        .register(
            t0 + Duration::from_secs(100),
            "100",
            &register("c", 2, &["<sip:a@h>;expires=600"], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert!(!c[0].store);
    // 350 s in, only 250 s of the stored 600 are left: write.
    let c = r
        .register(
            t0 + Duration::from_secs(350),
            "100",
            &register("c", 3, &["<sip:a@h>;expires=600"], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert!(c[0].store);
    // A new source address is always written, however recent the last write.
    let c = r
        .register(
            t0 + Duration::from_secs(351),
            "100",
            &register("c", 4, &["<sip:a@h>;expires=600"], None),
            udp(7000),
            None,
        )
        .unwrap();
    assert!(c[0].store);
    let c = r
        .register(
            t0 + Duration::from_secs(352),
            "100",
            &register("c", 5, &["<sip:a@h>;expires=0"], None),
            udp(7000),
            None,
        )
        .unwrap();
    assert!(c[0].store, "a removal is stored");
}

/// Without `+sip.instance`, a binding is found by comparing Contact URIs as
/// RFC 3261 §19.1.4 does: a phone that writes its Contact differently when
/// it refreshes or unregisters still reaches its binding (escapes, case,
/// parameters only one spelling has), while a transport named in one only
/// tells two contacts apart.
#[test]
fn contacts_without_instance_are_compared_as_uris() {
    let t0 = Instant::now();
    let mut r = reg();
    let first = "<sip:%31%30%30@Phone.Example:5062;transport=TCP;line=a1>";
    r.register(
        t0,
        "100",
        &register("x", 1, &[first], None),
        udp(5060),
        None,
    )
    .unwrap();
    let refresh = "<sip:100@phone.example:5062;Transport=tcp;ob>";
    let c = r
        .register(
            t0,
            "100",
            &register("x", 2, &[refresh], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Refreshed]);
    assert_eq!(r.bindings("100").len(), 1);
    assert_eq!(
        &*r.bindings("100")[0].contact,
        "sip:100@phone.example:5062;Transport=tcp;ob"
    );
    // The store knows a binding by its Contact as last sent: the copy under
    // the old spelling goes, the new one is written.
    assert_eq!(
        c[0].previous_key.as_deref(),
        Some("sip:%31%30%30@Phone.Example:5062;transport=TCP;line=a1")
    );
    assert_eq!(
        &*c[0].binding.key,
        "sip:100@phone.example:5062;Transport=tcp;ob"
    );
    assert!(c[0].store);

    let other_line = "<sip:100@phone.example:5062;transport=tcp;line=b2>";
    let no_transport = "<sip:100@phone.example:5062>";
    let c = r
        .register(
            t0,
            "100",
            &register("x", 3, &[other_line, no_transport], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Refreshed, Change::Added]);
    assert_eq!(r.bindings("100").len(), 2);

    let c = r
        .register(
            t0,
            "100",
            &register("x", 4, &["<sip:100@PHONE.example:5062>;expires=0"], None),
            udp(5060),
            None,
        )
        .unwrap();
    assert_eq!(kinds(&c), vec![Change::Removed]);
    assert_eq!(r.bindings("100").len(), 1);
}
