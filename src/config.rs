//! Configuration: a TOML file, then command-line flags over it, validated
//! once at start-up. Every setting has a default, documented in README.md;
//! a bad value stops start-up with the key and the reason.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest hold timeout accepted: a week.
const MAX_HOLD_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

use ipnet::IpNet;
use serde::Deserialize;

use crate::pbx::core::CoreConfig;
use crate::pbx::lockout::LockoutConfig;
use crate::pbx::policy::LanNetworks;
use crate::pbx::registrar::RegistrarConfig;

/// A setting that cannot be used, named by its key in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid setting `{}`: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The file as written: every field optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub sip: SipSection,
    #[serde(default)]
    pub tls: TlsSection,
    #[serde(default)]
    pub https: HttpsSection,
    #[serde(default)]
    pub media: MediaSection,
    #[serde(default)]
    pub security: SecuritySection,
    #[serde(default)]
    pub log: LogSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipSection {
    pub udp: Option<String>,
    pub tcp: Option<String>,
    pub tls: Option<String>,
    pub domain: Option<String>,
    pub advertise: Option<String>,
    pub realm: Option<String>,
    pub min_expires: Option<u32>,
    pub max_expires: Option<u32>,
    pub default_expires: Option<u32>,
    pub max_contacts: Option<u32>,
    pub idle_timeout_secs: Option<u64>,
    pub keepalive_secs: Option<u64>,
    pub nonce_lifetime_secs: Option<u64>,
    pub md5_only_user_agents: Option<Vec<String>>,
    pub max_connections: Option<u32>,
    pub max_connections_per_source: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub reload_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsSection {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaSection {
    pub rtp_ports: Option<String>,
    pub ring_timeout_secs: Option<u64>,
    pub media_timeout_secs: Option<u64>,
    pub hold_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    pub lan_networks: Option<Vec<String>>,
    pub lockout_extension_failures: Option<u32>,
    pub lockout_source_failures: Option<u32>,
    pub lockout_window_secs: Option<u64>,
    pub lockout_block_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<String>,
}

/// Flags of `parley serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub sip_udp: Option<String>,
    pub sip_tcp: Option<String>,
    pub sip_tls: Option<String>,
    pub https: Option<String>,
    pub rtp_ports: Option<String>,
    pub domain: Option<String>,
    pub advertise: Option<String>,
}

/// The validated configuration Parley runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub sip_udp: Option<SocketAddr>,
    pub sip_tcp: Option<SocketAddr>,
    pub sip_tls: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub rtp_ports: (u16, u16),
    pub domain: String,
    pub advertise: Option<IpAddr>,
    /// The realm from the file, if set; otherwise the one stored with the data.
    pub realm: Option<String>,
    pub registrar: RegistrarConfig,
    pub idle_timeout: Duration,
    /// How often Parley pings remote phones to keep NAT mappings open
    /// (OPTIONS on UDP, TCP keep-alive probes on TCP/TLS); zero: never.
    pub keepalive: Duration,
    pub max_connections: usize,
    /// TCP + TLS connections from one IPv4 address or IPv6 /64.
    pub max_connections_per_source: usize,
    pub nonce_lifetime_secs: u64,
    /// How long a call rings before the caller gets 480.
    pub ring_timeout: Duration,
    /// A call whose media stops this long is hung up.
    pub media_timeout: Duration,
    /// A call on hold whose media stops this long is hung up; `None`: never.
    pub hold_timeout: Option<Duration>,
    pub md5_only_user_agents: Vec<String>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub cert_reload_interval: Duration,
    pub lan: LanNetworks,
    pub lockout: LockoutConfig,
    pub log_level: String,
}

pub const DEFAULT_DATA_DIR: &str = "./parley-data";

