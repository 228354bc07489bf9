//! Header names, with RFC 3261 §7.3.3 compact forms folded into the full name.

macro_rules! header_names {
    ($( $variant:ident => $full:literal $(, $compact:literal)? ;)*) => {
        /// A header name. Well-known names get a variant so lookups are a
        /// comparison of small integers; anything else is `Other` and keeps
        /// its spelling in the message.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum HeaderName {
            $( $variant, )*
            Other,
        }

        impl HeaderName {
            /// The canonical full name, used when Parley writes a header.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( HeaderName::$variant => $full, )*
                    HeaderName::Other => "",
                }
            }

            /// Case-insensitive lookup of a full or compact name.
            pub fn from_name(name: &[u8]) -> HeaderName {
                if name.len() == 1 {
                    let c = name[0].to_ascii_lowercase();
                    $( $( if c == $compact { return HeaderName::$variant; } )? )*
                    return HeaderName::Other;
                }
                lookup(name)
            }
        }

        /// Every full name, for the lookup table.
        const ALL: &[(&str, HeaderName)] = &[ $( ($full, HeaderName::$variant), )* ];
    };
}

header_names! {
    Via => "Via", b'v';
    From => "From", b'f';
    To => "To", b't';
    CallId => "Call-ID", b'i';
    CSeq => "CSeq";
    Contact => "Contact", b'm';
    ContentLength => "Content-Length", b'l';
    ContentType => "Content-Type", b'c';
    ContentEncoding => "Content-Encoding", b'e';
    MaxForwards => "Max-Forwards";
    Expires => "Expires";
    MinExpires => "Min-Expires";
    Authorization => "Authorization";
    ProxyAuthorization => "Proxy-Authorization";
    WwwAuthenticate => "WWW-Authenticate";
    ProxyAuthenticate => "Proxy-Authenticate";
    AuthenticationInfo => "Authentication-Info";
    Route => "Route";
    RecordRoute => "Record-Route";
    Supported => "Supported", b'k';
    Require => "Require";
    ProxyRequire => "Proxy-Require";
    Unsupported => "Unsupported";
    Allow => "Allow";
    Accept => "Accept";
    AcceptEncoding => "Accept-Encoding";
    AcceptLanguage => "Accept-Language";
    UserAgent => "User-Agent";
    Server => "Server";
    Date => "Date";
    Timestamp => "Timestamp";
    RetryAfter => "Retry-After";
    Warning => "Warning";
    Event => "Event", b'o';
    AllowEvents => "Allow-Events", b'u';
    SessionExpires => "Session-Expires", b'x';
    MinSe => "Min-SE";
    InfoPackage => "Info-Package";
    RecvInfo => "Recv-Info";
    ReferTo => "Refer-To", b'r';
    ReferredBy => "Referred-By", b'b';
    Replaces => "Replaces";
    Subject => "Subject", b's';
    Path => "Path";
    Reason => "Reason";
    PAssertedIdentity => "P-Asserted-Identity";
    AcceptContact => "Accept-Contact", b'a';
    RejectContact => "Reject-Contact", b'j';
    RequestDisposition => "Request-Disposition", b'd';
    Identity => "Identity", b'y';
    IdentityInfo => "Identity-Info", b'n';
}

/// Slots in the open-addressing table of full names (a power of two,
/// comfortably above the number of names).
const SLOTS: usize = 256;

/// Where probing for a name starts: its length and first and last letters.
fn slot_of(name: &[u8]) -> usize {
    let first = usize::from(name.first().map_or(0, u8::to_ascii_lowercase));
    let last = usize::from(name.last().map_or(0, u8::to_ascii_lowercase));
    (name.len().wrapping_mul(31) ^ first.wrapping_mul(7) ^ last.wrapping_mul(131)) & (SLOTS - 1)
}

/// Finds a full header name in a table built once: one or two probes
/// instead of comparing against every known name.
fn lookup(name: &[u8]) -> HeaderName {
    static TABLE: std::sync::OnceLock<[Option<(&'static str, HeaderName)>; SLOTS]> =
        std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [None; SLOTS];
        for &(full, variant) in ALL {
            let mut i = slot_of(full.as_bytes());
            while t[i].is_some() {
                i = (i + 1) & (SLOTS - 1);
            }
            t[i] = Some((full, variant));
        }
        t
    });
    let mut i = slot_of(name);
    while let Some((full, variant)) = table[i] {
        if full.len() == name.len() && name.eq_ignore_ascii_case(full.as_bytes()) {
            return variant;
        }
        i = (i + 1) & (SLOTS - 1);
    }
    HeaderName::Other
}

impl HeaderName {
    /// Headers whose values may be combined into one comma-separated line
    /// (RFC 3261 §7.3.1). The authentication headers are the classic
    /// exception: their parameters contain commas.
    pub fn is_comma_list(self) -> bool {
        matches!(
            self,
            HeaderName::Via
                | HeaderName::Contact
                | HeaderName::Route
                | HeaderName::RecordRoute
                | HeaderName::Supported
                | HeaderName::Require
                | HeaderName::ProxyRequire
                | HeaderName::Unsupported
                | HeaderName::Allow
                | HeaderName::Accept
                | HeaderName::AcceptEncoding
                | HeaderName::AcceptLanguage
                | HeaderName::AllowEvents
                | HeaderName::Path
                | HeaderName::Warning
                | HeaderName::ContentEncoding
        )
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderName;

    #[test]
    fn compact_and_case_insensitive() {
        assert_eq!(HeaderName::from_name(b"v"), HeaderName::Via);
        assert_eq!(HeaderName::from_name(b"V"), HeaderName::Via);
        assert_eq!(HeaderName::from_name(b"cAlL-iD"), HeaderName::CallId);
        assert_eq!(HeaderName::from_name(b"i"), HeaderName::CallId);
        assert_eq!(HeaderName::from_name(b"l"), HeaderName::ContentLength);
        assert_eq!(HeaderName::from_name(b"X-Custom"), HeaderName::Other);
        assert_eq!(HeaderName::from_name(b"q"), HeaderName::Other);
        assert_eq!(HeaderName::from_name(b""), HeaderName::Other);
    }

    #[test]
    fn every_full_name_is_found_in_any_case() {
        for &(full, variant) in super::ALL {
            assert_eq!(HeaderName::from_name(full.as_bytes()), variant, "{full}");
            assert_eq!(
                HeaderName::from_name(full.to_ascii_uppercase().as_bytes()),
                variant
            );
            assert_eq!(
                HeaderName::from_name(full.to_ascii_lowercase().as_bytes()),
                variant
            );
        }
        assert_eq!(HeaderName::from_name(b"X-Via"), HeaderName::Other);
        assert_eq!(HeaderName::from_name(b"Vio"), HeaderName::Other);
    }
}
