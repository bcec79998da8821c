//! OpenAI's files endpoints: `POST /v1/files` (multipart `file` and
//! `purpose`), `GET /v1/files`, `GET /v1/files/{id}`,
//! `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`. An upload is
//! streamed to disk a chunk at a time (never held whole in memory, cut off
//! past the size limit), recorded in the store under its owner, and a
//! fine-tune file is checked line by line before the answer: its status is
//! `processed`, or `error` with the line-numbered problems in
//! `status_details`. Another owner's file is a 404, as if it did not exist.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use skillet_store::{FileRecord, FileStatus, NewFile, Store};

use crate::error::ApiError;
use crate::routes::Caller;
use crate::state::AppState;

type Shared = State<Arc<AppState>>;

/// Most problems listed in a refused file's `status_details`.
const MAX_DETAILS: usize = 20;

/// The service's store and data directory, or a 404 where it is off.
fn service(state: &AppState) -> Result<(&Store, &Path), ApiError> {
    match (&state.store, &state.config.data_dir) {
        (Some(s), Some(d)) => Ok((s.as_ref(), d)),
        _ => Err(ApiError::not_found(
            "the files and fine-tuning endpoints are off (start the server with --data-dir)",
        )),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(e.to_string())
}

/// A file as OpenAI shows it.
pub fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose, "status": f.status,
        "status_details": f.status_details,
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}")).with_param("id")
}

/// `POST /v1/files`.
pub async fn upload(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let (store, dir) = service(&state)?;
    let files = dir.join("files");
    std::fs::create_dir_all(&files).map_err(internal)?;
    let (mut purpose, mut saved): (Option<String>, Option<(String, PathBuf, u64)>) = (None, None);
    let limit = state.config.max_file_bytes as u64;
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid(format!("multipart body: {e}")))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| ApiError::invalid(e.to_string()))?,
                )
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let tmp = files.join(format!(".upload-{}", skillet_store::new_id("part")));
                let mut out = std::fs::File::create(&tmp).map_err(internal)?;
                let mut bytes = 0u64;
                let written: Result<(), ApiError> = async {
                    while let Some(chunk) = field
                        .chunk()
                        .await
                        .map_err(|e| ApiError::invalid(format!("upload: {e}")))?
                    {
                        bytes += chunk.len() as u64;
                        if bytes > limit {
                            return Err(ApiError::too_large(limit as usize).with_param("file"));
                        }
                        out.write_all(&chunk).map_err(internal)?;
                    }
                    out.flush().map_err(internal)
                }
                .await;
                if let Err(e) = written {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                saved = Some((name, tmp, bytes));
            }
            _ => {}
        }
    }
    let Some((filename, tmp, bytes)) = saved else {
        return Err(ApiError::invalid("no file in the upload").with_param("file"));
    };
    let purpose = match purpose {
        Some(p) => p,
        None => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ApiError::invalid("purpose is required").with_param("purpose"));
        }
    };
    let id = skillet_store::new_id("file");
    let path = files.join(&id);
    std::fs::rename(&tmp, &path).map_err(internal)?;
    let record = store
        .add_file(
            &NewFile {
                owner: &caller.owner,
                filename: &filename,
                purpose: &purpose,
                bytes,
                path: &path.display().to_string(),
            },
            Some(&id),
        )
        .map_err(internal)?;
    // Only fine-tune files have lines to check.
    let checked = if purpose == "fine-tune" {
        tokio::task::spawn_blocking(move || validate(&path, &filename).map(|_| ()))
            .await
            .map_err(internal)?
    } else {
        Ok(())
    };
    let (status, status_details) = match checked {
        Ok(()) => (FileStatus::Processed, None),
        Err(d) => (FileStatus::Error, Some(d)),
    };
    store
        .set_file_status(&record.id, status, status_details.as_deref())
        .map_err(internal)?;
    let record = FileRecord {
        status,
        status_details,
        ..record
    };
    Ok(axum::Json(file_object(&record)).into_response())
}

/// What the file holds, or its problems, named by the uploaded name and
/// line.
pub(crate) fn validate(path: &Path, filename: &str) -> Result<skillet_data::FileSummary, String> {
    match skillet_data::check_training_file(path) {
        Ok(s) => Ok(s),
        Err(skillet_data::DataError::Invalid(issues)) => {
            let shown: Vec<String> = issues
                .iter()
                .take(MAX_DETAILS)
                .map(|i| i.to_string().replace(&path.display().to_string(), filename))
                .collect();
            let more = issues.len().saturating_sub(MAX_DETAILS);
            let mut text = format!("{} problem(s): {}", issues.len(), shown.join("; "));
            if more > 0 {
                text += &format!("; and {more} more");
            }
            Err(text)
        }
        Err(e) => Err(e.to_string().replace(&path.display().to_string(), filename)),
    }
}

/// `GET /v1/files`.
pub async fn list(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let (store, _) = service(&state)?;
    let files = store.files(caller.scope()).map_err(internal)?;
    let data: Vec<Value> = files.iter().map(file_object).collect();
    Ok(axum::Json(json!({"object": "list", "data": data, "has_more": false})).into_response())
}

/// The file `id` if the caller may see it, else a 404.
fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<FileRecord, ApiError> {
    let (store, _) = service(state)?;
    store
        .file(caller.scope(), id)
        .map_err(internal)?
        .ok_or_else(|| not_found(id))
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(file_object(&visible(&state, &caller, &id)?)).into_response())
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded.
pub async fn content(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let f = visible(&state, &caller, &id)?;
    let file = tokio::fs::File::open(&f.path).await.map_err(internal)?;
    let body = axum::body::Body::from_stream(chunks(file));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// A file read as a stream of 64 KiB chunks.
fn chunks(file: tokio::fs::File) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 64 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let (store, _) = service(&state)?;
    let f = store
        .delete_file(caller.scope(), &id)
        .map_err(internal)?
        .ok_or_else(|| not_found(&id))?;
    let _ = std::fs::remove_file(&f.path);
    Ok(axum::Json(json!({"id": f.id, "object": "file", "deleted": true})).into_response())
}
