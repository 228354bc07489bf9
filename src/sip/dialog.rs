//! Dialogs (RFC 3261 §12): what a user agent remembers about one call leg
//! once it is established, and the in-dialog requests built from it.
//! Parley is a B2BUA, so every call has two of these, one per phone, and
//! nothing crosses from one to the other.

use bytes::Bytes;

use super::message::{HeaderName, Message, MessageBuilder, NameAddr};

/// The Max-Forwards of requests Parley starts.
pub const MAX_FORWARDS: &str = "70";
/// Route headers kept from Record-Route (a phone behind one or two proxies
/// has a few; more is an attack on memory).
pub const MAX_ROUTE_SET: usize = 8;

/// Why a message cannot start or continue a dialog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DialogError {
    #[error("missing or malformed {0} header")]
    Header(&'static str),
    #[error("missing tag in {0}")]
    Tag(&'static str),
    #[error("too many Record-Route entries")]
    TooManyRoutes,
}

/// One dialog, from Parley's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// Parley's URI in this dialog (From of the requests it sends).
    pub local_uri: String,
    /// The phone's URI (To of the requests Parley sends).
    pub remote_uri: String,
    /// CSeq of the last request Parley sent in the dialog.
    pub local_seq: u32,
    /// CSeq of the last request the phone sent, once it sent one.
    pub remote_seq: Option<u32>,
    /// Where in-dialog requests go: the phone's Contact.
    pub remote_target: String,
    /// Route headers for in-dialog requests, in sending order.
    pub route_set: Vec<String>,
    /// Parley's Contact URI on this leg.
    pub local_contact: String,
}

fn name_addr<'a>(
    msg: &'a Message,
    name: HeaderName,
    what: &'static str,
) -> Result<NameAddr<'a>, DialogError> {
    msg.header(name)
        .and_then(NameAddr::parse)
        .ok_or(DialogError::Header(what))
}

fn record_routes(msg: &Message) -> Result<Vec<String>, DialogError> {
    let routes: Vec<String> = msg
        .header_values(HeaderName::RecordRoute)
        .map(str::to_string)
        .take(MAX_ROUTE_SET + 1)
        .collect();
    if routes.len() > MAX_ROUTE_SET {
        return Err(DialogError::TooManyRoutes);
    }
    Ok(routes)
}

impl Dialog {
    /// The dialog Parley (as UAS) forms by answering `request` with
    /// `local_tag` in its To.
    pub fn as_uas(
        request: &Message,
        local_tag: &str,
        local_contact: &str,
        local_seq: u32,
    ) -> Result<Dialog, DialogError> {
        let from = name_addr(request, HeaderName::From, "From")?;
        let to = name_addr(request, HeaderName::To, "To")?;
        let contact = name_addr(request, HeaderName::Contact, "Contact")?;
        let cseq = request.cseq().ok_or(DialogError::Header("CSeq"))?;
        Ok(Dialog {
            call_id: request
                .call_id()
                .ok_or(DialogError::Header("Call-ID"))?
                .to_string(),
            local_tag: local_tag.to_string(),
            remote_tag: from.tag().ok_or(DialogError::Tag("From"))?.to_string(),
            local_uri: to.uri.to_string(),
            remote_uri: from.uri.to_string(),
            local_seq,
            remote_seq: Some(cseq.seq),
            remote_target: contact.uri.to_string(),
            route_set: record_routes(request)?,
            local_contact: local_contact.to_string(),
        })
    }

    /// The dialog Parley (as UAC) forms from the `request` it sent and a
    /// response carrying the phone's To tag (a 2xx, or a 1xx for an early
    /// dialog).
    pub fn as_uac(
        request: &Message,
        response: &Message,
        local_contact: &str,
    ) -> Result<Dialog, DialogError> {
        let from = name_addr(request, HeaderName::From, "From")?;
        let to = name_addr(response, HeaderName::To, "To")?;
        let contact = name_addr(response, HeaderName::Contact, "Contact")?;
        let cseq = request.cseq().ok_or(DialogError::Header("CSeq"))?;
        let mut route_set = record_routes(response)?;
        route_set.reverse();
        Ok(Dialog {
            call_id: request
                .call_id()
                .ok_or(DialogError::Header("Call-ID"))?
                .to_string(),
            local_tag: from.tag().ok_or(DialogError::Tag("From"))?.to_string(),
            remote_tag: to.tag().ok_or(DialogError::Tag("To"))?.to_string(),
            local_uri: from.uri.to_string(),
            remote_uri: to.uri.to_string(),
            local_seq: cseq.seq,
            remote_seq: None,
            remote_target: contact.uri.to_string(),
            route_set,
            local_contact: local_contact.to_string(),
        })
    }

