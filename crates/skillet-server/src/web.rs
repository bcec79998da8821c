//! The web page at `/`: jobs with their live loss curves, events,
//! checkpoints and before/after reports; files with their validation
//! results; a form to upload a file and start a job; a playground that
//! asks two models side by side. One HTML file embedded in the binary
//! (no CDN, nothing fetched from elsewhere); it calls the same API with
//! the key entered once in the page, so it needs no key to load.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("web/index.html");

/// `GET /`.
pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:",
            ),
        ],
        PAGE,
    )
        .into_response()
}
