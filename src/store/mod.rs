//! The embedded SQLite store: the only place with SQL. Migrations are
//! compiled into the binary and applied when the store opens.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::pbx::cdr::{CallRecord, LegRecord, media_json};
use crate::pbx::directory::Extension;
use crate::pbx::events::{StoreOp, StoredBinding};
use crate::pbx::policy::EncryptionPolicy;

/// The realm a new installation gets unless the config names one.
pub const DEFAULT_REALM: &str = "parley";
const REALM_KEY: &str = "sip.realm";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("extension {0} already exists")]
    ExtensionExists(String),
    #[error("extension {0} does not exist")]
    NoSuchExtension(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A row of the call history as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CallRow {
    pub call_ref: String,
    pub caller: String,
    pub callee: String,
    pub started_at: i64,
    pub answered_at: Option<i64>,
    pub ended_at: i64,
    pub duration_ms: i64,
    pub outcome: String,
    pub sip_status: i64,
    pub sip_reason: String,
    pub ended_by: Option<String>,
    pub caller_transport: String,
    pub caller_tls: Option<String>,
    pub caller_srtp: Option<String>,
    /// JSON; see `pbx::cdr::media_json`.
    pub caller_media: Option<String>,
    pub callee_transport: Option<String>,
    pub callee_tls: Option<String>,
    pub callee_srtp: Option<String>,
    pub callee_media: Option<String>,
}

/// Creates the data dir (owner only) and makes the database owner-only
/// before SQLite opens it: its HA1 values are as good as passwords for
/// digest authentication. SQLite gives its `-wal` and `-shm` files the
/// database's permissions.
fn private_files(data_dir: &Path, db: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(db)?;
        for suffix in ["", "-wal", "-shm"] {
            let mut path = db.as_os_str().to_owned();
            path.push(suffix);
            match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(data_dir)?;
    Ok(())
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) `DATA_DIR/parley.db` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<Store> {
        let db = data_dir.join("parley.db");
        private_files(data_dir, &db).map_err(|source| StoreError::DataDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let opts = SqliteConnectOptions::new()
            .filename(&db)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL survives a crash of the process; only an OS
            // crash can lose the last moments, and bindings are re-sent.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    /// The digest realm. Fixed at first use (HA1 values depend on it); a
    /// realm named in the config replaces it.
    pub async fn realm(&self, configured: Option<&str>) -> Result<String> {
        let stored: Option<(String,)> = sqlx::query_as("SELECT value FROM settings WHERE key = ?")
            .bind(REALM_KEY)
            .fetch_optional(&self.pool)
            .await?;
        match (stored, configured) {
            (Some((s,)), Some(c)) if s != c => {
                self.set_setting(REALM_KEY, c).await?;
                Ok(c.to_owned())
            }
            (Some((s,)), _) => Ok(s),
            (None, c) => {
                let realm = c.unwrap_or(DEFAULT_REALM);
                self.set_setting(REALM_KEY, realm).await?;
                Ok(realm.to_owned())
            }
        }
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn list_extensions(&self) -> Result<Vec<Extension>> {
        let rows: Vec<(String, Option<String>, String, String, String, String)> = sqlx::query_as(
            "SELECT number, name, realm, ha1_md5, ha1_sha256, encryption FROM extensions ORDER BY number",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(number, name, realm, ha1_md5, ha1_sha256, encryption)| {
                let encryption =
                    EncryptionPolicy::from_str(&encryption).map_err(StoreError::Corrupt)?;
                Ok(Extension {
                    number,
                    name,
                    realm,
                    ha1_md5,
                    ha1_sha256,
                    encryption,
                })
            })
            .collect()
    }

    pub async fn add_extension(&self, e: &Extension) -> Result<()> {
        let now = unix_now();
        let res = sqlx::query(
            "INSERT INTO extensions (number, name, realm, ha1_md5, ha1_sha256, encryption, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&e.number)
        .bind(&e.name)
        .bind(&e.realm)
        .bind(&e.ha1_md5)
        .bind(&e.ha1_sha256)
        .bind(e.encryption.as_str())
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                Err(StoreError::ExtensionExists(e.number.clone()))
            }
            Err(err) => Err(err.into()),
        }
    }

    pub async fn remove_extension(&self, number: &str) -> Result<()> {
        let res = sqlx::query("DELETE FROM extensions WHERE number = ?")
            .bind(number)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchExtension(number.to_owned()));
        }
        Ok(())
    }

    pub async fn set_secret(
        &self,
        number: &str,
        realm: &str,
        ha1_md5: &str,
        ha1_sha256: &str,
    ) -> Result<()> {
        let res = sqlx::query("UPDATE extensions SET realm = ?, ha1_md5 = ?, ha1_sha256 = ?, updated_at = ? WHERE number = ?")
            .bind(realm)
            .bind(ha1_md5)
            .bind(ha1_sha256)
            .bind(unix_now())
            .bind(number)
            .execute(&self.pool)
            .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NoSuchExtension(number.to_owned()));
        }
        Ok(())
    }

    /// Goes up with every change to the extensions table, whoever made it.
    pub async fn extensions_revision(&self) -> Result<i64> {
        let (rev,): (i64,) =
            sqlx::query_as("SELECT revision FROM revisions WHERE name = 'extensions'")
                .fetch_one(&self.pool)
                .await?;
        Ok(rev)
    }

    pub async fn load_bindings(&self) -> Result<Vec<StoredBinding>> {
        type Row = (
            String,
            String,
            String,
            Option<String>,
            Option<i64>,
            String,
            i64,
            i64,
            String,
            String,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT extension, binding_key, contact, instance, reg_id, call_id, cseq, expires_at, local_addr, remote_addr, user_agent
             FROM bindings",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (
            extension,
            key,
            contact,
            instance,
            reg_id,
            call_id,
            cseq,
            expires_at,
            local,
            remote,
            user_agent,
        ) in rows
        {
            let addr = |s: &str| -> Result<SocketAddr> {
                s.parse()
                    .map_err(|_| StoreError::Corrupt(format!("binding address {s:?}")))
            };
            out.push(StoredBinding {
                extension,
                key,
                contact,
                instance,
                reg_id: reg_id.and_then(|r| u32::try_from(r).ok()),
                call_id,
                cseq: u32::try_from(cseq).unwrap_or(0),
                expires_at_unix: u64::try_from(expires_at).unwrap_or(0),
                local: addr(&local)?,
                remote: addr(&remote)?,
                user_agent,
            });
        }
        Ok(out)
    }

    /// Applies binding writes in one transaction, as two statements whatever
    /// the number of writes: each hop to SQLite's thread costs more than the
    /// rows themselves. Later writes to the same binding win.
    pub async fn apply(&self, ops: &[StoreOp]) -> Result<()> {
        let mut latest: HashMap<(&str, &str), &StoreOp> = HashMap::with_capacity(ops.len());
        let mut calls = Vec::new();
        for op in ops {
            let key = match op {
                StoreOp::SaveBinding(b) => (b.extension.as_str(), b.key.as_str()),
                StoreOp::DeleteBinding { extension, key } => (extension.as_str(), key.as_str()),
                StoreOp::Call(c) => {
                    calls.push(c);
                    continue;
                }
            };
            latest.insert(key, op);
        }
        for c in calls {
            // A call record that cannot be written is logged, not fatal to
            // the binding writes batched with it.
            if let Err(e) = self.insert_call(c).await {
                tracing::error!(call_ref = %c.call_ref, error = %e, "call record not written");
            }
        }
        let mut saves = Vec::new();
        let mut deletes = Vec::new();
        for op in latest.into_values() {
            match op {
                StoreOp::SaveBinding(b) => saves.push(serde_json::json!([
                    b.extension,
                    b.key,
                    b.contact,
                    b.instance,
                    b.reg_id,
                    b.call_id,
                    b.cseq,
                    b.expires_at_unix,
                    b.local.to_string(),
                    b.remote.to_string(),
                    b.user_agent,
                ])),
                StoreOp::DeleteBinding { extension, key } => {
                    deletes.push(serde_json::json!([extension, key]))
                }
                StoreOp::Call(_) => {}
            }
        }
        let mut tx = self.pool.begin().await?;
        if !saves.is_empty() {
            sqlx::query(
                "INSERT INTO bindings (extension, binding_key, contact, instance, reg_id, call_id, cseq, expires_at, local_addr, remote_addr, user_agent)
                 SELECT json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'),
                        json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'), json_extract(j.value, '$[5]'),
                        json_extract(j.value, '$[6]'), json_extract(j.value, '$[7]'), json_extract(j.value, '$[8]'),
                        json_extract(j.value, '$[9]'), json_extract(j.value, '$[10]')
                 FROM json_each(?1) AS j
                 WHERE EXISTS (SELECT 1 FROM extensions e WHERE e.number = json_extract(j.value, '$[0]'))
                 ORDER BY j.key
                 ON CONFLICT (extension, binding_key) DO UPDATE SET
                   contact = excluded.contact, instance = excluded.instance, reg_id = excluded.reg_id,
                   call_id = excluded.call_id, cseq = excluded.cseq, expires_at = excluded.expires_at,
                   local_addr = excluded.local_addr, remote_addr = excluded.remote_addr, user_agent = excluded.user_agent",
            )
            .bind(serde_json::Value::Array(saves).to_string())
            .execute(&mut *tx)
            .await?;
        }
        if !deletes.is_empty() {
            sqlx::query(
                "DELETE FROM bindings WHERE (extension, binding_key) IN
                   (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?1))",
            )
            .bind(serde_json::Value::Array(deletes).to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes bindings whose time is up (they were not refreshed before a
    /// shutdown).
    pub async fn purge_expired_bindings(&self) -> Result<u64> {
        let res = sqlx::query("DELETE FROM bindings WHERE expires_at <= ?")
            .bind(unix_now())
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected())
    }

    /// Adds a call to the history.
    pub async fn insert_call(&self, c: &CallRecord) -> Result<()> {
        let leg = |l: Option<&LegRecord>| {
            (
                l.map(|l| l.transport.as_str()),
                l.and_then(|l| l.tls_version.clone()),
                l.and_then(|l| l.srtp.map(|s| s.name())),
                l.and_then(|l| l.media.as_ref())
                    .map(|m| media_json(m).to_string()),
            )
        };
        let (caller_transport, caller_tls, caller_srtp, caller_media) = leg(Some(&c.caller_leg));
        let (callee_transport, callee_tls, callee_srtp, callee_media) = leg(c.callee_leg.as_ref());
        sqlx::query(
            "INSERT INTO calls (call_ref, caller, callee, started_at, answered_at, ended_at, duration_ms,
                                outcome, sip_status, sip_reason, ended_by,
                                caller_transport, caller_tls, caller_srtp, caller_media,
                                callee_transport, callee_tls, callee_srtp, callee_media)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.call_ref)
        .bind(&c.caller)
        .bind(&c.callee)
        .bind(c.started_unix_ms)
        .bind(c.answered_unix_ms)
        .bind(c.ended_unix_ms)
        .bind(c.duration_ms())
        .bind(c.outcome.as_str())
        .bind(i64::from(c.sip_status))
        .bind(&c.sip_reason)
        .bind(c.ended_by.map(|e| e.as_str()))
        .bind(caller_transport)
        .bind(caller_tls)
        .bind(caller_srtp)
        .bind(caller_media)
        .bind(callee_transport)
        .bind(callee_tls)
        .bind(callee_srtp)
        .bind(callee_media)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The most recent calls, newest first.
    pub async fn recent_calls(&self, limit: u32) -> Result<Vec<CallRow>> {
        Ok(sqlx::query_as::<_, CallRow>(
            "SELECT call_ref, caller, callee, started_at, answered_at, ended_at, duration_ms, outcome,
                    sip_status, sip_reason, ended_by, caller_transport, caller_tls, caller_srtp, caller_media,
                    callee_transport, callee_tls, callee_srtp, callee_media
             FROM calls ORDER BY started_at DESC, id DESC LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::digest::{Algorithm, ha1};

    fn ext(number: &str) -> Extension {
        Extension {
            number: number.into(),
            name: Some("Front desk".into()),
            realm: "parley".into(),
            ha1_md5: ha1(Algorithm::Md5, number, "parley", "pw"),
            ha1_sha256: ha1(Algorithm::Sha256, number, "parley", "pw"),
            encryption: EncryptionPolicy::RequiredRemote,
        }
    }

    fn binding(ext: &str, key: &str, expires: u64) -> StoredBinding {
        StoredBinding {
            extension: ext.into(),
            key: key.into(),
            contact: format!("sip:{ext}@192.0.2.1"),
            instance: None,
            reg_id: None,
            call_id: "c".into(),
            cseq: 3,
            expires_at_unix: expires,
            local: "127.0.0.1:5060".parse().unwrap(),
            remote: "192.0.2.1:5060".parse().unwrap(),
            user_agent: Some("ua".into()),
        }
    }

    #[tokio::test]
    async fn extensions_round_trip_and_bump_the_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.realm(None).await.unwrap(), DEFAULT_REALM);
        let r0 = store.extensions_revision().await.unwrap();
        store.add_extension(&ext("100")).await.unwrap();
        assert!(matches!(
            store.add_extension(&ext("100")).await,
            Err(StoreError::ExtensionExists(_))
        ));
        assert!(store.extensions_revision().await.unwrap() > r0);
        assert_eq!(store.list_extensions().await.unwrap(), vec![ext("100")]);
        store
            .set_secret("100", "parley", &"a".repeat(32), &"b".repeat(64))
            .await
            .unwrap();
        assert!(matches!(
            store
                .set_secret("999", "r", &"a".repeat(32), &"b".repeat(64))
                .await,
            Err(StoreError::NoSuchExtension(_))
        ));
        store.remove_extension("100").await.unwrap();
        assert!(matches!(
            store.remove_extension("100").await,
            Err(StoreError::NoSuchExtension(_))
        ));
    }

    /// The database holds HA1 values: only its owner may read it, its
    /// write-ahead log included, and a data dir Parley creates is its own.
    #[cfg(unix)]
    #[tokio::test]
    async fn the_database_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("new/data");
        let store = Store::open(&data).await.unwrap();
        store.add_extension(&ext("100")).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("parley.db")), 0o600);
        assert_eq!(mode(&data.join("parley.db-wal")), 0o600);
        drop(store);
        // A database made readable by an older version is closed again.
        std::fs::set_permissions(
            data.join("parley.db"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let _store = Store::open(&data).await.unwrap();
        assert_eq!(mode(&data.join("parley.db")), 0o600);
    }

    #[tokio::test]
    async fn the_schema_refuses_bad_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        for bad in ["", "a b", "x'y", &"1".repeat(33)] {
            assert!(store.add_extension(&ext(bad)).await.is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn bindings_persist_and_follow_their_extension() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).await.unwrap();
            store.add_extension(&ext("100")).await.unwrap();
            store
                .apply(&[
                    StoreOp::SaveBinding(binding("100", "k1", 4_000_000_000)),
                    StoreOp::SaveBinding(binding("100", "k2", 4_000_000_000)),
                    StoreOp::SaveBinding(binding("100", "k2", 4_000_000_100)),
                    StoreOp::DeleteBinding {
                        extension: "100".into(),
                        key: "k1".into(),
                    },
                    // A binding for an extension that is gone is skipped, not an error.
                    StoreOp::SaveBinding(binding("555", "k", 4_000_000_000)),
                    // The last write to a binding wins, whatever its kind.
                    StoreOp::DeleteBinding {
                        extension: "100".into(),
                        key: "k3".into(),
                    },
                    StoreOp::SaveBinding(binding("100", "k3", 4_000_000_200)),
                ])
                .await
                .unwrap();
            store.close().await;
        }
        let store = Store::open(dir.path()).await.unwrap();
        let b = store.load_bindings().await.unwrap();
        let mut b = b;
        b.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(
            b,
            vec![
                binding("100", "k2", 4_000_000_100),
                binding("100", "k3", 4_000_000_200)
            ]
        );
        store
            .apply(&[StoreOp::SaveBinding(binding("100", "old", 5))])
            .await
            .unwrap();
        assert_eq!(store.purge_expired_bindings().await.unwrap(), 1);
        store.remove_extension("100").await.unwrap();
        assert!(store.load_bindings().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_configured_realm_replaces_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.realm(Some("office")).await.unwrap(), "office");
        assert_eq!(store.realm(None).await.unwrap(), "office");
        assert_eq!(store.realm(Some("hq")).await.unwrap(), "hq");
    }
}