impl Config {
    /// Reads the file (if given), applies the flags and validates.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let parsed = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
                })?;
                parse_file(&text)?
            }
            None => FileConfig::default(),
        };
        Config::resolve(parsed, overrides)
    }

    pub fn resolve(f: FileConfig, o: Overrides) -> Result<Config, ConfigError> {
        let data_dir = o
            .data_dir
            .or(f.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let sip_udp = listen_addr(
            "sip.udp",
            o.sip_udp.or(f.sip.udp).as_deref().unwrap_or("0.0.0.0:5060"),
        )?;
        let sip_tcp = listen_addr(
            "sip.tcp",
            o.sip_tcp.or(f.sip.tcp).as_deref().unwrap_or("0.0.0.0:5060"),
        )?;
        let sip_tls = listen_addr(
            "sip.tls",
            o.sip_tls.or(f.sip.tls).as_deref().unwrap_or("0.0.0.0:5061"),
        )?;
        let https = listen_addr(
            "https.listen",
            o.https
                .or(f.https.listen)
                .as_deref()
                .unwrap_or("0.0.0.0:8443"),
        )?;
        if sip_udp.is_none() && sip_tcp.is_none() && sip_tls.is_none() {
            return Err(ConfigError::new(
                "sip",
                "at least one of udp, tcp and tls must listen",
            ));
        }
        let rtp_ports = port_range(
            "media.rtp_ports",
            o.rtp_ports
                .or(f.media.rtp_ports)
                .as_deref()
                .unwrap_or("20000-29999"),
        )?;

        let domain = o.domain.or(f.sip.domain).unwrap_or_else(default_domain);
        if !valid_domain(&domain) {
            return Err(ConfigError::new(
                "sip.domain",
                format!("{domain:?} is not a valid host name or IP address"),
            ));
        }
        let advertise = match o.advertise.or(f.sip.advertise) {
            Some(a) => Some(a.parse::<IpAddr>().map_err(|_| {
                ConfigError::new("sip.advertise", format!("{a:?} is not an IP address"))
            })?),
            None => None,
        };
        if advertise.is_some_and(|a| a.is_unspecified()) {
            return Err(ConfigError::new(
                "sip.advertise",
                "must be an address phones can reach, not 0.0.0.0 or ::",
            ));
        }
        let realm = f.sip.realm;
        if let Some(r) = &realm
            && (r.is_empty()
                || r.len() > 128
                || r.chars().any(|c| c.is_control() || c == '"' || c == '\\'))
        {
            return Err(ConfigError::new(
                "sip.realm",
                "must be 1 to 128 printable characters without quotes or backslashes",
            ));
        }

        let registrar = RegistrarConfig {
            min_expires: f.sip.min_expires.unwrap_or(60),
            max_expires: f.sip.max_expires.unwrap_or(3600),
            default_expires: f.sip.default_expires.unwrap_or(3600),
            max_contacts: f.sip.max_contacts.unwrap_or(10) as usize,
        };
        if registrar.min_expires == 0 {
            return Err(ConfigError::new("sip.min_expires", "must be at least 1"));
        }
        if registrar.max_expires < registrar.min_expires {
            return Err(ConfigError::new(
                "sip.max_expires",
                "must not be below sip.min_expires",
            ));
        }
        if !(registrar.min_expires..=registrar.max_expires).contains(&registrar.default_expires) {
            return Err(ConfigError::new(
                "sip.default_expires",
                "must lie between sip.min_expires and sip.max_expires",
            ));
        }
        if !(1..=100).contains(&registrar.max_contacts) {
            return Err(ConfigError::new(
                "sip.max_contacts",
                "must be between 1 and 100",
            ));
        }
        let idle_timeout = Duration::from_secs(positive(
            "sip.idle_timeout_secs",
            f.sip.idle_timeout_secs.unwrap_or(120),
        )?);
        let nonce_lifetime_secs = positive(
            "sip.nonce_lifetime_secs",
            f.sip.nonce_lifetime_secs.unwrap_or(300),
        )?;
        let max_connections = f.sip.max_connections.unwrap_or(20_000) as usize;
        if max_connections == 0 {
            return Err(ConfigError::new(
                "sip.max_connections",
                "must be at least 1",
            ));
        }
        let max_connections_per_source = f.sip.max_connections_per_source.unwrap_or(1_000) as usize;
        if max_connections_per_source == 0 {
            return Err(ConfigError::new(
                "sip.max_connections_per_source",
                "must be at least 1",
            ));
        }
        let md5_only_user_agents = f
            .sip
            .md5_only_user_agents
            .unwrap_or_else(|| vec!["baresip v0.".into(), "baresip v1.".into()]);

        let certs = data_dir.join("certs");
        let cert_file = f.tls.cert_file.unwrap_or_else(|| certs.join("server.crt"));
        let key_file = f.tls.key_file.unwrap_or_else(|| certs.join("server.key"));
        let cert_reload_interval = Duration::from_secs(positive(
            "tls.reload_interval_secs",
            f.tls.reload_interval_secs.unwrap_or(5),
        )?);

        let lan = match f.security.lan_networks {
            Some(list) => {
                let mut nets = Vec::with_capacity(list.len());
                for n in list {
                    let net: IpNet = n
                        .parse()
                        .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            ConfigError::new(
                                "security.lan_networks",
                                format!("{n:?} is not a network like 192.168.0.0/16"),
                            )
                        })?;
                    nets.push(net);
                }
                LanNetworks::new(nets)
            }
            None => LanNetworks::default_private(),
        };
        let lockout = LockoutConfig {
            per_extension_failures: f.security.lockout_extension_failures.unwrap_or(10),
            per_source_failures: f.security.lockout_source_failures.unwrap_or(50),
            window: Duration::from_secs(positive(
                "security.lockout_window_secs",
                f.security.lockout_window_secs.unwrap_or(600),
            )?),
            block: Duration::from_secs(positive(
                "security.lockout_block_secs",
                f.security.lockout_block_secs.unwrap_or(900),
            )?),
        };
        if lockout.per_extension_failures == 0 {
            return Err(ConfigError::new(
                "security.lockout_extension_failures",
                "must be at least 1",
            ));
        }
        if lockout.per_source_failures < lockout.per_extension_failures {
            return Err(ConfigError::new(
                "security.lockout_source_failures",
                "must be at least security.lockout_extension_failures",
            ));
        }
        let keepalive = Duration::from_secs(match f.sip.keepalive_secs.unwrap_or(25) {
            0 => 0,
            s @ 5..=3600 => s,
            _ => {
                return Err(ConfigError::new(
                    "sip.keepalive_secs",
                    "must be 0 (off) or between 5 and 3600",
                ));
            }
        });
        let ring_timeout = Duration::from_secs(positive(
            "media.ring_timeout_secs",
            f.media.ring_timeout_secs.unwrap_or(30),
        )?);
        let media_timeout = Duration::from_secs(positive(
            "media.media_timeout_secs",
            f.media.media_timeout_secs.unwrap_or(60),
        )?);
        // Phones on hold may send nothing, so a held call gets far longer;
        // the limit only frees calls whose phones vanished while held.
        let default_hold = media_timeout.as_secs().max(3600);
        let hold_timeout = match f.media.hold_timeout_secs.unwrap_or(default_hold) {
            0 => None,
            s if s < media_timeout.as_secs() || s > MAX_HOLD_TIMEOUT_SECS => {
                return Err(ConfigError::new(
                    "media.hold_timeout_secs",
                    format!(
                        "must be 0 (never) or between media.media_timeout_secs and {MAX_HOLD_TIMEOUT_SECS}"
                    ),
                ));
            }
            s => Some(Duration::from_secs(s)),
        };
        let log_level = f.log.level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "log.level",
                format!("{log_level:?} is not a log filter such as info or parley=debug"),
            ));
        }

        Ok(Config {
            data_dir,
            sip_udp,
            sip_tcp,
            sip_tls,
            https,
            rtp_ports,
            domain,
            advertise,
            realm,
            registrar,
            idle_timeout,
            keepalive,
            max_connections,
            max_connections_per_source,
            nonce_lifetime_secs,
            ring_timeout,
            media_timeout,
            hold_timeout,
            md5_only_user_agents,
            cert_file,
            key_file,
            cert_reload_interval,
            lan,
            lockout,
            log_level,
        })
    }

    /// The protocol core's settings, once the realm is known.
    pub fn core_config(&self, realm: &str) -> CoreConfig {
        let mut c = CoreConfig::new(realm);
        c.domain = self.domain.clone();
        c.registrar = self.registrar;
        c.lockout = self.lockout;
        c.lan = self.lan.clone();
        c.nonce_lifetime_secs = self.nonce_lifetime_secs;
        c.md5_only_user_agents = self.md5_only_user_agents.clone();
        c.advertise = self.advertise;
        c.ring_timeout = self.ring_timeout;
        c.hold_timeout = self.hold_timeout;
        c.keepalive = Some(self.keepalive);
        c
    }
}

