//! Uploaded files: one row per file, its bytes in a file of the data
//! directory (`path`), and what validation found (`status`,
//! `status_details` with the line-numbered problems), as OpenAI's file
//! objects carry them.

use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;

use crate::error::sql;
use crate::{Result, Scope, Store, new_id, now};

/// Where a file's validation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileStatus {
    /// Stored, not yet checked.
    Uploaded,
    /// Checked and usable.
    Processed,
    /// Checked and refused (`status_details` says why).
    Error,
}

impl FileStatus {
    fn as_str(self) -> &'static str {
        match self {
            FileStatus::Uploaded => "uploaded",
            FileStatus::Processed => "processed",
            FileStatus::Error => "error",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "processed" => FileStatus::Processed,
            "error" => FileStatus::Error,
            _ => FileStatus::Uploaded,
        }
    }
}

/// A stored file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileRecord {
    /// `file-…`.
    pub id: String,
    /// Who uploaded it.
    pub owner: String,
    /// The name it was uploaded with.
    pub filename: String,
    /// `fine-tune`, …
    pub purpose: String,
    /// Its size.
    pub bytes: u64,
    /// Upload time (Unix seconds).
    pub created_at: i64,
    /// Validation.
    pub status: FileStatus,
    /// Validation's findings, where it refused the file.
    pub status_details: Option<String>,
    /// Where its bytes are.
    pub path: String,
}

/// What an upload records.
#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    /// The uploader.
    pub owner: &'a str,
    /// The name it was uploaded with.
    pub filename: &'a str,
    /// Its purpose.
    pub purpose: &'a str,
    /// Its size.
    pub bytes: u64,
    /// Where its bytes are.
    pub path: &'a str,
}

fn record(r: &Row) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: r.get("id")?,
        owner: r.get("owner")?,
        filename: r.get("filename")?,
        purpose: r.get("purpose")?,
        bytes: r.get::<_, i64>("bytes")? as u64,
        created_at: r.get("created_at")?,
        status: FileStatus::parse(&r.get::<_, String>("status")?),
        status_details: r.get("status_details")?,
        path: r.get("path")?,
    })
}

impl Store {
    /// Records an uploaded file (status `uploaded`) under a new id.
    pub fn add_file(&self, f: &NewFile, id: Option<&str>) -> Result<FileRecord> {
        let id = id.map_or_else(|| new_id("file"), str::to_string);
        self.conn()
            .execute(
                "INSERT INTO files (id, owner, filename, purpose, bytes, created_at, status, path)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'uploaded', ?7)",
                params![
                    id,
                    f.owner,
                    f.filename,
                    f.purpose,
                    f.bytes as i64,
                    now(),
                    f.path
                ],
            )
            .map_err(sql("recording a file"))?;
        self.file(Scope::Admin, &id)?
            .ok_or_else(|| crate::StoreError::Sql {
                what: format!("reading back file {id}"),
                source: rusqlite::Error::QueryReturnedNoRows,
            })
    }

    /// Sets what validation found.
    pub fn set_file_status(
        &self,
        id: &str,
        status: FileStatus,
        details: Option<&str>,
    ) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE files SET status = ?2, status_details = ?3 WHERE id = ?1",
                params![id, status.as_str(), details],
            )
            .map_err(sql("updating a file's status"))?;
        Ok(())
    }

    /// The file `id`, if `scope` may see it.
    pub fn file(&self, scope: Scope, id: &str) -> Result<Option<FileRecord>> {
        self.conn()
            .query_row(
                "SELECT * FROM files WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                params![id, scope.owner()],
                record,
            )
            .optional()
            .map_err(sql("reading a file"))
    }

    /// The files `scope` may see, newest first.
    pub fn files(&self, scope: Scope) -> Result<Vec<FileRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT * FROM files WHERE ?1 IS NULL OR owner = ?1 ORDER BY rowid DESC")
            .map_err(sql("listing files"))?;
        st.query_map(params![scope.owner()], record)
            .and_then(|rows| rows.collect())
            .map_err(sql("listing files"))
    }

    /// Deletes the file `id` if `scope` may see it; the removed record
    /// (its bytes are the caller's to remove).
    pub fn delete_file(&self, scope: Scope, id: &str) -> Result<Option<FileRecord>> {
        let Some(f) = self.file(scope, id)? else {
            return Ok(None);
        };
        self.conn()
            .execute("DELETE FROM files WHERE id = ?1", params![id])
            .map_err(sql("deleting a file"))?;
        Ok(Some(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload<'a>(owner: &'a str, name: &'a str) -> NewFile<'a> {
        NewFile {
            owner,
            filename: name,
            purpose: "fine-tune",
            bytes: 12,
            path: "/data/files/x",
        }
    }

    #[test]
    fn files_are_recorded_checked_listed_and_deleted_per_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let a = store.add_file(&upload("ann", "a.jsonl"), None).unwrap();
        let b = store.add_file(&upload("bob", "b.jsonl"), None).unwrap();
        let a2 = store.add_file(&upload("ann", "c.jsonl"), None).unwrap();
        assert_eq!(
            (a.status, a.bytes, a.owner.as_str()),
            (FileStatus::Uploaded, 12, "ann")
        );
        store
            .set_file_status(&a.id, FileStatus::Error, Some("a.jsonl:3: [json] bad"))
            .unwrap();
        let got = store.file(Scope::Owner("ann"), &a.id).unwrap().unwrap();
        assert_eq!(got.status, FileStatus::Error);
        assert_eq!(got.status_details.as_deref(), Some("a.jsonl:3: [json] bad"));
        // Another owner does not see it; an admin does.
        assert!(store.file(Scope::Owner("bob"), &a.id).unwrap().is_none());
        assert!(store.file(Scope::Admin, &a.id).unwrap().is_some());
        let ids = |v: Vec<FileRecord>| v.into_iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.files(Scope::Owner("ann")).unwrap()),
            [a2.id.clone(), a.id.clone()]
        );
        assert_eq!(store.files(Scope::Admin).unwrap().len(), 3);
        assert!(
            store
                .delete_file(Scope::Owner("bob"), &a.id)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store
                .delete_file(Scope::Owner("ann"), &a.id)
                .unwrap()
                .unwrap()
                .id,
            a.id
        );
        assert!(store.file(Scope::Admin, &a.id).unwrap().is_none());
        assert_eq!(ids(store.files(Scope::Owner("bob")).unwrap()), [b.id]);
        // Durable: a reopened store has them.
        drop(store);
        let store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(store.files(Scope::Admin).unwrap().len(), 2);
    }
}
