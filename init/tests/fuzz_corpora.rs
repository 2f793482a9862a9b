//! Replays the committed fuzz corpora (init/fuzz/corpus/<target>/) through
//! the same harnesses cargo-fuzz runs (kiln_init::fuzzing), on stable: every
//! input that once found new coverage, or a crash, runs on each
//! `cargo test`. A target whose corpus is missing or empty fails.
#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_init::fuzzing::TARGETS;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn replay(target: &str, run: fn(&[u8])) {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("the corpus of fuzz target `{target}` ({}): {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus of fuzz target `{target}` ({}) is empty; seed it (init/fuzz/README.md)", dir.display());
    let t0 = Instant::now();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "fuzz target `{target}` panics on {}", f.display());
    }
    eprintln!("{target}: {} inputs in {:.2} s", files.len(), t0.elapsed().as_secs_f64());
}

#[test]
fn every_target_has_a_corpus_dir_and_a_harness() {
    let dirs: Vec<String> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let targets: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
    for d in &dirs {
        assert!(targets.contains(&d.as_str()), "init/fuzz/corpus/{d} has no harness in kiln_init::fuzzing::TARGETS");
    }
    for t in &targets {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets").join(format!("{t}.rs"));
        assert!(target.is_file(), "{} is missing", target.display());
    }
}

#[test]
fn bundle() {
    replay("bundle", kiln_init::fuzzing::bundle);
}

#[test]
fn dhcp() {
    replay("dhcp", kiln_init::fuzzing::dhcp);
}

#[test]
fn gpt_mbr() {
    replay("gpt_mbr", kiln_init::fuzzing::gpt_mbr);
}

#[test]
fn http() {
    replay("http", kiln_init::fuzzing::http);
}

#[test]
fn index_yaml() {
    replay("index_yaml", kiln_init::fuzzing::index_yaml);
}

#[test]
fn minisign() {
    replay("minisign", kiln_init::fuzzing::minisign);
}

#[test]
fn node_toml() {
    replay("node_toml", kiln_init::fuzzing::node_toml);
}

#[test]
fn sntp() {
    replay("sntp", kiln_init::fuzzing::sntp);
}

#[test]
fn tls() {
    replay("tls", kiln_init::fuzzing::tls);
}