/// Parses the TOML text; the error names the offending key.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().to_owned();
        let key = match e.span() {
            Some(span) => key_at(text, span.start),
            None => "config file".into(),
        };
        ConfigError::new(&key, message)
    })
}

/// The dotted key for the line an error points at, from the nearest
/// `[section]` above it and the `name =` on the line.
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[line_start..]
        .find('\n')
        .map(|i| line_start + i)
        .unwrap_or(text.len());
    let line = text[line_start..line_end].trim();
    let section = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(['[', ']']).trim().to_owned());
    if line.starts_with('[') {
        return line.trim_matches(['[', ']']).trim().to_owned();
    }
    let name = line
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"')
        .to_owned();
    match (section, name.is_empty()) {
        (Some(s), false) => format!("{s}.{name}"),
        (None, false) => name,
        (Some(s), true) => s,
        (None, true) => "config file".into(),
    }
}

/// A listen address, or `None` for "off".
fn listen_addr(key: &str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        ConfigError::new(
            key,
            format!("{value:?} is not an address like 0.0.0.0:5060 or [::]:5060 (or \"off\")"),
        )
    })
}

fn port_range(key: &str, value: &str) -> Result<(u16, u16), ConfigError> {
    let bad = || {
        ConfigError::new(
            key,
            format!("{value:?} is not a port range like 20000-29999"),
        )
    };
    let (lo, hi) = value.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo < 1024 || hi < lo {
        return Err(ConfigError::new(
            key,
            format!("{value:?} must be ascending and above 1023"),
        ));
    }
    // RTP on an even port and RTCP on the next odd one (RFC 3550 §11).
    if lo % 2 == 1 {
        return Err(ConfigError::new(
            key,
            format!("{value:?} must start on an even port (RTP even, RTCP odd)"),
        ));
    }
    if (hi - lo) < 5 {
        return Err(ConfigError::new(
            key,
            "must hold at least 6 ports: the pair all SRTP legs share, and a pair \
             for each of the two legs of a plain RTP call",
        ));
    }
    Ok((lo, hi))
}

