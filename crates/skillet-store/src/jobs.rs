//! Fine-tuning jobs and their events, as OpenAI's job and event objects
//! carry them. A job's `request` is the creation request as received
//! (JSON), so the worker can run it again after a restart; its status
//! moves `validating_files` → `queued` → `running` → `succeeded` |
//! `failed` | `cancelled`. Events are appended in order (`seq`) and read
//! newest first, as OpenAI lists them.

use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;

use crate::error::sql;
use crate::{Result, Scope, Store, StoreError, new_id, now};

/// A job's status, with OpenAI's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Its files are being checked.
    ValidatingFiles,
    /// Waiting for the worker.
    Queued,
    /// Training.
    Running,
    /// Done; the model is served.
    Succeeded,
    /// Stopped by an error (`error` says which).
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl JobStatus {
    /// The status's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => JobStatus::ValidatingFiles,
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRecord {
    /// `ftjob-…`.
    pub id: String,
    /// Who created it.
    pub owner: String,
    /// Creation time (Unix seconds).
    pub created_at: i64,
    /// The base model's name.
    pub model: String,
    /// The training file's id.
    pub training_file: String,
    /// The validation file's id.
    pub validation_file: Option<String>,
    /// The suffix of the fine-tuned model's name.
    pub suffix: Option<String>,
    /// The run's seed.
    pub seed: i64,
    /// The creation request as received (JSON).
    pub request: String,
    /// Where it stands.
    pub status: JobStatus,
    /// The served model's name, once succeeded.
    pub fine_tuned_model: Option<String>,
    /// Tokens trained on.
    pub trained_tokens: Option<i64>,
    /// `{code, message, param}` (JSON), once failed.
    pub error: Option<String>,
    /// When it ended (Unix seconds).
    pub finished_at: Option<i64>,
    /// When the worker expects it to end (Unix seconds), while it runs.
    pub estimated_finish: Option<i64>,
    /// Ids of the files it produced (its report).
    pub result_files: Vec<String>,
}

/// What creating a job records.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// The creator.
    pub owner: &'a str,
    /// The base model's name.
    pub model: &'a str,
    /// The training file's id.
    pub training_file: &'a str,
    /// The validation file's id.
    pub validation_file: Option<&'a str>,
    /// The model name's suffix.
    pub suffix: Option<&'a str>,
    /// The seed.
    pub seed: i64,
    /// The request (JSON).
    pub request: &'a str,
}

/// One event of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// `ftevent-…`.
    pub id: String,
    /// Its job.
    pub job_id: String,
    /// When (Unix seconds).
    pub created_at: i64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// For people.
    pub message: String,
    /// `message` or `metrics`.
    pub kind: String,
    /// Metrics (JSON), for `metrics` events.
    pub data: Option<String>,
}

fn job(r: &Row) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: r.get("id")?,
        owner: r.get("owner")?,
        created_at: r.get("created_at")?,
        model: r.get("model")?,
        training_file: r.get("training_file")?,
        validation_file: r.get("validation_file")?,
        suffix: r.get("suffix")?,
        seed: r.get("seed")?,
        request: r.get("request")?,
        status: JobStatus::parse(&r.get::<_, String>("status")?),
        fine_tuned_model: r.get("fine_tuned_model")?,
        trained_tokens: r.get("trained_tokens")?,
        error: r.get("error")?,
        finished_at: r.get("finished_at")?,
        estimated_finish: r.get("estimated_finish")?,
        result_files: serde_json::from_str(&r.get::<_, String>("result_files")?)
            .unwrap_or_default(),
    })
}

fn event(r: &Row) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        id: r.get("id")?,
        job_id: r.get("job_id")?,
        created_at: r.get("created_at")?,
        level: r.get("level")?,
        message: r.get("message")?,
        kind: r.get("kind")?,
        data: r.get("data")?,
    })
}

