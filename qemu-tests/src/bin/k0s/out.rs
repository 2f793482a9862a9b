//! Output: one flushed line per event, because stdout is a pipe to kiln-init
//! and tests grep the log. Write errors are ignored: a closed pipe must not
//! turn into a panic.

use std::io::Write;

/// Escapes control characters so that one call is always one line.
pub fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// Prints `stand-in: <msg>` on stdout.
pub fn say(msg: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "stand-in: {}", one_line(msg));
    let _ = o.flush();
}

/// Prints text as is on stdout (help and version).
pub fn raw(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

pub fn err(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{}", one_line(line));
    let _ = e.flush();
}

/// Counts the checks and prints one line for each.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: u32,
    pub failed: u32,
}

impl Report {
    pub fn check<T>(&mut self, name: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => {
                self.ok += 1;
                say(&format!("check {name} ok"));
                Some(v)
            }
            Err(why) => {
                self.failed += 1;
                say(&format!("check {name} FAIL {why}"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_escapes_controls() {
        assert_eq!(one_line("a\nb\tc\u{7}é"), "a\\nb\\tc\\x07é");
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn report_counts() {
        let mut r = Report::default();
        assert_eq!(r.check("a", Ok(3)), Some(3));
        assert_eq!(r.check::<()>("b", Err("why".into())), None);
        assert_eq!((r.ok, r.failed), (1, 1));
    }
}
