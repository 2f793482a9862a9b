//! Stable console events: `kiln-init: <event> key=value…`.
//!
//! Tests and users' scripts grep these lines, so event names and keys are an
//! interface. Values with spaces or quotes are quoted.

use std::fmt::Write as _;

/// The prefix of every event line.
pub const PREFIX: &str = "kiln-init:";

/// Formats one event line (without the trailing newline).
pub fn format(event: &str, fields: &[(&str, &dyn std::fmt::Display)]) -> String {
    let mut line = format!("{PREFIX} {event}");
    for (k, v) in fields {
        let v = v.to_string();
        let _ = write!(line, " {k}={}", quote(&v));
    }
    line
}

fn quote(v: &str) -> String {
    if !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\') {
        return v.to_string();
    }
    let mut q = String::with_capacity(v.len() + 2);
    q.push('"');
    for c in v.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// A parsed event line, as read back from a console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub fields: Vec<(String, String)>,
}

impl Event {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses an event out of a console line; the prefix may appear after other
/// text on the line (kernel timestamps, interleaved output).
pub fn parse(line: &str) -> Option<Event> {
    let at = line.find(PREFIX)?;
    let rest = line[at + PREFIX.len()..].trim_start();
    let mut chars = rest.chars().peekable();
    let mut name = String::new();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            break;
        }
        name.push(c);
        chars.next();
    }
    if name.is_empty() {
        return None;
    }
    let mut fields = Vec::new();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => val.push('\n'),
                            Some(c) => val.push(c),
                            None => break,
                        },
                        c => val.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    val.push(c);
                    chars.next();
                }
            }
        }
        fields.push((key, val));
    }
    Some(Event { name, fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let line = format("network-up", &[("iface", &"eth0"), ("addr", &"10.0.2.15/24"), ("why", &"a \"b\" c")]);
        assert_eq!(line, r#"kiln-init: network-up iface=eth0 addr=10.0.2.15/24 why="a \"b\" c""#);
        let ev = parse(&format!("[    1.23] {line}")).unwrap();
        assert_eq!(ev.name, "network-up");
        assert_eq!(ev.get("addr"), Some("10.0.2.15/24"));
        assert_eq!(ev.get("why"), Some("a \"b\" c"));
    }

    #[test]
    fn not_an_event() {
        assert!(parse("stand-in: check hostname ok").is_none());
        assert!(parse("kiln-init: ").is_none());
    }
}
