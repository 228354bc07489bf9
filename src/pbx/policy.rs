//! The encryption policy: where a device may use plain UDP/TCP and RTP, and
//! where it must use TLS and SRTP. One rule, decided here for every leg.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::sip::transport::Transport;

/// An extension's encryption setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EncryptionPolicy {
    /// TLS signaling and SRTP media from everywhere.
    Required,
    /// TLS and SRTP for devices outside the LAN networks; LAN devices may
    /// use UDP/TCP and RTP. The default: remote phones are protected, desk
    /// phones keep working.
    #[default]
    RequiredRemote,
    /// SRTP whenever the leg is TLS and the device accepts it.
    Preferred,
    /// Plain signaling and media are accepted everywhere.
    Off,
}

impl EncryptionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionPolicy::Required => "required",
            EncryptionPolicy::RequiredRemote => "required-remote",
            EncryptionPolicy::Preferred => "preferred",
            EncryptionPolicy::Off => "off",
        }
    }

    /// Whether a device at `source` must reach Parley over TLS.
    pub fn requires_tls(self, source: IpAddr, lan: &LanNetworks) -> bool {
        match self {
            EncryptionPolicy::Required => true,
            EncryptionPolicy::RequiredRemote => !lan.contains(source),
            EncryptionPolicy::Preferred | EncryptionPolicy::Off => false,
        }
    }

    /// Checks a registration (or any request from the device) against the
    /// policy. The error text becomes the reason phrase of the `403`.
    pub fn check_transport(
        self,
        transport: Transport,
        source: IpAddr,
        lan: &LanNetworks,
    ) -> Result<(), PolicyViolation> {
        if transport == Transport::Tls || !self.requires_tls(source, lan) {
            return Ok(());
        }
        Err(match self {
            EncryptionPolicy::Required => PolicyViolation::TlsRequired,
            _ => PolicyViolation::TlsRequiredRemote,
        })
    }
}

/// How a call leg's media must be protected, decided from the policy of
/// the device's extension, the leg's signaling transport and where the
/// device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaSecurity {
    /// SRTP or no call (`RTP/SAVP` offers; plain answers are refused).
    Srtp,
    /// SRTP offered and used when the device takes it (`RTP/AVP` with
    /// `a=crypto`), plain RTP otherwise.
    SrtpIfAccepted,
    /// Plain RTP. Always so on UDP/TCP signaling: SDES keys are never sent
    /// where they could be read.
    Plain,
}

impl EncryptionPolicy {
    /// The protection a leg gets. On UDP/TCP it is always plain; a policy
    /// that demands SRTP there is a violation, as for registration.
    pub fn media_security(
        self,
        transport: Transport,
        source: IpAddr,
        lan: &LanNetworks,
    ) -> Result<MediaSecurity, PolicyViolation> {
        if transport != Transport::Tls {
            self.check_transport(transport, source, lan)?;
            return Ok(MediaSecurity::Plain);
        }
        Ok(match self {
            EncryptionPolicy::Required => MediaSecurity::Srtp,
            EncryptionPolicy::RequiredRemote if !lan.contains(source) => MediaSecurity::Srtp,
            EncryptionPolicy::RequiredRemote | EncryptionPolicy::Preferred => {
                MediaSecurity::SrtpIfAccepted
            }
            EncryptionPolicy::Off => MediaSecurity::Plain,
        })
    }
}