    /// Whether an incoming request belongs to this dialog: same Call-ID,
    /// its To tag is ours and its From tag the phone's.
    pub fn matches(&self, request: &Message) -> bool {
        let tag = |h| {
            request
                .header(h)
                .and_then(NameAddr::parse)
                .and_then(|n| n.tag())
        };
        request.call_id() == Some(self.call_id.as_str())
            && tag(HeaderName::To) == Some(self.local_tag.as_str())
            && tag(HeaderName::From) == Some(self.remote_tag.as_str())
    }

    /// Records the CSeq of an in-dialog request from the phone. False when
    /// it is lower than one already seen (RFC 3261 §12.2.2: answer 500).
    pub fn accept_remote_cseq(&mut self, seq: u32) -> bool {
        if self.remote_seq.is_some_and(|last| seq < last) {
            return false;
        }
        self.remote_seq = Some(seq);
        true
    }

    /// A target refresh (re-INVITE, UPDATE, their 2xx) may move the phone.
    pub fn refresh_target(&mut self, msg: &Message) {
        if let Some(c) = msg.header(HeaderName::Contact).and_then(NameAddr::parse) {
            self.remote_target = c.uri.to_string();
        }
    }

    /// Starts an in-dialog request: request line to the remote target, the
    /// caller's `via`, Route set, From/To with tags, Call-ID, CSeq (the next
    /// one, or `cseq` for an ACK, which reuses its INVITE's), Max-Forwards,
    /// and Contact. The caller adds any other headers and the body.
    pub fn request(&mut self, method: &str, via: &str, cseq: Option<u32>) -> MessageBuilder {
        let seq = match cseq {
            Some(s) => s,
            None => {
                self.local_seq = self.local_seq.wrapping_add(1);
                self.local_seq
            }
        };
        let mut b = MessageBuilder::request(method, &self.remote_target);
        b.header(HeaderName::Via, via);
        for route in &self.route_set {
            b.header(HeaderName::Route, route);
        }
        b.header_fmt(
            HeaderName::From,
            format_args!("<{}>;tag={}", self.local_uri, self.local_tag),
        );
        b.header_fmt(
            HeaderName::To,
            format_args!("<{}>;tag={}", self.remote_uri, self.remote_tag),
        );
        b.header(HeaderName::CallId, &self.call_id);
        b.header_fmt(HeaderName::CSeq, format_args!("{seq} {method}"));
        b.header(HeaderName::MaxForwards, MAX_FORWARDS);
        if method != "ACK" && method != "BYE" {
            b.header_fmt(
                HeaderName::Contact,
                format_args!("<{}>", self.local_contact),
            );
        }
        b
    }