impl Store {
    /// Records a new job (status `validating_files`).
    pub fn add_job(&self, j: &NewJob) -> Result<JobRecord> {
        let id = new_id("ftjob");
        self.conn()
            .execute(
                "INSERT INTO jobs (id, owner, created_at, model, training_file, validation_file,
                                   suffix, seed, request, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'validating_files')",
                params![
                    id,
                    j.owner,
                    now(),
                    j.model,
                    j.training_file,
                    j.validation_file,
                    j.suffix,
                    j.seed,
                    j.request
                ],
            )
            .map_err(sql("recording a job"))?;
        self.job(Scope::Admin, &id)?.ok_or_else(|| StoreError::Sql {
            what: format!("reading back job {id}"),
            source: rusqlite::Error::QueryReturnedNoRows,
        })
    }

    /// The job `id`, if `scope` may see it.
    pub fn job(&self, scope: Scope, id: &str) -> Result<Option<JobRecord>> {
        self.conn()
            .query_row(
                "SELECT * FROM jobs WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
                params![id, scope.owner()],
                job,
            )
            .optional()
            .map_err(sql("reading a job"))
    }

    /// Up to `limit` jobs `scope` may see, newest first, after the job
    /// `after` in that order (OpenAI's cursor).
    pub fn jobs(&self, scope: Scope, after: Option<&str>, limit: usize) -> Result<Vec<JobRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT * FROM jobs WHERE (?1 IS NULL OR owner = ?1)
                   AND (?2 IS NULL OR rowid < (SELECT rowid FROM jobs WHERE id = ?2))
                 ORDER BY rowid DESC LIMIT ?3",
            )
            .map_err(sql("listing jobs"))?;
        st.query_map(params![scope.owner(), after, limit as i64], job)
            .and_then(|rows| rows.collect())
            .map_err(sql("listing jobs"))
    }

    /// Every job with `status`, oldest first (what the worker takes up,
    /// and what a restart resumes).
    pub fn jobs_with_status(&self, status: JobStatus) -> Result<Vec<JobRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT * FROM jobs WHERE status = ?1 ORDER BY rowid")
            .map_err(sql("listing jobs by status"))?;
        st.query_map(params![status.as_str()], job)
            .and_then(|rows| rows.collect())
            .map_err(sql("listing jobs by status"))
    }

    /// Moves a job that has not ended to `status`; whether it did (an
    /// ended job keeps its status: a cancel racing a finish loses).
    pub fn set_job_status(&self, id: &str, status: JobStatus) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE jobs SET status = ?2,
                        finished_at = CASE WHEN ?3 THEN ?4 ELSE finished_at END,
                        estimated_finish = CASE WHEN ?3 THEN NULL ELSE estimated_finish END
                 WHERE id = ?1 AND status NOT IN ('succeeded', 'failed', 'cancelled')",
                params![id, status.as_str(), status.is_final(), now()],
            )
            .map_err(sql("updating a job's status"))?;
        Ok(n == 1)
    }

    /// Ends a job that has not ended as failed, with its error (JSON);
    /// whether it did. (Success is [`Store::succeed_job`].)
    pub fn fail_job(&self, id: &str, error: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE jobs SET status = 'failed', error = ?2, finished_at = ?3,
                        estimated_finish = NULL
                 WHERE id = ?1 AND status NOT IN ('succeeded', 'failed', 'cancelled')",
                params![id, error, now()],
            )
            .map_err(sql("ending a job"))?;
        Ok(n == 1)
    }

    /// Records when the worker expects the job to end.
    pub fn set_estimated_finish(&self, id: &str, at: Option<i64>) -> Result<()> {
        self.conn()
            .execute(
                "UPDATE jobs SET estimated_finish = ?2 WHERE id = ?1",
                params![id, at],
            )
            .map_err(sql("updating a job's estimate"))?;
        Ok(())
    }

    /// Records the files a job produced.
    pub fn set_result_files(&self, id: &str, files: &[String]) -> Result<()> {
        let json = serde_json::to_string(files).expect("strings serialize");
        self.conn()
            .execute(
                "UPDATE jobs SET result_files = ?2 WHERE id = ?1",
                params![id, json],
            )
            .map_err(sql("recording a job's result files"))?;
        Ok(())
    }

    /// The highest `step` among a job's training-step metrics events
    /// (`training`: those whose data has `total_steps`) or its validation
    /// ones (the rest): where a restarted worker takes up reading the
    /// run's metrics again.
    pub fn last_metrics_step(&self, job_id: &str, training: bool) -> Result<Option<u64>> {
        self.conn()
            .query_row(
                "SELECT MAX(json_extract(data, '$.step')) FROM job_events
                 WHERE job_id = ?1 AND kind = 'metrics'
                   AND (json_extract(data, '$.total_steps') IS NOT NULL) = ?2",
                params![job_id, training],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(|s| s as u64))
            .map_err(sql("reading a job's progress"))
    }

    /// Ends a job that has not ended as succeeded, and serves its model
    /// (`name`, the adapter in `path`), in one transaction: a cancel that
    /// lands first leaves no model behind. Whether it did.
    pub fn succeed_job(&self, id: &str, name: &str, path: &str, tokens: i64) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a job's end"))?;
        let n = tx
            .execute(
                "UPDATE jobs SET status = 'succeeded', fine_tuned_model = ?2, trained_tokens = ?3,
                        finished_at = ?4, estimated_finish = NULL
                 WHERE id = ?1 AND status NOT IN ('succeeded', 'failed', 'cancelled')",
                params![id, name, tokens, now()],
            )
            .map_err(sql("ending a job"))?;
        if n == 1 {
            tx.execute(
                "INSERT OR IGNORE INTO models (name, owner, job_id, path, created_at)
                 SELECT ?2, owner, id, ?3, ?4 FROM jobs WHERE id = ?1",
                params![id, name, path, now()],
            )
            .map_err(sql("recording a job's model"))?;
        }
        tx.commit().map_err(sql("committing a job's end"))?;
        Ok(n == 1)
    }

    /// Appends an event to a job.
    pub fn add_event(
        &self,
        job_id: &str,
        level: &str,
        message: &str,
        data: Option<&serde_json::Value>,
    ) -> Result<EventRecord> {
        let id = new_id("ftevent");
        let kind = if data.is_some() { "metrics" } else { "message" };
        let data = data.map(|d| d.to_string());
        let conn = self.conn();
        conn.execute(
            "INSERT INTO job_events (id, job_id, created_at, level, message, kind, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![id, job_id, now(), level, message, kind, data],
        )
        .map_err(sql("recording an event"))?;
        conn.query_row("SELECT * FROM job_events WHERE id = ?1", params![id], event)
            .map_err(sql("reading back an event"))
    }

    /// Up to `limit` events of the job `job_id` (if `scope` may see it),
    /// newest first, after the event `after` in that order; `None` when
    /// the job is not visible.
    pub fn events(
        &self,
        scope: Scope,
        job_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<EventRecord>>> {
        if self.job(scope, job_id)?.is_none() {
            return Ok(None);
        }
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT * FROM job_events WHERE job_id = ?1
                   AND (?2 IS NULL OR seq < (SELECT seq FROM job_events WHERE id = ?2))
                 ORDER BY seq DESC LIMIT ?3",
            )
            .map_err(sql("listing events"))?;
        st.query_map(params![job_id, after, limit as i64], event)
            .and_then(|rows| rows.collect())
            .map(Some)
            .map_err(sql("listing events"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new<'a>(owner: &'a str) -> NewJob<'a> {
        NewJob {
            owner,
            model: "smollm2",
            training_file: "file-1",
            validation_file: None,
            suffix: Some("demo"),
            seed: 42,
            request: "{\"model\":\"smollm2\"}",
        }
    }

    #[test]
    fn jobs_move_through_their_statuses_and_page_per_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let jobs: Vec<JobRecord> = (0..5)
            .map(|i| {
                store
                    .add_job(&new(if i == 2 { "bob" } else { "ann" }))
                    .unwrap()
            })
            .collect();
        assert_eq!(jobs[0].status, JobStatus::ValidatingFiles);
        // Newest first, paged by cursor, one owner's only.
        let ids = |v: Vec<JobRecord>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
        let first = store.jobs(Scope::Owner("ann"), None, 2).unwrap();
        assert_eq!(ids(first.clone()), [jobs[4].id.clone(), jobs[3].id.clone()]);
        let next = store
            .jobs(Scope::Owner("ann"), Some(&first[1].id), 10)
            .unwrap();
        assert_eq!(ids(next), [jobs[1].id.clone(), jobs[0].id.clone()]);
        assert!(
            store
                .job(Scope::Owner("bob"), &jobs[0].id)
                .unwrap()
                .is_none()
        );
        assert_eq!(store.jobs(Scope::Admin, None, 10).unwrap().len(), 5);

        let id = &jobs[0].id;
        assert!(store.set_job_status(id, JobStatus::Queued).unwrap());
        assert!(store.set_job_status(id, JobStatus::Running).unwrap());
        let running = store.jobs_with_status(JobStatus::Running).unwrap();
        assert_eq!((running.len(), &running[0].id), (1, id));
        assert!(
            store
                .succeed_job(id, "ft:smollm2:ann:demo:x", "/adapter", 1234)
                .unwrap()
        );
        // Ended: a late cancel, a failure or a second success changes nothing.
        assert!(!store.set_job_status(id, JobStatus::Cancelled).unwrap());
        assert!(!store.fail_job(id, "{}").unwrap());
        assert!(!store.succeed_job(id, "other", "/x", 1).unwrap());
        let served = store
            .model(Scope::Owner("ann"), "ft:smollm2:ann:demo:x")
            .unwrap()
            .unwrap();
        assert_eq!(
            (served.path.as_str(), served.job_id.as_str()),
            ("/adapter", id.as_str())
        );
        assert!(store.model(Scope::Admin, "other").unwrap().is_none());
        let j = store.job(Scope::Admin, id).unwrap().unwrap();
        assert_eq!(j.status, JobStatus::Succeeded);
        assert_eq!(j.fine_tuned_model.as_deref(), Some("ft:smollm2:ann:demo:x"));
        assert_eq!(j.trained_tokens, Some(1234));
        assert!(j.finished_at.is_some());
        let failed = &jobs[1].id;
        assert!(
            store
                .fail_job(failed, "{\"code\":\"invalid_training_file\"}")
                .unwrap()
        );
        let j = store.job(Scope::Admin, failed).unwrap().unwrap();
        assert_eq!((j.status, j.fine_tuned_model), (JobStatus::Failed, None));
    }

    #[test]
    fn events_are_listed_newest_first_and_only_to_the_jobs_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let job = store.add_job(&new("ann")).unwrap();
        let events: Vec<EventRecord> = (0..4)
            .map(|i| {
                let data = (i % 2 == 1)
                    .then(|| serde_json::json!({"step": i, "total_steps": 9, "train_loss": 1.5}));
                store
                    .add_event(&job.id, "info", &format!("event {i}"), data.as_ref())
                    .unwrap()
            })
            .collect();
        assert_eq!(events[1].kind, "metrics");
        assert_eq!(store.last_metrics_step(&job.id, true).unwrap(), Some(3));
        assert_eq!(store.last_metrics_step(&job.id, false).unwrap(), None);
        store.set_estimated_finish(&job.id, Some(99)).unwrap();
        store.set_result_files(&job.id, &["file-r".into()]).unwrap();
        let j = store.job(Scope::Admin, &job.id).unwrap().unwrap();
        assert_eq!(
            (j.estimated_finish, j.result_files),
            (Some(99), vec!["file-r".to_string()])
        );
        assert_eq!(events[0].kind, "message");
        let page = store
            .events(Scope::Owner("ann"), &job.id, None, 3)
            .unwrap()
            .unwrap();
        let msgs: Vec<&str> = page.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(msgs, ["event 3", "event 2", "event 1"]);
        let rest = store
            .events(Scope::Owner("ann"), &job.id, Some(&page[2].id), 3)
            .unwrap()
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].message, "event 0");
        assert!(
            store
                .events(Scope::Owner("bob"), &job.id, None, 3)
                .unwrap()
                .is_none()
        );
    }
}