impl fmt::Display for EncryptionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EncryptionPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(EncryptionPolicy::Required),
            "required-remote" => Ok(EncryptionPolicy::RequiredRemote),
            "preferred" => Ok(EncryptionPolicy::Preferred),
            "off" => Ok(EncryptionPolicy::Off),
            other => Err(format!(
                "unknown encryption policy {other:?}: expected required, required-remote, preferred or off"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    #[error("TLS Required By Encryption Policy")]
    TlsRequired,
    #[error("TLS Required Outside The LAN")]
    TlsRequiredRemote,
}

/// The networks Parley treats as the office LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanNetworks(Vec<IpNet>);

impl LanNetworks {
    pub fn new(nets: Vec<IpNet>) -> LanNetworks {
        LanNetworks(nets)
    }

    /// RFC 1918 private ranges, loopback, link-local and IPv6 unique-local.
    pub fn default_private() -> LanNetworks {
        let nets = [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "::1/128",
            "fe80::/10",
            "fc00::/7",
        ];
        LanNetworks(
            nets.iter()
                .map(|n| n.parse().expect("valid built-in network"))
                .collect(),
        )
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub fn networks(&self) -> &[IpNet] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lan_covers_private_ranges_only() {
        let lan = LanNetworks::default_private();
        for ip in [
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "::1",
            "fd00::5",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(lan.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "2001:db8::1", "198.51.100.7"] {
            assert!(!lan.contains(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn policy_decides_tls_by_place() {
        let lan = LanNetworks::default_private();
        let office: IpAddr = "192.168.1.20".parse().unwrap();
        let road: IpAddr = "203.0.113.9".parse().unwrap();
        use EncryptionPolicy::*;
        assert!(
            RequiredRemote
                .check_transport(Transport::Udp, office, &lan)
                .is_ok()
        );
        assert_eq!(
            RequiredRemote.check_transport(Transport::Udp, road, &lan),
            Err(PolicyViolation::TlsRequiredRemote)
        );
        assert_eq!(
            RequiredRemote.check_transport(Transport::Tcp, road, &lan),
            Err(PolicyViolation::TlsRequiredRemote)
        );
        assert!(
            RequiredRemote
                .check_transport(Transport::Tls, road, &lan)
                .is_ok()
        );
        assert_eq!(
            Required.check_transport(Transport::Udp, office, &lan),
            Err(PolicyViolation::TlsRequired)
        );
        assert!(
            Required
                .check_transport(Transport::Tls, office, &lan)
                .is_ok()
        );
        assert!(
            Preferred
                .check_transport(Transport::Udp, road, &lan)
                .is_ok()
        );
        assert!(Off.check_transport(Transport::Tcp, road, &lan).is_ok());
    }

    #[test]
    fn media_security_follows_transport_and_place() {
        let lan = LanNetworks::default_private();
        let desk: IpAddr = "192.168.1.20".parse().unwrap();
        let road: IpAddr = "203.0.113.9".parse().unwrap();
        let m = |p: EncryptionPolicy, t, ip| p.media_security(t, ip, &lan);
        use EncryptionPolicy::*;
        use MediaSecurity::*;
        assert_eq!(m(RequiredRemote, Transport::Udp, desk), Ok(Plain));
        assert_eq!(m(RequiredRemote, Transport::Tls, desk), Ok(SrtpIfAccepted));
        assert_eq!(m(RequiredRemote, Transport::Tls, road), Ok(Srtp));
        assert_eq!(
            m(RequiredRemote, Transport::Udp, road),
            Err(PolicyViolation::TlsRequiredRemote)
        );
        assert_eq!(m(Required, Transport::Tls, desk), Ok(Srtp));
        assert_eq!(
            m(Required, Transport::Tcp, desk),
            Err(PolicyViolation::TlsRequired)
        );
        assert_eq!(m(Preferred, Transport::Tls, road), Ok(SrtpIfAccepted));
        assert_eq!(m(Preferred, Transport::Udp, road), Ok(Plain));
        assert_eq!(m(Off, Transport::Tls, road), Ok(Plain));
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [
            EncryptionPolicy::Required,
            EncryptionPolicy::RequiredRemote,
            EncryptionPolicy::Preferred,
            EncryptionPolicy::Off,
        ] {
            assert_eq!(p.as_str().parse::<EncryptionPolicy>().unwrap(), p);
        }
        assert!("maybe".parse::<EncryptionPolicy>().is_err());
    }
}
