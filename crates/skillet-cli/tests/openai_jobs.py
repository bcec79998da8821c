"""Drives the fine-tuning service of a running `skillet serve` with the
official `openai` Python client, as users of OpenAI's fine-tuning API do.
Run by tests/jobs_api.rs, which starts the server with two owners' keys;
exits non-zero with a message on the first failed check.

    python openai_jobs.py --base-url http://127.0.0.1:PORT/v1 --key KEY \
        --other-key KEY2 --owner OWNER --model BASE --train FILE --bad FILE
"""

import argparse
import sys
import threading
import time

import openai


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def expect(exc_type, fn, what):
    try:
        fn()
    except exc_type as e:
        print(f"ok: {what} -> {type(e).__name__} {e.status_code}")
        return e
    except Exception as e:  # noqa: BLE001 - report what came instead
        check(False, f"{what}: expected {exc_type.__name__}, got {type(e).__name__}: {e}")
    check(False, f"{what}: expected {exc_type.__name__}, got no error")


def wait(client, job_id, until, secs=180):
    deadline = time.time() + secs
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        if time.time() > deadline:
            check(False, f"job {job_id} reached {until} within {secs} s (is {job.status})")
        time.sleep(0.2)


SKILLET = {"data": {"max_seq_len": 48, "validation_fraction": 0.2}, "eval": {"generate": False}}


