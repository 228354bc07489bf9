//! The protocol core alone, no sockets: how long one full registration
//! (REGISTER, 401, REGISTER with credentials, 200) takes in `pbx::Core`.
//!
//!   cargo bench --bench core -- [USERS] [ROUNDS]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parley::pbx::core::{Core, CoreConfig, CoreKeys, Output};
use parley::pbx::directory::{Directory, Extension};
use parley::pbx::policy::EncryptionPolicy;
use parley::sip::digest::{Algorithm, ha1};
use parley::sip::message::{Framing, Message};
use parley::sip::transport::{Flow, Transport};
use parley::sip::ua::{RegisterOutcome, Registration};

const REALM: &str = "parley.test";

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let users: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rounds: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    for algorithm in [Algorithm::Md5, Algorithm::Sha256] {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            samples.push(run(users, algorithm));
        }
        samples.sort();
        let median = samples[samples.len() / 2];
        println!(
            "core registration ({}): {:.2} µs median of {rounds} rounds over {users} users ({:.0} registrations/s on one core)",
            algorithm.as_str(),
            median.as_secs_f64() * 1e6,
            1.0 / median.as_secs_f64()
        );
    }
}

/// Registers every user three times (a new binding, then refreshes) and
/// returns the time per registration of the last pass, when the tables
/// have reached their working size.
fn run(users: u32, algorithm: Algorithm) -> Duration {
    let t0 = Instant::now();
    let mut core = Core::new(
        CoreConfig::new(REALM),
        CoreKeys {
            nonce: [1; 32],
            dummy_ha1: [2; 32],
        },
        t0,
        Duration::from_secs(1_800_000_000),
    );
    let exts = (0..users).map(|i| {
        let n = (100_000 + i).to_string();
        let pw = format!("pw{n}");
        Extension {
            ha1_md5: ha1(Algorithm::Md5, &n, REALM, &pw),
            ha1_sha256: ha1(Algorithm::Sha256, &n, REALM, &pw),
            number: n,
            name: None,
            realm: REALM.into(),
            encryption: EncryptionPolicy::Off,
        }
    });
    core.set_directory(t0, Directory::new(exts));
    let server: SocketAddr = "127.0.0.1:5060".parse().unwrap();
    let mut phones: Vec<(Registration, Flow)> = (0..users)
        .map(|i| {
            let remote = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 5060));
            let mut r = Registration::new(
                &(100_000 + i).to_string(),
                &format!("pw{}", 100_000 + i),
                REALM,
                Transport::Udp,
                remote,
            );
            r.prefer = algorithm;
            (r, Flow::udp(server, remote))
        })
        .collect();
    // Only the core's own time counts, not the simulated phones'.
    let mut elapsed = Duration::ZERO;
    for pass in 0..3 {
        for (reg, flow) in phones.iter_mut() {
            reg.forget_challenge();
            loop {
                let req = reg.build();
                let start = Instant::now();
                core.handle_message(t0, *flow, req);
                let mut sent = None;
                while let Some(out) = core.poll_output() {
                    if let Output::Transmit(t) = out {
                        sent = Some(t.bytes);
                    }
                }
                if pass == 2 {
                    elapsed += start.elapsed();
                }
                let answer = sent.map(|b| Message::parse(b, Framing::Datagram).unwrap());
                match reg.handle_response(&answer.expect("an answer")) {
                    RegisterOutcome::Challenged => continue,
                    RegisterOutcome::Registered { .. } => break,
                    other => panic!("{other:?}"),
                }
            }
        }
    }
    elapsed / users
}
