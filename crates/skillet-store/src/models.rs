//! What jobs produce: checkpoints (a step, its metrics and the name it is
//! served under) and the fine-tuned models being served, final ones and
//! checkpoints alike, each with its owner and its adapter's folder. A
//! deleted model stops being served; its job and checkpoint records stay.

use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;

use crate::error::sql;
use crate::{Result, Scope, Store, new_id, now};

/// A checkpoint of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointRecord {
    /// `ftckpt-…`.
    pub id: String,
    /// Its job.
    pub job_id: String,
    /// Optimizer steps done.
    pub step: u64,
    /// When it was recorded (Unix seconds).
    pub created_at: i64,
    /// Its metrics (JSON object).
    pub metrics: String,
    /// The name it is served under.
    pub model: String,
}

/// A fine-tuned model being served.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRecord {
    /// `ft:…`.
    pub name: String,
    /// Whose it is.
    pub owner: String,
    /// The job that made it.
    pub job_id: String,
    /// Its adapter's folder.
    pub path: String,
    /// When it became servable (Unix seconds).
    pub created_at: i64,
}

fn checkpoint(r: &Row) -> rusqlite::Result<CheckpointRecord> {
    Ok(CheckpointRecord {
        id: r.get("id")?,
        job_id: r.get("job_id")?,
        step: r.get::<_, i64>("step")? as u64,
        created_at: r.get("created_at")?,
        metrics: r.get("metrics")?,
        model: r.get("model")?,
    })
}

fn model(r: &Row) -> rusqlite::Result<ModelRecord> {
    Ok(ModelRecord {
        name: r.get("name")?,
        owner: r.get("owner")?,
        job_id: r.get("job_id")?,
        path: r.get("path")?,
        created_at: r.get("created_at")?,
    })
}

impl Store {
    /// Records checkpoint `step` of `job_id` and serves its adapter (in
    /// `path`) as `name` for `owner`, in one transaction; a step already
    /// recorded is left as it is. The checkpoint's record.
    pub fn add_checkpoint(
        &self,
        job_id: &str,
        owner: &str,
        step: u64,
        metrics: &serde_json::Value,
        name: &str,
        path: &str,
    ) -> Result<CheckpointRecord> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(sql("starting a checkpoint's record"))?;
        let added = tx
            .execute(
                "INSERT OR IGNORE INTO checkpoints (id, job_id, step, created_at, metrics, model)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    new_id("ftckpt"),
                    job_id,
                    step as i64,
                    now(),
                    metrics.to_string(),
                    name
                ],
            )
            .map_err(sql("recording a checkpoint"))?;
        if added == 1 {
            tx.execute(
                "INSERT OR IGNORE INTO models (name, owner, job_id, path, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, owner, job_id, path, now()],
            )
            .map_err(sql("recording a checkpoint's model"))?;
        }
        let record = tx
            .query_row(
                "SELECT * FROM checkpoints WHERE job_id = ?1 AND step = ?2",
                params![job_id, step as i64],
                checkpoint,
            )
            .map_err(sql("reading back a checkpoint"))?;
        tx.commit().map_err(sql("committing a checkpoint"))?;
        Ok(record)
    }

    /// Up to `limit` checkpoints of `job_id` (if `scope` may see the job),
    /// latest step first, after the checkpoint `after` in that order;
    /// `None` when the job is not visible.
    pub fn checkpoints(
        &self,
        scope: Scope,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<CheckpointRecord>>> {
        if self.job(scope, job_id)?.is_none() {
            return Ok(None);
        }
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT * FROM checkpoints WHERE job_id = ?1
                   AND (?2 IS NULL OR step < (SELECT step FROM checkpoints WHERE id = ?2))
                 ORDER BY step DESC LIMIT ?3",
            )
            .map_err(sql("listing checkpoints"))?;
        st.query_map(params![job_id, after, limit as i64], checkpoint)
            .and_then(|rows| rows.collect())
            .map(Some)
            .map_err(sql("listing checkpoints"))
    }

    /// The fine-tuned model `name`, if `scope` may see it.
    pub fn model(&self, scope: Scope, name: &str) -> Result<Option<ModelRecord>> {
        self.conn()
            .query_row(
                "SELECT * FROM models WHERE name = ?1 AND (?2 IS NULL OR owner = ?2)",
                params![name, scope.owner()],
                model,
            )
            .optional()
            .map_err(sql("reading a model"))
    }

    /// The fine-tuned models `scope` may see, oldest first.
    pub fn models(&self, scope: Scope) -> Result<Vec<ModelRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT * FROM models WHERE ?1 IS NULL OR owner = ?1 ORDER BY rowid")
            .map_err(sql("listing models"))?;
        st.query_map(params![scope.owner()], model)
            .and_then(|rows| rows.collect())
            .map_err(sql("listing models"))
    }

    /// Stops serving `name` if `scope` may see it; the removed record.
    pub fn delete_model(&self, scope: Scope, name: &str) -> Result<Option<ModelRecord>> {
        let Some(m) = self.model(scope, name)? else {
            return Ok(None);
        };
        self.conn()
            .execute("DELETE FROM models WHERE name = ?1", params![name])
            .map_err(sql("deleting a model"))?;
        Ok(Some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewJob;

    #[test]
    fn checkpoints_and_models_are_recorded_once_and_seen_by_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let job = store
            .add_job(&NewJob {
                owner: "ann",
                model: "base",
                training_file: "file-1",
                validation_file: None,
                suffix: None,
                seed: 1,
                request: "{}",
            })
            .unwrap();
        let metrics = serde_json::json!({"step": 10, "train_loss": 1.25});
        for step in [10, 20] {
            let name = format!("ft:base:ann::{}:ckpt-step-{step}", job.id);
            let c = store
                .add_checkpoint(&job.id, "ann", step, &metrics, &name, "/ckpt")
                .unwrap();
            assert_eq!((c.step, c.model.as_str()), (step, name.as_str()));
        }
        // A worker that records a step again (after a restart) changes nothing.
        let again = store
            .add_checkpoint(&job.id, "ann", 10, &metrics, "other", "/x")
            .unwrap();
        assert!(again.model.ends_with("ckpt-step-10"));
        let list = store
            .checkpoints(Scope::Owner("ann"), &job.id, None, 10)
            .unwrap()
            .unwrap();
        assert_eq!(list.iter().map(|c| c.step).collect::<Vec<_>>(), [20, 10]);
        let rest = store
            .checkpoints(Scope::Owner("ann"), &job.id, Some(&list[0].id), 10)
            .unwrap()
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert!(
            store
                .checkpoints(Scope::Owner("bob"), &job.id, None, 10)
                .unwrap()
                .is_none()
        );

        let name = format!("ft:base:ann::{}", job.id);
        assert!(store.succeed_job(&job.id, &name, "/adapter", 10).unwrap());
        assert_eq!(store.models(Scope::Owner("ann")).unwrap().len(), 3);
        assert!(store.models(Scope::Owner("bob")).unwrap().is_empty());
        assert!(store.model(Scope::Owner("bob"), &name).unwrap().is_none());
        assert!(
            store
                .delete_model(Scope::Owner("bob"), &name)
                .unwrap()
                .is_none()
        );
        let gone = store.delete_model(Scope::Admin, &name).unwrap().unwrap();
        assert_eq!(gone.path, "/adapter");
        assert!(store.model(Scope::Owner("ann"), &name).unwrap().is_none());
        // The checkpoints' records stay.
        assert_eq!(
            store
                .checkpoints(Scope::Admin, &job.id, None, 10)
                .unwrap()
                .unwrap()
                .len(),
            2
        );
    }
}