def supervised(epochs):
    return {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": 4, "learning_rate_multiplier": 10}},
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--other-key", required=True)
    ap.add_argument("--owner", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--bad", required=True)
    a = ap.parse_args()

    client = openai.OpenAI(base_url=a.base_url, api_key=a.key, max_retries=0, timeout=120)
    other = openai.OpenAI(base_url=a.base_url, api_key=a.other_key, max_retries=0, timeout=120)

    # Files: a good one is processed, a bad one is refused line by line.
    with open(a.train, "rb") as f:
        train = client.files.create(file=f, purpose="fine-tune")
    check(train.status == "processed", f"training file processed: {train.status}")
    with open(a.bad, "rb") as f:
        bad = client.files.create(file=f, purpose="fine-tune")
    check(bad.status == "error", "a bad file has status error")
    check("bad.jsonl:4" in (bad.status_details or ""), f"its details name the line: {bad.status_details}")
    check(client.files.retrieve(train.id).id == train.id, "files.retrieve")
    expect(openai.NotFoundError, lambda: other.files.retrieve(train.id), "another owner's file is a 404")

    # A job through to a served model.
    job = client.fine_tuning.jobs.create(
        model=a.model,
        training_file=train.id,
        suffix="sums",
        seed=11,
        method=supervised(2),
        metadata={"team": "search"},
        extra_body={"skillet": SKILLET},
    )
    check(job.status == "validating_files", f"created: {job.status}")
    check(job.method.type == "supervised", "method echoed")
    check(job.metadata == {"team": "search"}, f"metadata echoed: {job.metadata}")
    job = wait(client, job.id, ("succeeded", "failed", "cancelled"))
    check(job.status == "succeeded", f"succeeded: {job.error}")
    check(job.fine_tuned_model == f"ft:{a.model}:{a.owner}:sums:{job.id}", f"model name: {job.fine_tuned_model}")
    check(job.trained_tokens and job.trained_tokens > 0, f"trained tokens: {job.trained_tokens}")
    check(job.hyperparameters.n_epochs == 2, "hyperparameters resolved")
    check(len(job.result_files) == 3, f"result files: {job.result_files}")
    report = client.files.content(job.result_files[0]).text
    check("loss" in report, "the report is readable as a result file")

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    check(events[0].message == "The job has successfully completed", f"newest event first: {events[0].message}")
    metrics = [e for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    check(len(metrics) == metrics[0].data["total_steps"], f"a metrics event per step ({len(metrics)})")
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    check(len(page.data) == 3 and page.has_more, "events are paged")

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    check(len(ckpts) == 2, f"a checkpoint per epoch: {[c.step_number for c in ckpts]}")
    check(ckpts[0].step_number > ckpts[1].step_number, "latest checkpoint first")
    check("train_loss" in ckpts[0].metrics.model_dump(exclude_none=True), f"checkpoint metrics: {ckpts[0].metrics}")
    ckpt_model = ckpts[1].fine_tuned_model_checkpoint
    check(ckpt_model.endswith(f":ckpt-step-{ckpts[1].step_number}"), f"checkpoint model: {ckpt_model}")

    ids = [m.id for m in client.models.list()]
    check(job.fine_tuned_model in ids and ckpt_model in ids, "the tuned model and its checkpoints are listed")
    check(job.fine_tuned_model not in [m.id for m in other.models.list()], "not to another owner")
    ask = [{"role": "user", "content": "add 3 and 3"}]
    for model in (job.fine_tuned_model, ckpt_model):
        r = client.chat.completions.create(model=model, messages=ask, max_tokens=4)
        check(r.model == model and r.choices[0].message.content is not None, f"chat with {model}")
        expect(
            openai.NotFoundError,
            lambda m=model: other.chat.completions.create(model=m, messages=ask, max_tokens=4),
            "another owner cannot chat with it",
        )
    jobs = client.fine_tuning.jobs.list(limit=5)
    check(job.id in [j.id for j in jobs.data], "jobs.list")
    expect(openai.NotFoundError, lambda: other.fine_tuning.jobs.retrieve(job.id), "another owner's job is a 404")
    expect(
        openai.NotFoundError,
        lambda: other.fine_tuning.jobs.list_events(job.id),
        "another owner's events are a 404",
    )
    expect(
        openai.NotFoundError,
        lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
        "another owner's checkpoints are a 404",
    )

    # Errors: a missing file is a 400; a bad file fails the job with lines.
    expect(
        openai.BadRequestError,
        lambda: client.fine_tuning.jobs.create(model=a.model, training_file="file-missing"),
        "a job on a missing file",
    )
    failed = client.fine_tuning.jobs.create(model=a.model, training_file=bad.id)
    failed = wait(client, failed.id, ("failed",), 60)
    check(failed.error.code == "invalid_training_file", f"error code: {failed.error}")
    check("bad.jsonl:4" in failed.error.message, f"error names the line: {failed.error.message}")

    # Several clients at once: uploads and job creation.
    made, errors = [], []

    def upload_and_create(i):
        try:
            c = openai.OpenAI(base_url=a.base_url, api_key=a.key, max_retries=0, timeout=120)
            with open(a.train, "rb") as f:
                up = c.files.create(file=(f"part{i}.jsonl", f.read()), purpose="fine-tune")
            j = c.fine_tuning.jobs.create(
                model=a.model, training_file=up.id, method=supervised(1), extra_body={"skillet": SKILLET}
            )
            made.append(j.id)
        except Exception as e:  # noqa: BLE001 - collected and reported
            errors.append(repr(e))

    threads = [threading.Thread(target=upload_and_create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors and len(made) == 6, f"6 concurrent uploads and job creations: {errors}")
    for jid in made:
        check(wait(client, jid, ("succeeded", "failed")).status == "succeeded", f"concurrent job {jid}")

    # Serving goes on while a job trains; cancel stops it.
    method = supervised(50)
    method["supervised"]["hyperparameters"]["batch_size"] = 1
    long = client.fine_tuning.jobs.create(
        model=a.model, training_file=train.id, method=method, extra_body={"skillet": SKILLET}
    )
    deadline = time.time() + 60
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id, limit=100).data):
        if time.time() > deadline:
            check(False, "the long job reports a step within 60 s")
        time.sleep(0.1)
    answered = 0
    for _ in range(5):
        r = client.chat.completions.create(model=a.model, messages=ask, max_tokens=4)
        answered += r.choices[0].message.content is not None
    check(answered == 5, "chat is answered while a job trains")
    check(client.fine_tuning.jobs.retrieve(long.id).status == "running", "the job was still training")
    cancelled = client.fine_tuning.jobs.cancel(long.id)
    check(cancelled.status == "cancelled", f"cancel: {cancelled.status}")
    time.sleep(1.0)
    check(client.fine_tuning.jobs.retrieve(long.id).status == "cancelled", "it stays cancelled")

    # Deleting the fine-tuned model.
    expect(openai.NotFoundError, lambda: other.models.delete(job.fine_tuned_model), "another owner cannot delete it")
    d = client.models.delete(job.fine_tuned_model)
    check(d.deleted and d.id == job.fine_tuned_model, "models.delete")
    expect(
        openai.NotFoundError,
        lambda: client.chat.completions.create(model=job.fine_tuned_model, messages=ask, max_tokens=4),
        "a deleted model is not served",
    )
    print("all checks passed")


if __name__ == "__main__":
    main()
