//! What a build is doing and where its time went: each step of the pipeline
//! runs as a named [`Steps::run`], timed; a step that takes more than a few
//! seconds says so on stderr every few seconds, with how far it is when it
//! can count (bytes compressed, files compiled). `kiln build` prints the
//! times at the end, one line per step; `kiln bench` prints them as its
//! breakdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How far a running step is: `done` of `total` (0: unknown) `unit`s.
#[derive(Debug, Default)]
pub struct Counter {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Counter {
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
}

/// What a counter counts, for the progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Files,
}

/// One step's time.
#[derive(Debug, Clone)]
pub struct Timing {
    pub step: String,
    pub seconds: f64,
}

/// The steps of one build, in the order they ran.
#[derive(Debug, Clone, Default)]
pub struct Steps {
    done: Arc<Mutex<Vec<Timing>>>,
    /// Print progress lines (off in tests and benchmarks' inner runs).
    quiet: bool,
    /// Compress every block, as if the cache held no packed files (the
    /// benchmark's cold runs).
    no_reuse: bool,
}

/// Seconds before a running step first says where it is, then between lines.
const FIRST: Duration = Duration::from_secs(3);
const EVERY: Duration = Duration::from_secs(5);

impl Steps {
    pub fn new(quiet: bool) -> Steps {
        Steps { done: Arc::default(), quiet, no_reuse: false }
    }

    /// Steps of a build that compresses everything afresh.
    pub fn without_reuse(mut self) -> Steps {
        self.no_reuse = true;
        self
    }

    /// Whether the build may take packed files from the cache.
    pub fn reuse_packed(&self) -> bool {
        !self.no_reuse
    }

    /// Runs `f` as the step `name`, timed. `f` gets a counter it may fill in
    /// (with `unit`) so progress lines say how far it is.
    pub fn run<T>(&self, name: &str, unit: Unit, f: impl FnOnce(&Counter) -> T) -> T {
        let step = self.start(name, unit);
        f(&step.counter)
    }

    /// Starts the step `name`; it ends, timed, when the returned guard is
    /// dropped (an error leaving the pipeline early ends it too).
    pub fn start(&self, name: &str, unit: Unit) -> Step {
        let counter = Arc::new(Counter::default());
        let stop = Arc::new(AtomicBool::new(false));
        let t = Instant::now();
        let ticker = (!self.quiet).then(|| {
            let (counter, stop, name) = (counter.clone(), stop.clone(), name.to_string());
            std::thread::spawn(move || {
                let mut next = FIRST;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_millis(200));
                    if !stop.load(Ordering::Relaxed) && t.elapsed() >= next {
                        eprintln!("kiln: {name}: {} ({})", describe(&counter, unit), clock(t.elapsed()));
                        next += EVERY;
                    }
                }
            })
        });
        Step { name: name.to_string(), counter, stop, ticker, t, done: self.done.clone() }
    }

    /// The steps so far; a step run twice (one per output) is summed.
    pub fn timings(&self) -> Vec<Timing> {
        let mut out: Vec<Timing> = Vec::new();
        for t in self.done.lock().map(|d| d.clone()).unwrap_or_default() {
            match out.iter_mut().find(|o| o.step == t.step) {
                Some(o) => o.seconds += t.seconds,
                None => out.push(t),
            }
        }
        out
    }
}

/// A running step; see [`Steps::start`].
pub struct Step {
    name: String,
    pub counter: Arc<Counter>,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
    t: Instant,
    done: Arc<Mutex<Vec<Timing>>>,
}

impl Drop for Step {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.ticker.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        if let Ok(mut d) = self.done.lock() {
            d.push(Timing { step: std::mem::take(&mut self.name), seconds: self.t.elapsed().as_secs_f64() });
        }
    }
}

fn describe(c: &Counter, unit: Unit) -> String {
    let (done, total) = (c.done.load(Ordering::Relaxed), c.total.load(Ordering::Relaxed));
    match (unit, total) {
        (_, 0) if done == 0 => "working".into(),
        (Unit::Bytes, 0) => format!("{} MB", done / 1_000_000),
        (Unit::Bytes, t) => format!("{} of {} MB, {}%", done / 1_000_000, t / 1_000_000, done * 100 / t),
        (Unit::Files, 0) => format!("{done} files"),
        (Unit::Files, t) => format!("{done} of about {t} files, {}%", (done * 100 / t).min(99)),
    }
}

/// `1m05s`, or `12s`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_timed_in_order_and_repeats_summed() {
        let s = Steps::new(true);
        s.run("squashfs", Unit::Bytes, |c| c.add(5));
        s.run("qcow2", Unit::Bytes, |_| ());
        s.run("squashfs", Unit::Bytes, |_| ());
        let t = s.timings();
        assert_eq!(t.iter().map(|t| t.step.as_str()).collect::<Vec<_>>(), ["squashfs", "qcow2"]);
        assert!(t.iter().all(|t| t.seconds >= 0.0));
    }

    #[test]
    fn progress_lines_say_how_far() {
        let c = Counter::default();
        assert_eq!(describe(&c, Unit::Bytes), "working");
        c.add(120_000_000);
        assert_eq!(describe(&c, Unit::Bytes), "120 MB");
        c.set_total(240_000_000);
        assert_eq!(describe(&c, Unit::Bytes), "120 of 240 MB, 50%");
        let f = Counter::default();
        f.add(300);
        assert_eq!(describe(&f, Unit::Files), "300 files");
        f.set_total(200);
        assert_eq!(describe(&f, Unit::Files), "300 of about 200 files, 99%");
        assert_eq!(clock(Duration::from_secs(65)), "1m05s");
        assert_eq!(clock(Duration::from_secs(9)), "9s");
    }
}
