//! The fine-tuning jobs' worker: one thread beside the server that takes
//! jobs from the store and runs each as a child process of Skillet's own
//! `train`, in its run folder under the data directory. A crash or a kill
//! of a child cannot take the server down, and serving goes on while it
//! trains. The child is niced and given its own thread count, so decoding
//! requests keep the cores they need.
//!
//! - **Validation.** A job in `validating_files` gets its files checked:
//!   visible to its owner, without problems, and of the kind its method
//!   reads.
//!   The files are copied into the run folder and the run config is
//!   written. The job then moves to `queued`, or ends `failed` with an
//!   OpenAI-style error.
//! - **Running.** Up to `max_jobs` run at once.
//! - **Progress.** While a job runs, new lines of its `metrics.jsonl`
//!   become `metrics` events, new checkpoints are recorded and served as
//!   `…:ckpt-step-N`, and the estimate of its end is kept current.
//! - **Outcome.** On a clean exit the adapter is served as the job's
//!   fine-tuned model and the report becomes its result files. Any other
//!   exit fails the job with the child's error (data errors keep their
//!   line numbers).
//! - **Cancelling** ends the job in the store; the worker sees it and
//!   kills the child.
//! - **Restarts.** The server's stop kills the children without recording
//!   anything, so those jobs are still `running`. At the next start they
//!   resume from their last checkpoint, which the trainer continues bit
//!   for bit; steps already reported are not reported twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skillet_store::{JobRecord, JobStatus, NewFile, Scope, Store};

use crate::job_spec::{JobSpec, RunPaths};

/// How often running children are looked at.
const POLL: Duration = Duration::from_millis(250);

/// What the worker needs to know.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The served base model's file or folder.
    pub model: PathBuf,
    /// Its id (the `<base>` of fine-tuned model names).
    pub model_id: String,
    /// The data directory (run folders go to `jobs/`).
    pub data_dir: PathBuf,
    /// The command that trains: program and leading arguments, to which a
    /// config path (or `--resume DIR`) is added.
    pub trainer: Vec<String>,
    /// Jobs that run at once.
    pub max_jobs: usize,
    /// Threads each training child uses (`None`: all cores).
    pub train_threads: Option<usize>,
    /// The children's niceness (higher yields the cores to serving).
    pub train_nice: i32,
}