    /// The ACK for a 2xx to the INVITE with CSeq `invite_seq` (RFC 3261
    /// §13.2.2.4): a request of its own, in the dialog.
    pub fn ack(&mut self, invite_seq: u32, via: &str, sdp: Option<&[u8]>) -> Bytes {
        let b = self.request("ACK", via, Some(invite_seq));
        match sdp {
            Some(body) => b.finish_with_body(Some("application/sdp"), body),
            None => b.finish_with_body(None, b""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::Framing;

    fn parse(text: &str) -> Message {
        Message::parse(Bytes::from(text.replace('\n', "\r\n")), Framing::Datagram).unwrap()
    }

    const INVITE: &str = "INVITE sip:201@pbx.example SIP/2.0
Via: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bKa1
Record-Route: <sip:p1.example;lr>
Record-Route: <sip:p2.example;lr>
From: \"Alice\" <sip:200@pbx.example>;tag=alice1
To: <sip:201@pbx.example>
Call-ID: c1@192.0.2.10
CSeq: 10 INVITE
Contact: <sip:200@192.0.2.10:5061;transport=tls>
Max-Forwards: 70
Content-Length: 0

";

    #[test]
    fn uas_dialog_follows_record_route_in_order() {
        let invite = parse(INVITE);
        let mut d = Dialog::as_uas(
            &invite,
            "parley9",
            "sip:parley@198.51.100.1:5061;transport=tls",
            500,
        )
        .unwrap();
        assert_eq!(d.remote_tag, "alice1");
        assert_eq!(d.remote_target, "sip:200@192.0.2.10:5061;transport=tls");
        assert_eq!(d.route_set, ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]);
        assert!(d.matches(&parse(
            "BYE sip:x SIP/2.0\nVia: SIP/2.0/TLS h;branch=z9hG4bKb\nFrom: <sip:200@pbx.example>;tag=alice1\n\
             To: <sip:201@pbx.example>;tag=parley9\nCall-ID: c1@192.0.2.10\nCSeq: 11 BYE\nContent-Length: 0\n\n"
        )));
        assert!(!d.accept_remote_cseq(9));
        assert!(d.accept_remote_cseq(11));

        let bye = Message::parse(
            d.request(
                "BYE",
                "SIP/2.0/TLS 198.51.100.1:5061;branch=z9hG4bKp1",
                None,
            )
            .finish_with_body(None, b""),
            Framing::Datagram,
        )
        .unwrap();
        assert_eq!(bye.request_uri(), "sip:200@192.0.2.10:5061;transport=tls");
        assert_eq!(
            bye.header_values(HeaderName::Route).collect::<Vec<_>>(),
            ["<sip:p1.example;lr>", "<sip:p2.example;lr>"]
        );
        assert_eq!(
            bye.header(HeaderName::From),
            Some("<sip:201@pbx.example>;tag=parley9")
        );
        assert_eq!(
            bye.header(HeaderName::To),
            Some("<sip:200@pbx.example>;tag=alice1")
        );
        assert_eq!(bye.header(HeaderName::CSeq), Some("501 BYE"));
        assert_eq!(bye.header(HeaderName::Contact), None);
    }

    #[test]
    fn uac_dialog_reverses_record_route_and_acks_with_the_invite_cseq() {
        let ours = parse(
            "INVITE sip:201@192.168.1.20:5060 SIP/2.0\nVia: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKo1\n\
             From: <sip:200@pbx.example>;tag=p1\nTo: <sip:201@pbx.example>\nCall-ID: b2b-1\nCSeq: 1 INVITE\n\
             Contact: <sip:parley@198.51.100.1:5060>\nContent-Length: 0\n\n",
        );
        let ok = parse(
            "SIP/2.0 200 OK\nVia: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKo1\nRecord-Route: <sip:a;lr>\n\
             Record-Route: <sip:b;lr>\nFrom: <sip:200@pbx.example>;tag=p1\nTo: <sip:201@pbx.example>;tag=bob7\n\
             Call-ID: b2b-1\nCSeq: 1 INVITE\nContact: <sip:201@192.168.1.20:5060>\nContent-Length: 0\n\n",
        );
        let mut d = Dialog::as_uac(&ours, &ok, "sip:parley@198.51.100.1:5060").unwrap();
        assert_eq!(
            (d.local_tag.as_str(), d.remote_tag.as_str()),
            ("p1", "bob7")
        );
        assert_eq!(d.route_set, ["<sip:b;lr>", "<sip:a;lr>"]);
        let ack = Message::parse(
            d.ack(1, "SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKa2", None),
            Framing::Datagram,
        )
        .unwrap();
        assert_eq!(ack.header(HeaderName::CSeq), Some("1 ACK"));
        assert_eq!(ack.request_uri(), "sip:201@192.168.1.20:5060");
        // The next request takes the next number.
        let reinvite = Message::parse(
            d.request("INVITE", "SIP/2.0/UDP h;branch=z9hG4bKr", None)
                .finish_with_body(None, b""),
            Framing::Datagram,
        )
        .unwrap();
        assert_eq!(reinvite.header(HeaderName::CSeq), Some("2 INVITE"));
        assert_eq!(
            reinvite.header(HeaderName::Contact),
            Some("<sip:parley@198.51.100.1:5060>")
        );
    }

    #[test]
    fn dialogs_need_tags_and_bounded_routes() {
        let no_tag = parse(&INVITE.replace(";tag=alice1", ""));
        assert_eq!(
            Dialog::as_uas(&no_tag, "t", "sip:c", 1).unwrap_err(),
            DialogError::Tag("From")
        );
        let no_contact =
            parse(&INVITE.replace("Contact: <sip:200@192.0.2.10:5061;transport=tls>\n", ""));
        assert_eq!(
            Dialog::as_uas(&no_contact, "t", "sip:c", 1).unwrap_err(),
            DialogError::Header("Contact")
        );
        let many = INVITE.replace(
            "Record-Route: <sip:p1.example;lr>\n",
            &"Record-Route: <sip:p.example;lr>\n".repeat(9),
        );
        assert_eq!(
            Dialog::as_uas(&parse(&many), "t", "sip:c", 1).unwrap_err(),
            DialogError::TooManyRoutes
        );
    }
}