fn positive(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(ConfigError::new(key, "must be at least 1"))
    } else {
        Ok(v)
    }
}

fn valid_domain(d: &str) -> bool {
    d.parse::<IpAddr>().is_ok()
        || (!d.is_empty()
            && d.len() <= 253
            && d.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }))
}

/// The machine's host name, the natural name phones use for it.
fn default_domain() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| valid_domain(h))
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<Config, ConfigError> {
        Config::resolve(parse_file(text)?, Overrides::default())
    }

    #[test]
    fn defaults_are_complete() {
        let c = resolve("").unwrap();
        assert_eq!(c.sip_udp, Some("0.0.0.0:5060".parse().unwrap()));
        assert_eq!(c.sip_tcp, Some("0.0.0.0:5060".parse().unwrap()));
        assert_eq!(c.sip_tls, Some("0.0.0.0:5061".parse().unwrap()));
        assert_eq!(c.https, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(c.rtp_ports, (20000, 29999));
        assert_eq!(c.data_dir, PathBuf::from("./parley-data"));
        assert_eq!(c.cert_file, PathBuf::from("./parley-data/certs/server.crt"));
        assert_eq!(c.registrar, RegistrarConfig::default());
        assert_eq!(c.hold_timeout, Some(Duration::from_secs(3600)));
        let never = resolve("[media]\nhold_timeout_secs = 0\n").unwrap();
        assert_eq!(never.hold_timeout, None);
        // A long media timeout raises the default hold timeout with it.
        let long = resolve("[media]\nmedia_timeout_secs = 7200\n").unwrap();
        assert_eq!(long.hold_timeout, Some(Duration::from_secs(7200)));
    }

    #[test]
    fn flags_override_the_file() {
        let f =
            parse_file("[sip]\nudp = \"127.0.0.1:5070\"\ndomain = \"pbx.example.com\"\n").unwrap();
        let c = Config::resolve(
            f,
            Overrides {
                sip_udp: Some("127.0.0.1:6000".into()),
                sip_tcp: Some("off".into()),
                data_dir: Some("/tmp/x".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.sip_udp, Some("127.0.0.1:6000".parse().unwrap()));
        assert_eq!(c.sip_tcp, None);
        assert_eq!(c.domain, "pbx.example.com");
        assert_eq!(c.key_file, PathBuf::from("/tmp/x/certs/server.key"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[sip]\nudp = \"nowhere\"\n", "sip.udp"),
            (
                "[sip]\nmin_expires = 600\nmax_expires = 60\n",
                "sip.max_expires",
            ),
            ("[sip]\ndomain = \"bad domain\"\n", "sip.domain"),
            ("[sip]\nadvertise = \"0.0.0.0\"\n", "sip.advertise"),
            ("[media]\nrtp_ports = \"30000-20000\"\n", "media.rtp_ports"),
            ("[media]\nrtp_ports = \"20001-21000\"\n", "media.rtp_ports"),
            ("[media]\nrtp_ports = \"20000-20004\"\n", "media.rtp_ports"),
            ("[sip]\nkeepalive_secs = 2\n", "sip.keepalive_secs"),
            (
                "[media]\nmedia_timeout_secs = 120\nhold_timeout_secs = 60\n",
                "media.hold_timeout_secs",
            ),
            (
                "[media]\nhold_timeout_secs = 99999999999\n",
                "media.hold_timeout_secs",
            ),
            (
                "[security]\nlan_networks = [\"10.0.0.0/33\"]\n",
                "security.lan_networks",
            ),
            ("[sip]\nmin_expires = \"sixty\"\n", "sip.min_expires"),
            ("[sip]\nunknown_key = 1\n", "sip.unknown_key"),
            ("[nonsense]\n", "nonsense"),
            (
                "[sip]\nudp = \"off\"\ntcp = \"off\"\ntls = \"off\"\n",
                "sip",
            ),
            ("[log]\nlevel = \"[[[\"\n", "log.level"),
        ];
        for (text, key) in cases {
            let err = resolve(text).unwrap_err();
            assert_eq!(err.key, key, "for {text:?}: {err}");
            assert!(!err.reason.is_empty());
        }
    }

    #[test]
    fn lan_networks_accept_bare_addresses() {
        let c = resolve("[security]\nlan_networks = [\"10.0.0.0/8\", \"192.0.2.10\"]\n").unwrap();
        assert!(c.lan.contains("192.0.2.10".parse().unwrap()));
        assert!(!c.lan.contains("127.0.0.1".parse().unwrap()));
    }
}
