//! The project's cache root, where its scripts put what they fetch (the
//! models, MKL): `$SKILLET_CACHE`, else `$XDG_CACHE_HOME/skillet`, else
//! `~/.cache/skillet`; empty variables count as unset, as in the scripts.

use std::path::PathBuf;

/// The cache root, or `None` where not even `HOME` is set.
pub fn cache_dir() -> Option<PathBuf> {
    let set = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    set("SKILLET_CACHE")
        .or_else(|| set("XDG_CACHE_HOME").map(|c| c.join("skillet")))
        .or_else(|| set("HOME").map(|h| h.join(".cache/skillet")))
}
