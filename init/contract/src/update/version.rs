//! Image versions: dot-separated whole numbers (`1`, `1.2`, `2024.12.3`),
//! compared number by number, so `1.2.10` is newer than `1.2.9`. A missing
//! trailing number counts as 0 (`1.2` and `1.2.0` are the same version).

use std::cmp::Ordering;
use std::fmt;

#[derive(Debug, Clone)]
pub struct Version {
    text: String,
    parts: Vec<u64>,
}

impl Version {
    /// Parses a version, or says why it is not one.
    pub fn parse(s: &str) -> Result<Version, String> {
        let bad = |why: &str| format!("`{s}` is not a version: {why}; write dot-separated whole numbers such as 1.4.2");
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > 64 {
            return Err(bad("it is longer than 64 characters"));
        }
        let parts = s
            .split('.')
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    Err(bad(&format!("`{p}` is not a whole number")))
                } else {
                    p.parse::<u64>().map_err(|_| bad(&format!("`{p}` is too large")))
                }
            })
            .collect::<Result<Vec<u64>, String>>()?;
        Ok(Version { text: s.to_string(), parts })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn significant(&self) -> &[u64] {
        let keep = self.parts.iter().rposition(|&n| n != 0).map_or(0, |i| i + 1);
        &self.parts[..keep]
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.significant().cmp(other.significant())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn compares_numbers_not_text() {
        assert!(v("1.2.10") > v("1.2.9"));
        assert!(v("1.10") > v("1.9.9"));
        assert!(v("2") > v("1.99"));
        assert!(v("1.2") < v("1.2.1"));
        assert_eq!(v("1.2"), v("1.2.0"));
        assert_eq!(v("1.02"), v("1.2"));
        assert_eq!(v("0"), v("0.0"));
        assert_eq!(v("1.2.10").to_string(), "1.2.10");
    }

    #[test]
    fn refuses_what_is_not_a_version() {
        for bad in ["", "v1.2", "1..2", "1.2.", ".1", "1.2-rc1", "1 .2", "99999999999999999999999", "1.x"] {
            let e = Version::parse(bad).unwrap_err();
            assert!(e.contains("is not a version") && e.contains("1.4.2"), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn order_matches_the_numbers(a in proptest::collection::vec(0u64..1000, 1..5), b in proptest::collection::vec(0u64..1000, 1..5)) {
            let s = |p: &[u64]| p.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
            let mut pa = a.clone();
            let mut pb = b.clone();
            let n = pa.len().max(pb.len());
            pa.resize(n, 0);
            pb.resize(n, 0);
            prop_assert_eq!(v(&s(&a)).cmp(&v(&s(&b))), pa.cmp(&pb));
        }

        #[test]
        fn any_text_never_panics(s in "\\PC{0,30}") {
            let _ = Version::parse(&s);
        }
    }
}
