//! The store's errors: the database's, with what was being done.

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused an operation.
    #[error("{what}: {source}")]
    Sql {
        /// What was being done.
        what: String,
        /// The database's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A file of the data directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The database was written by a newer Skillet.
    #[error("the database has schema version {found}; this Skillet knows up to {known}")]
    NewerSchema {
        /// The database's version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
}

/// The store's result.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Wraps a database error with what was being done.
pub(crate) fn sql(what: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sql {
        what: what.to_string(),
        source,
    }
}
