//! The fine-tuning service's durable state, in one SQLite database (WAL
//! journal, foreign keys on) under the service's data directory: uploaded
//! files, fine-tuning jobs, their events and checkpoints. Every record has
//! an owner (the name an API key maps to); reads and writes take a
//! [`Scope`], so one owner's records are invisible to another, and an
//! admin sees all. The schema is versioned in the code ([`MIGRATIONS`]):
//! opening a database applies the migrations it lacks, in one transaction
//! each, and refuses one written by a newer build.

mod error;
mod files;
mod ids;
mod jobs;
mod models;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

pub use error::{Result, StoreError};
pub use files::{FileRecord, FileStatus, NewFile};
pub use ids::new_id;
pub use jobs::{EventRecord, JobRecord, JobStatus, NewJob};
pub use models::{CheckpointRecord, ModelRecord};

use error::sql;

/// Whose records an operation may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// One owner's records only.
    Owner(&'a str),
    /// Every owner's.
    Admin,
}

impl Scope<'_> {
    /// The owner to filter on (`None`: all), as a query parameter.
    pub(crate) fn owner(&self) -> Option<&str> {
        match self {
            Scope::Owner(o) => Some(o),
            Scope::Admin => None,
        }
    }
}

/// The schema, one migration per version (version `i + 1` is
/// `MIGRATIONS[i]`). Never edit a released one: add the next.
pub const MIGRATIONS: &[&str] = &[
    // 1: files, jobs, events, checkpoints.
    "CREATE TABLE files (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        status_details TEXT,
        path TEXT NOT NULL
    );
    CREATE INDEX files_by_owner ON files(owner);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        model TEXT NOT NULL,
        training_file TEXT NOT NULL,
        validation_file TEXT,
        suffix TEXT,
        seed INTEGER NOT NULL,
        request TEXT NOT NULL,
        status TEXT NOT NULL,
        fine_tuned_model TEXT,
        trained_tokens INTEGER,
        error TEXT,
        finished_at INTEGER
    );
    CREATE INDEX jobs_by_owner ON jobs(owner);
    CREATE INDEX jobs_by_status ON jobs(status);
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_by_job ON job_events(job_id, seq);",
    // 2: the worker's estimate and result files on jobs; checkpoints; the
    // fine-tuned models being served (final ones and checkpoints).
    "ALTER TABLE jobs ADD COLUMN estimated_finish INTEGER;
    ALTER TABLE jobs ADD COLUMN result_files TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        metrics TEXT NOT NULL,
        model TEXT NOT NULL,
        UNIQUE (job_id, step)
    );
    CREATE TABLE models (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        job_id TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX models_by_owner ON models(owner);",
];

/// The database, shared by the server's handlers and the job worker.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating) the database at `path` and brings its schema up
    /// to date.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(sql("opening the database"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("turning on the WAL journal"))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(sql("turning on foreign keys"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql("setting the busy timeout"))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64> {
        version(&self.conn())
    }

    /// The connection, for one operation (a poisoned lock still holds a
    /// consistent database: every write is one statement or transaction).
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn version(conn: &Connection) -> Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("reading the schema version"))
}

/// Applies the migrations `conn` lacks, each in its own transaction.
fn migrate(conn: &mut Connection) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let found = version(conn)?;
    if found > known {
        return Err(StoreError::NewerSchema { found, known });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(sql("starting a migration"))?;
        tx.execute_batch(step)
            .map_err(sql("migrating the schema"))?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(sql("recording the schema version"))?;
        tx.commit().map_err(sql("committing a migration"))?;
    }
    Ok(())
}

/// Seconds since the Unix epoch (OpenAI's `created_at`).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_migrates_once_and_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/skillet.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(store);
        // Reopening applies nothing again.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store
            .conn()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        drop(store);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::NewerSchema { found: 99, .. })
        ));
    }
}