/// The worker, as the server holds it: wake it, stop it.
pub struct Runner {
    wake: Mutex<Sender<()>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Runner {
    /// Starts the worker thread.
    pub fn start(store: Arc<Store>, config: RunnerConfig) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("skillet-jobs".into())
            .spawn(move || {
                Worker {
                    store,
                    config,
                    active: HashMap::new(),
                }
                .run(rx, &flag)
            })?;
        Ok(Self {
            wake: Mutex::new(tx),
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Tells the worker to look at the store now (a job was created or
    /// cancelled).
    pub fn wake(&self) {
        if let Ok(tx) = self.wake.lock() {
            let _ = tx.send(());
        }
    }

    /// Stops the worker and kills its children; their jobs stay `running`
    /// and resume at the next start.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake();
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// The name a job's fine-tuned model is served under:
/// `ft:<base>:<owner>:<suffix>:<job id>`.
pub fn fine_tuned_name(base: &str, job: &JobRecord) -> String {
    format!(
        "ft:{base}:{}:{}:{}",
        job.owner,
        job.suffix.as_deref().unwrap_or(""),
        job.id
    )
}

/// A job's run folder.
pub fn run_dir(data_dir: &Path, job_id: &str) -> PathBuf {
    data_dir.join("jobs").join(job_id)
}

/// Why a job failed, as OpenAI's job object shows it.
#[derive(Debug)]
struct Failure {
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl Failure {
    fn json(&self) -> String {
        json!({"code": self.code, "message": self.message, "param": self.param}).to_string()
    }
}

/// One running child and what has been read of its run.
struct Active {
    job: JobRecord,
    child: Child,
    out: PathBuf,
    /// Bytes of `metrics.jsonl` read.
    offset: u64,
    /// Steps already reported as events (from the store at start).
    reported_train: Option<u64>,
    reported_eval: Option<u64>,
    /// Each step's training metrics (for checkpoints and trained tokens).
    train: BTreeMap<u64, Value>,
    /// Each validation's metrics by step.
    valid: BTreeMap<u64, Value>,
    checkpoints: BTreeSet<u64>,
    /// The first step this child reported, and when: the rate for the
    /// estimate.
    first: Option<(u64, Instant)>,
}

struct Worker {
    store: Arc<Store>,
    config: RunnerConfig,
    active: HashMap<String, Active>,
}

impl Worker {
    fn run(mut self, wake: Receiver<()>, stop: &AtomicBool) {
        match self.store.jobs_with_status(JobStatus::Running) {
            Ok(jobs) => {
                for job in jobs {
                    self.start(job);
                }
            }
            Err(e) => tracing::error!("jobs: reading running jobs: {e}"),
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Err(e) = self.tick() {
                tracing::error!("jobs: {e}");
            }
            match wake.recv_timeout(POLL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for (_, mut a) in self.active.drain() {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
    }

    /// One look at everything: running children, then new work.
    fn tick(&mut self) -> skillet_store::Result<()> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            self.watch(&id)?;
        }
        for job in self.store.jobs_with_status(JobStatus::ValidatingFiles)? {
            self.prepare(&job)?;
        }
        if self.active.len() < self.config.max_jobs.max(1) {
            for job in self.store.jobs_with_status(JobStatus::Queued)? {
                if self.active.len() >= self.config.max_jobs.max(1) {
                    break;
                }
                self.start(job);
            }
        }
        Ok(())
    }

    fn event(&self, job: &str, level: &str, message: &str, data: Option<&Value>) {
        if let Err(e) = self.store.add_event(job, level, message, data) {
            tracing::error!("jobs: recording an event of {job}: {e}");
        }
    }

    fn fail(&self, job: &JobRecord, f: &Failure) {
        if let Ok(true) = self.store.fail_job(&job.id, &f.json()) {
            self.event(&job.id, "error", &f.message, None);
        }
    }

    /// Checks a job's files and writes its run folder; queued or failed.
    fn prepare(&self, job: &JobRecord) -> skillet_store::Result<()> {
        self.event(
            &job.id,
            "info",
            &format!("Validating training file: {}", job.training_file),
            None,
        );
        match self.write_run(job) {
            Ok(()) => {
                if self.store.set_job_status(&job.id, JobStatus::Queued)? {
                    self.event(
                        &job.id,
                        "info",
                        "Files validated, moving job to queued state",
                        None,
                    );
                }
            }
            Err(f) => self.fail(job, &f),
        }
        Ok(())
    }

    /// Copies one of the job's files into its run folder, checked for the
    /// kind `expects`.
    fn copy_file(
        &self,
        job: &JobRecord,
        id: &str,
        param: &'static str,
        expects: &str,
        to: &Path,
    ) -> Result<(), Failure> {
        let code = if param == "training_file" {
            "invalid_training_file"
        } else {
            "invalid_validation_file"
        };
        let fail = |message: String| Failure {
            code,
            message,
            param: Some(param),
        };
        let f = self
            .store
            .file(Scope::Owner(&job.owner), id)
            .map_err(|e| fail(e.to_string()))?
            .ok_or_else(|| fail(format!("File {id} was not found")))?;
        if let Some(details) = &f.status_details {
            return Err(fail(format!("File {id} has problems: {details}")));
        }
        std::fs::copy(&f.path, to).map_err(|e| fail(format!("File {id}: {e}")))?;
        let summary =
            crate::files::validate(to, &f.filename).map_err(|d| fail(format!("File {id}: {d}")))?;
        if summary.kind != expects {
            return Err(fail(format!(
                "File {id} ({}) holds {} ({} format); this job's method trains on {expects}",
                f.filename, summary.kind, summary.format
            )));
        }
        Ok(())
    }

    fn write_run(&self, job: &JobRecord) -> Result<(), Failure> {
        let internal = |e: &dyn std::fmt::Display| Failure {
            code: "internal_error",
            message: format!("preparing the run: {e}"),
            param: None,
        };
        let request: Value = serde_json::from_str(&job.request).map_err(|e| internal(&e))?;
        let spec = JobSpec::parse(&request).map_err(|e| Failure {
            code: "invalid_request",
            message: e.message,
            param: None,
        })?;
        let dir = run_dir(&self.config.data_dir, &job.id);
        std::fs::create_dir_all(&dir).map_err(|e| internal(&e))?;
        let expects = spec.method.expects();
        let train = dir.join("train.jsonl");
        self.copy_file(job, &job.training_file, "training_file", expects, &train)?;
        let validation = match &job.validation_file {
            Some(id) => {
                let to = dir.join("valid.jsonl");
                self.copy_file(job, id, "validation_file", expects, &to)?;
                Some(to)
            }
            None => None,
        };
        let init_adapter = if job.model == self.config.model_id {
            None
        } else {
            let m = self
                .store
                .model(Scope::Owner(&job.owner), &job.model)
                .map_err(|e| internal(&e))?
                .ok_or_else(|| Failure {
                    code: "model_not_available",
                    message: format!("Model {} is no longer available", job.model),
                    param: Some("model"),
                })?;
            Some(PathBuf::from(m.path))
        };
        let out = dir.join("out");
        let cfg = spec
            .run_config(
                &RunPaths {
                    model: &self.config.model,
                    output_dir: &out,
                    train: &train,
                    validation: validation.as_deref(),
                    init_adapter: init_adapter.as_deref(),
                },
                job.seed as u64,
            )
            .map_err(|e| Failure {
                code: "invalid_request",
                message: e.message,
                param: None,
            })?;
        std::fs::write(dir.join("config.toml"), cfg.to_toml()).map_err(|e| internal(&e))
    }

    /// Starts (or, with a checkpoint in its run folder, resumes) a job's
    /// child.
    fn start(&mut self, job: JobRecord) {
        let dir = run_dir(&self.config.data_dir, &job.id);
        let out = dir.join("out");
        let resume = skillet_train::latest_checkpoint(&out);
        if resume.is_none() {
            // A start from scratch: nothing of an earlier start is read.
            let _ = std::fs::remove_dir_all(&out);
        }
        let child = match self.spawn(&dir, &out, resume.is_some()) {
            Ok(c) => c,
            Err(e) => {
                self.fail(
                    &job,
                    &Failure {
                        code: "internal_error",
                        message: format!("could not start training: {e}"),
                        param: None,
                    },
                );
                return;
            }
        };
        match self.store.set_job_status(&job.id, JobStatus::Running) {
            Ok(true) => {}
            _ => {
                // Cancelled meanwhile.
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
        let message = match resume.as_deref().and_then(checkpoint_step) {
            Some(step) => format!("Fine-tuning job resumed from the checkpoint at step {step}"),
            None => "Fine-tuning job started".to_string(),
        };
        self.event(&job.id, "info", &message, None);
        let reported = |training| {
            self.store
                .last_metrics_step(&job.id, training)
                .ok()
                .flatten()
        };
        let checkpoints = self
            .store
            .checkpoints(Scope::Admin, &job.id, None, usize::MAX >> 1)
            .ok()
            .flatten()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.step)
            .collect();
        let active = Active {
            reported_train: reported(true),
            reported_eval: reported(false),
            job,
            child,
            out,
            offset: 0,
            train: BTreeMap::new(),
            valid: BTreeMap::new(),
            checkpoints,
            first: None,
        };
        self.active.insert(active.job.id.clone(), active);
    }

    fn spawn(&self, dir: &Path, out: &Path, resume: bool) -> std::io::Result<Child> {
        let Some((program, lead)) = self.config.trainer.split_first() else {
            return Err(std::io::Error::other("no trainer command configured"));
        };
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
        };
        // Each start's errors alone: the last run's explain its exit.
        let stderr = std::fs::File::create(dir.join("stderr.log"))?;
        let mut cmd = Command::new(program);
        cmd.args(lead);
        if resume {
            cmd.arg("--resume").arg(out);
        } else {
            cmd.arg(dir.join("config.toml")).arg("--overwrite");
        }
        cmd.stdin(Stdio::null())
            .stdout(log("stdout.log")?)
            .stderr(stderr);
        if let Some(n) = self.config.train_threads {
            cmd.env("RAYON_NUM_THREADS", n.to_string());
        }
        let nice = self.config.train_nice;
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // The child dies with this thread (the server), so a
                    // restarted server is the only one running its job.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if nice != 0 {
                        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                    }
                    Ok(())
                });
            }
        }
        cmd.spawn()
    }

    /// Reads a running job's progress, and ends it if its child exited or
    /// it was cancelled. A store error keeps the child watched (it is
    /// tried again at the next look).
    fn watch(&mut self, id: &str) -> skillet_store::Result<()> {
        let Some(mut a) = self.active.remove(id) else {
            return Ok(());
        };
        match self.look(&mut a) {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.active.insert(id.to_string(), a);
                Ok(())
            }
            Err(e) => {
                self.active.insert(id.to_string(), a);
                Err(e)
            }
        }
    }

    /// One look at a running job; whether it has ended.
    fn look(&self, a: &mut Active) -> skillet_store::Result<bool> {
        self.read_metrics(a);
        self.record_checkpoints(a)?;
        let status = self.store.job(Scope::Admin, &a.job.id)?.map(|j| j.status);
        if status != Some(JobStatus::Running) {
            // Cancelled (or gone): stop the child.
            let _ = a.child.kill();
            let _ = a.child.wait();
            return Ok(true);
        }
        match a.child.try_wait() {
            Ok(None) => Ok(false),
            Ok(Some(exit)) => {
                self.read_metrics(a);
                self.record_checkpoints(a)?;
                if exit.success() {
                    self.succeed(a)?;
                } else {
                    let f = self.child_failure(a, exit);
                    self.fail(&a.job, &f);
                }
                Ok(true)
            }
            Err(e) => {
                tracing::error!("jobs: waiting for {}: {e}", a.job.id);
                Ok(false)
            }
        }
    }

    /// New complete lines of `metrics.jsonl` into events.
    fn read_metrics(&self, a: &mut Active) {
        let path = a.out.join("metrics.jsonl");
        let Ok(mut f) = std::fs::File::open(&path) else {
            return;
        };
        let mut text = String::new();
        if f.seek(SeekFrom::Start(a.offset)).is_err() || f.read_to_string(&mut text).is_err() {
            return;
        }
        let Some(end) = text.rfind('\n') else { return };
        a.offset += end as u64 + 1;
        for line in text[..end].lines() {
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let step = e["step"].as_u64().unwrap_or(0);
            match e["kind"].as_str() {
                Some("train") => {
                    let data = train_data(&e);
                    a.train.insert(step, data.clone());
                    if a.reported_train.is_some_and(|s| step <= s) {
                        continue;
                    }
                    a.reported_train = Some(step);
                    let total = e["total_steps"].as_u64().unwrap_or(0);
                    self.event(
                        &a.job.id,
                        "info",
                        &format!(
                            "Step {step}/{total}: training loss={:.4}",
                            e["loss"].as_f64().unwrap_or(f64::NAN)
                        ),
                        Some(&data),
                    );
                    self.estimate(a, step, total);
                }
                Some("eval") => {
                    let data = prefixed(step, "valid", &e["stats"]);
                    a.valid.insert(step, data.clone());
                    if a.reported_eval.is_some_and(|s| step <= s) {
                        continue;
                    }
                    a.reported_eval = Some(step);
                    self.event(
                        &a.job.id,
                        "info",
                        &format!(
                            "Step {step}: validation loss={:.4}",
                            e["stats"]["loss"].as_f64().unwrap_or(f64::NAN)
                        ),
                        Some(&data),
                    );
                }
                _ => {}
            }
        }
    }

    fn estimate(&self, a: &mut Active, step: u64, total: u64) {
        let now = Instant::now();
        let Some((first, at)) = a.first else {
            a.first = Some((step, now));
            return;
        };
        if step <= first {
            return;
        }
        let per_step = now.duration_since(at).as_secs_f64() / (step - first) as f64;
        let left = per_step * total.saturating_sub(step) as f64;
        let _ = self
            .store
            .set_estimated_finish(&a.job.id, Some(skillet_store::now() + left.ceil() as i64));
    }

    /// Checkpoints written since the last look, recorded and served.
    fn record_checkpoints(&self, a: &mut Active) -> skillet_store::Result<()> {
        let Ok(dir) = std::fs::read_dir(a.out.join("checkpoints")) else {
            return Ok(());
        };
        let mut found: Vec<(u64, PathBuf)> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| checkpoint_step(&p).map(|s| (s, p)))
            .filter(|(s, _)| !a.checkpoints.contains(s))
            .collect();
        found.sort();
        let name = fine_tuned_name(&self.config.model_id, &a.job);
        for (step, path) in found {
            let mut metrics = json!({"step": step});
            if let Some(t) = last_at(&a.train, step) {
                metrics["train_loss"] = t["train_loss"].clone();
                metrics["train_mean_token_accuracy"] = t["train_mean_token_accuracy"].clone();
            }
            if let Some(v) = last_at(&a.valid, step) {
                // Validation runs on the whole held-out set.
                for (k, from) in [
                    ("valid_loss", "valid_loss"),
                    ("valid_mean_token_accuracy", "valid_mean_token_accuracy"),
                    ("full_valid_loss", "valid_loss"),
                    (
                        "full_valid_mean_token_accuracy",
                        "valid_mean_token_accuracy",
                    ),
                ] {
                    metrics[k] = v[from].clone();
                }
            }
            let model = format!("{name}:ckpt-step-{step}");
            self.store.add_checkpoint(
                &a.job.id,
                &a.job.owner,
                step,
                &metrics,
                &model,
                &path.display().to_string(),
            )?;
            a.checkpoints.insert(step);
            self.event(
                &a.job.id,
                "info",
                &format!("Checkpoint created at step {step}"),
                None,
            );
        }
        Ok(())
    }

