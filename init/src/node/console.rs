//! Console output: events, errors and payload lines, to the console and to
//! /dev/kmsg.

use kiln_contract::event;
use std::io::Write;
use std::sync::Mutex;

static KMSG: Mutex<Option<std::fs::File>> = Mutex::new(None);

pub fn open_kmsg() {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        if let Ok(mut k) = KMSG.lock() {
            *k = Some(f);
        }
    }
}

/// Writes a line to the console (stdout) and, at info level, to the kernel
/// log (kept off the console by the loglevel set at start).
pub fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
    if let Ok(mut k) = KMSG.lock() {
        if let Some(f) = k.as_mut() {
            let _ = f.write_all(format!("<6>{}\n", s.trim_end()).as_bytes());
        }
    }
}

/// Emits a stable event line: `kiln-init: <name> k=v…`.
pub fn event(name: &str, fields: &[(&str, &dyn std::fmt::Display)]) {
    line(&event::format(name, fields));
}

/// A human message, prefixed like events but never parsed as one by tests
/// (the name is `info`, `warning` or `error`).
pub fn info(msg: &str) {
    for l in msg.lines() {
        line(&format!("kiln-init: info {l}"));
    }
}

pub fn warn(msg: &str) {
    for l in msg.lines() {
        line(&format!("kiln-init: warning {l}"));
    }
}

pub fn error(msg: &str) {
    for l in msg.lines() {
        line(&format!("kiln-init: error {l}"));
    }
}
