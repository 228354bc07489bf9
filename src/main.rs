//! The `parley` command: run the PBX, manage extensions.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use parley::config::{Config, DEFAULT_DATA_DIR, Overrides};
use parley::pbx::directory::{Extension, validate_number};
use parley::pbx::policy::EncryptionPolicy;
use parley::sip::digest::{Algorithm, ha1};
use parley::store::Store;

/// Parley: a secure office phone system (SIP over TLS, SRTP) in one binary.
#[derive(Parser)]
#[command(name = "parley", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the PBX.
    Serve(ServeArgs),
    /// Add, list, remove extensions and set their passwords.
    #[command(subcommand)]
    Extension(ExtensionCommand),
    /// The call history.
    #[command(subcommand)]
    Calls(CallsCommand),
}

#[derive(Subcommand)]
enum CallsCommand {
    /// Recent calls, newest first.
    List {
        /// How many calls to show.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Where the database and certificates live [default: ./parley-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// A TOML config file; the flags below override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// SIP over UDP listen address, or "off" [default: 0.0.0.0:5060].
    #[arg(long, value_name = "ADDR")]
    sip_udp: Option<String>,
    /// SIP over TCP listen address, or "off" [default: 0.0.0.0:5060].
    #[arg(long, value_name = "ADDR")]
    sip_tcp: Option<String>,
    /// SIP over TLS listen address, or "off" [default: 0.0.0.0:5061].
    #[arg(long, value_name = "ADDR")]
    sip_tls: Option<String>,
    /// HTTPS (web) listen address, or "off" [default: 0.0.0.0:8443].
    #[arg(long, value_name = "ADDR")]
    https: Option<String>,
    /// UDP port range for media [default: 20000-29999].
    #[arg(long, value_name = "LO-HI")]
    rtp_ports: Option<String>,
    /// The name phones use for this server; it goes into the certificate.
    #[arg(long, value_name = "NAME")]
    domain: Option<String>,
    /// The address put in Contact, Via and SDP for phones outside the LAN.
    #[arg(long, value_name = "IP")]
    advertise: Option<String>,
}

#[derive(Args)]
struct DataDirArg {
    /// Where the database lives [default: ./parley-data, or the config
    /// file's].
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The config file `parley serve` uses: its data dir and SIP realm
    /// apply here too (passwords are stored hashed with the realm).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
}

#[derive(Args)]
#[group(multiple = false)]
struct PasswordArgs {
    /// The SIP password (at least 8 characters). Without this flag or
    /// --generate-password it is read from standard input.
    #[arg(long, value_name = "PW")]
    password: Option<String>,
    /// Make up a strong password and print it once.
    #[arg(long)]
    generate_password: bool,
}

#[derive(Subcommand)]
enum ExtensionCommand {
    /// Create an extension.
    Add {
        number: String,
        /// A display name, such as "Front desk".
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        password: PasswordArgs,
        /// required, required-remote (default), preferred or off.
        #[arg(long, value_name = "POLICY", default_value = "required-remote")]
        encryption: EncryptionPolicy,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// List extensions.
    List {
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Delete an extension (its registrations end at once).
    Remove {
        number: String,
        #[command(flatten)]
        dir: DataDirArg,
    },
    /// Give an extension a new password.
    SetPassword {
        number: String,
        #[command(flatten)]
        password: PasswordArgs,
        #[command(flatten)]
        dir: DataDirArg,
    },
}

// The protocol core allocates many small, short-lived buffers per message;
// mimalloc serves those faster than glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shortest password accepted: SIP digest can be guessed offline from one
/// captured exchange, so short secrets fall quickly.
const MIN_PASSWORD_CHARS: usize = 8;
const GENERATED_PASSWORD_CHARS: usize = 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Extension(cmd) => run_async(extension(cmd)),
        Command::Calls(cmd) => run_async(calls(cmd)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("parley: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?
        .block_on(fut)
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let overrides = Overrides {
        data_dir: args.data_dir,
        sip_udp: args.sip_udp,
        sip_tcp: args.sip_tcp,
        sip_tls: args.sip_tls,
        https: args.https,
        rtp_ports: args.rtp_ports,
        domain: args.domain,
        advertise: args.advertise,
    };
    let config = Config::load(args.config.as_deref(), overrides)
        .map_err(|e| format!("configuration: {e}"))?;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .map_err(|e| format!("log filter {filter:?}: {e}"))?,
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not for journald or files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // One worker per core the process may use (taskset narrows it).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    runtime
        .block_on(parley::runtime::serve(config))
        .map_err(|e| e.to_string())
}

async fn calls(cmd: CallsCommand) -> Result<(), String> {
    let CallsCommand::List { limit, dir } = cmd;
    let (store, _) = open_store(dir).await?;
    let rows = store.recent_calls(limit).await.map_err(|e| e.to_string())?;
    if rows.is_empty() {
        println!("no calls yet");
        return Ok(());
    }
    println!(
        "{:<19}  {:<10} {:<10} {:<11} {:>8}  {:<26} {:<22} {:<22} {:>9}",
        "STARTED (UTC)",
        "CALLER",
        "CALLEE",
        "OUTCOME",
        "TALK",
        "SIP",
        "CALLER LEG",
        "CALLEE LEG",
        "MOS in/out"
    );
    for r in rows {
        let leg = |transport: Option<&str>, tls: Option<&str>, srtp: Option<&str>| match transport {
            None => "-".to_string(),
            Some(t) => format!(
                "{t}{}{}",
                tls.map(|v| format!(" {v}")).unwrap_or_default(),
                match srtp {
                    // The suite by its tag length: SRTP/80 or SRTP/32.
                    Some(suite) => format!(" SRTP/{}", suite.rsplit('_').next().unwrap_or(suite)),
                    None => " RTP".to_string(),
                }
            ),
        };
        let mos = |media: Option<&str>, dir: &str| {
            media
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .and_then(|v| v[dir]["mos"].as_f64())
                .map_or("-".to_string(), |m| format!("{m:.1}"))
        };
        // MOS of what the caller heard and of what it sent.
        let quality = format!(
            "{}/{}",
            mos(r.caller_media.as_deref(), "sent"),
            mos(r.caller_media.as_deref(), "received")
        );
        println!(
            "{:<19}  {:<10} {:<10} {:<11} {:>8}  {:<26} {:<22} {:<22} {:>9}",
            format_unix_ms(r.started_at),
            r.caller,
            r.callee,
            r.outcome,
            format_duration_ms(r.duration_ms),
            format!("{} {}", r.sip_status, r.sip_reason),
            leg(
                Some(&r.caller_transport),
                r.caller_tls.as_deref(),
                r.caller_srtp.as_deref()
            ),
            leg(
                r.callee_transport.as_deref(),
                r.callee_tls.as_deref(),
                r.callee_srtp.as_deref()
            ),
            quality,
        );
    }
    Ok(())
}

fn format_unix_ms(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => ms.to_string(),
    }
}

fn format_duration_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The store the server uses, and the realm its config names, if any.
async fn open_store(dir: DataDirArg) -> Result<(Store, Option<String>), String> {
    let (path, realm) = match &dir.config {
        Some(file) => {
            let overrides = Overrides {
                data_dir: dir.data_dir,
                ..Overrides::default()
            };
            let config =
                Config::load(Some(file), overrides).map_err(|e| format!("configuration: {e}"))?;
            (config.data_dir, config.realm)
        }
        None => (
            dir.data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            None,
        ),
    };
    let store = Store::open(&path).await.map_err(|e| e.to_string())?;
    Ok((store, realm))
}

async fn extension(cmd: ExtensionCommand) -> Result<(), String> {
    match cmd {
        ExtensionCommand::Add {
            number,
            name,
            password,
            encryption,
            dir,
        } => {
            validate_number(&number)?;
            if let Some(n) = &name
                && (n.chars().count() > 64 || n.chars().any(char::is_control))
            {
                return Err("--name must be at most 64 printable characters".into());
            }
            let (store, configured) = open_store(dir).await?;
            let realm = store
                .realm(configured.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            let (pw, generated) = obtain_password(&password)?;
            let ext = Extension {
                ha1_md5: ha1(Algorithm::Md5, &number, &realm, &pw),
                ha1_sha256: ha1(Algorithm::Sha256, &number, &realm, &pw),
                number,
                name,
                realm,
                encryption,
            };
            store.add_extension(&ext).await.map_err(|e| e.to_string())?;
            println!(
                "extension {} added (encryption: {})",
                ext.number, ext.encryption
            );
            if generated {
                println!("password: {pw}");
                println!("(shown once; it is stored only as a digest hash)");
            }
            Ok(())
        }
        ExtensionCommand::List { dir } => {
            let (store, _) = open_store(dir).await?;
            let list = store.list_extensions().await.map_err(|e| e.to_string())?;
            if list.is_empty() {
                println!(
                    "no extensions yet: add one with `parley extension add NUMBER --generate-password`"
                );
                return Ok(());
            }
            println!("{:<12} {:<16} {:<24}", "NUMBER", "ENCRYPTION", "NAME");
            for e in list {
                println!(
                    "{:<12} {:<16} {:<24}",
                    e.number,
                    e.encryption.as_str(),
                    e.name.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        ExtensionCommand::Remove { number, dir } => {
            let (store, _) = open_store(dir).await?;
            store
                .remove_extension(&number)
                .await
                .map_err(|e| e.to_string())?;
            println!("extension {number} removed");
            Ok(())
        }
        ExtensionCommand::SetPassword {
            number,
            password,
            dir,
        } => {
            let (store, configured) = open_store(dir).await?;
            let realm = store
                .realm(configured.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            if !store
                .list_extensions()
                .await
                .map_err(|e| e.to_string())?
                .iter()
                .any(|e| e.number == number)
            {
                return Err(format!("extension {number} does not exist"));
            }
            let (pw, generated) = obtain_password(&password)?;
            store
                .set_secret(
                    &number,
                    &realm,
                    &ha1(Algorithm::Md5, &number, &realm, &pw),
                    &ha1(Algorithm::Sha256, &number, &realm, &pw),
                )
                .await
                .map_err(|e| e.to_string())?;
            println!("password of extension {number} changed");
            if generated {
                println!("password: {pw}");
                println!("(shown once; it is stored only as a digest hash)");
            }
            Ok(())
        }
    }
}

/// The password from the flags or standard input, and whether it was made up.
fn obtain_password(args: &PasswordArgs) -> Result<(String, bool), String> {
    if args.generate_password {
        return Ok((generate_password(), true));
    }
    let pw = match &args.password {
        Some(p) => p.clone(),
        None => read_password()?,
    };
    if pw.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "the password must have at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if pw.chars().any(char::is_control) {
        return Err("the password must not contain control characters".into());
    }
    Ok((pw, false))
}

fn generate_password() -> String {
    // Letters and digits that cannot be mistaken for each other on a phone's keypad screen.
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..GENERATED_PASSWORD_CHARS)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        eprint!("SIP password: ");
        let _ = std::io::stderr().flush();
    }
    let _echo = tty.then(EchoOff::new);
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    if tty {
        eprintln!();
    }
    let pw = line.trim_end_matches(['\r', '\n']).to_owned();
    if pw.is_empty() {
        return Err("no password given: use --password, --generate-password or type one".into());
    }
    Ok(pw)
}

/// Turns terminal echo off while a password is typed.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed termios we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return EchoOff(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            EchoOff(Some(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = self.0 {
            // SAFETY: restores the settings read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &saved);
            }
        }
    }
}