    fn succeed(&self, a: &Active) -> skillet_store::Result<()> {
        let job = &a.job;
        let name = fine_tuned_name(&self.config.model_id, job);
        let adapter = a.out.join("adapter");
        let mut results = Vec::new();
        for file in ["report.md", "report.json", "loss.svg"] {
            let path = a.out.join(file);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let r = self.store.add_file(
                &NewFile {
                    owner: &job.owner,
                    filename: file,
                    purpose: "fine-tune-results",
                    bytes: meta.len(),
                    path: &path.display().to_string(),
                },
                None,
            )?;
            self.store
                .set_file_status(&r.id, skillet_store::FileStatus::Processed, None)?;
            results.push(r.id);
        }
        self.store.set_result_files(&job.id, &results)?;
        let tokens: i64 = a
            .train
            .values()
            .map(|d| d["tokens"].as_i64().unwrap_or(0))
            .sum();
        let path = adapter.display().to_string();
        if self.store.succeed_job(&job.id, &name, &path, tokens)? {
            self.event(
                &job.id,
                "info",
                &format!("New fine-tuned model created: {name}"),
                None,
            );
            self.event(&job.id, "info", "The job has successfully completed", None);
        }
        Ok(())
    }

    /// Why the child failed: its error, with the run folder's copies named
    /// by the job's file ids.
    fn child_failure(&self, a: &Active, exit: std::process::ExitStatus) -> Failure {
        let dir = run_dir(&self.config.data_dir, &a.job.id);
        let text = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
        let train = dir.join("train.jsonl").display().to_string();
        let valid = dir.join("valid.jsonl").display().to_string();
        let (code, param) = if text.contains(&train) {
            ("invalid_training_file", Some("training_file"))
        } else if text.contains(&valid) {
            ("invalid_validation_file", Some("validation_file"))
        } else {
            ("training_failed", None)
        };
        let mut message = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
            .replace(&train, &a.job.training_file)
            .replace(
                &valid,
                a.job.validation_file.as_deref().unwrap_or("validation"),
            )
            .replace(&dir.display().to_string(), "<run>");
        if let Some(m) = message.strip_prefix("Error: ") {
            message = m.to_string();
        }
        if message.len() > 4000 {
            let cut = message.floor_char_boundary(message.len() - 4000);
            message = format!("…{}", &message[cut..]);
        }
        if message.is_empty() {
            message = format!("training stopped: {exit}");
        }
        Failure {
            code,
            message,
            param,
        }
    }
}

