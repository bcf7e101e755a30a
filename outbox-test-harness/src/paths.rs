//! Where test artefacts go, unique names for them, and switches from the environment.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Cargo's target directory of the running test binary.
///
/// Test binaries live in `<target>/<profile>/deps/`, examples in
/// `<target>/<profile>/examples/`; cargo marks `<target>` with a `CACHEDIR.TAG`.
/// Falls back to `CARGO_TARGET_DIR`, then to the system temp directory.
pub(crate) fn target_dir() -> PathBuf {
    let from_exe = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .skip(1)
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
    });
    from_exe
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .filter(|dir| dir.is_absolute())
        })
        .unwrap_or_else(std::env::temp_dir)
}

/// Whether a yes/no environment variable is on: set, and neither empty nor `0`.
pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// A 64-bit value that differs between calls and between processes.
pub(crate) fn unique_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; mixing in a counter, the pid and
    // the clock keeps values distinct within one process too.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.finish()
}

/// A lowercase name such as `outbox_test_3fa2c19b0d4e7a61`, valid unquoted as a
/// database name on PostgreSQL and MySQL.
pub(crate) fn unique_name(prefix: &str) -> String {
    format!("{prefix}{:016x}", unique_u64())
}

/// The last `lines` lines of a text file, or a note saying why there are none.
pub(crate) fn file_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_plain_identifiers() {
        let a = unique_name("outbox_test_");
        let b = unique_name("outbox_test_");
        assert_ne!(a, b);
        assert_eq!(a.len(), "outbox_test_".len() + 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }

    #[test]
    fn the_target_dir_of_a_test_binary_is_found_by_its_cachedir_tag() {
        assert!(target_dir().join("CACHEDIR.TAG").is_file());
    }

    #[test]
    fn file_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\nd\n").expect("write");
        assert_eq!(file_tail(&path, 2), "c\nd");
        assert_eq!(file_tail(&path, 10), "a\nb\nc\nd");
    }
}
