//! Record ids as OpenAI shapes them: a prefix and random hex
//! (`file-…`, `ftjob-…`, `ftevent-…`).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// A new id `{prefix}-{24 hex digits}`: unique within a process (a
/// counter) and, with overwhelming likelihood, across processes and
/// restarts (the std library's per-process random hasher keys, the time
/// and the process id). Not a secret.
pub fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let word = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u64(n);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.finish()
    };
    let (a, b) = (word(1), word(2));
    format!("{prefix}-{a:016x}{:08x}", b >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_prefix_and_do_not_repeat() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| new_id("file")).collect();
        assert_eq!(ids.len(), 1000);
        assert!(
            ids.iter()
                .all(|i| i.starts_with("file-") && i.len() == 5 + 24)
        );
    }
}