/// The latest entry at or before `step`.
fn last_at(m: &BTreeMap<u64, Value>, step: u64) -> Option<&Value> {
    m.range(..=step).next_back().map(|(_, v)| v)
}

/// The step of a `checkpoints/step-N` folder.
fn checkpoint_step(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

/// A `train` line of `metrics.jsonl` as an event's data, with OpenAI's
/// names where it has them.
fn train_data(e: &Value) -> Value {
    let mut d = json!({
        "step": e["step"], "total_steps": e["total_steps"], "train_loss": e["loss"],
        "learning_rate": e["lr"], "tokens": e["tokens"], "tokens_per_s": e["tokens_per_s"],
        "epoch": e["epoch"], "grad_norm": e["grad_norm"],
    });
    if let Some(m) = e["metrics"].as_object() {
        for (k, v) in m {
            let name = if k == "accuracy" {
                "train_mean_token_accuracy".to_string()
            } else {
                format!("train_{k}")
            };
            d[name] = v.clone();
        }
    }
    d
}

/// Validation stats as an event's data: `valid_loss`,
/// `valid_mean_token_accuracy`, `valid_<name>` for the rest.
fn prefixed(step: u64, prefix: &str, stats: &Value) -> Value {
    let mut d = json!({"step": step});
    if let Some(m) = stats.as_object() {
        for (k, v) in m {
            let name = if k == "accuracy" {
                format!("{prefix}_mean_token_accuracy")
            } else {
                format!("{prefix}_{k}")
            };
            d[name] = v.clone();
        }
    }
    d
}
