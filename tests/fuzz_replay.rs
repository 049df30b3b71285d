//! Replays every committed fuzz input (`fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`)
//! through the same checking functions the libFuzzer targets run (`fuzz/checks/`), so that the
//! fuzzers' properties are checked by `cargo test` on stable Rust, without libFuzzer.
//!
//! Set `WSLOOP_REPLAY_CORPUS=1` to also replay libFuzzer's local corpus (`fuzz/corpus/<target>/`,
//! not committed), e.g. after a long fuzzing run.

#[path = "../fuzz/checks/mod.rs"]
mod checks;

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};

/// The files directly in `dir`, sorted; none if it does not exist. Dotfiles are skipped.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

/// Runs `check` on every input of `target`; returns how many were run. Every failing file is
/// named before the test fails.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut dirs = vec![
        root.join("seeds").join(target),
        root.join("regressions").join(target),
    ];
    if std::env::var_os("WSLOOP_REPLAY_CORPUS").is_some() {
        dirs.push(root.join("corpus").join(target));
    }
    let mut failed = Vec::new();
    let mut count = 0;
    for path in dirs.iter().flat_map(|d| files(d)) {
        let data = match fs::read(&path) {
            Ok(data) => data,
            // A running fuzzer replaces corpus files as it reduces them.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        if panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.display().to_string());
        }
        count += 1;
    }
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:#?}");
    count
}

#[test]
fn every_committed_input_passes_its_checks() {
    for (target, check) in checks::TARGETS {
        let count = replay(target, check);
        println!("{target}: {count} inputs replayed");
        assert!(count > 0, "{target}: no seed or regression input found");
    }
}
