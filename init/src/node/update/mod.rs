//! A/B updates on the node: boot assessment, rollback reports, and taking
//! update bundles from a local drop or a channel. Writing a bundle to the
//! other slot is [`apply`]; the channel's index is [`channel`]; a u-boot
//! card's state file is [`uboot`]. The bundle format and its checks are
//! `kiln_contract::update`.
//!
//! **Boot assessment.** A boot entry with a counter (`kiln-<profile>-<x>+N…`,
//! BLS boot counting) is an image on trial. systemd-boot takes a try each
//! time it boots one (`+2-1`, `+1-2`, …) and, once none are left (`+0-N`),
//! sorts it after every other entry, so the firmware's next boot is the
//! previous image. Nothing here is needed for that fallback: a node that
//! hangs, panics or loses power on a trial boot spends a try whatever
//! kiln-init does. kiln-init only:
//! - marks the running entry good (removes its counter) once the payload
//!   has run `update.health_seconds` without exiting;
//! - reboots a trial boot that has not become good within
//!   `update.boot_timeout_seconds`, or whose kiln-init panicked, so the try
//!   is spent now rather than at the next power cycle (only when there is
//!   an image to fall back to);
//! - after a fallback, reports `rolled-back from=<failed> to=<running>`,
//!   removes the failed entry and remembers its root hash, so the same
//!   bundle is not applied again.
//!
//! **u-boot boards** (armv7 MBR cards) have no boot entries with counters:
//! `/boot.scr` keeps the trial and its tries in `/boot/kiln/state`
//! ([`crate::node::update::uboot`]), takes a try each boot and boots the good slot
//! once they are spent. kiln-init reads the same file: the running slot on
//! trial is a trial boot; the running slot good with a spent trial of the
//! other slot is a fallback (reported, and the trial cleared). Marking good
//! writes `kiln_good=<running>` with no trial.
//!
//! **Bundles** come from `/var/lib/kiln/update/*.kiln` (consumed), from the
//! root of a volume labelled `KILNUPD` (read-only, looked at once per boot
//! and whenever it appears), or from the channel in node.toml, in its
//! window. Only a node whose running image is good takes one: a trial
//! image's fallback slot is never overwritten. Applying runs in a thread,
//! so k0s keeps being supervised; a node reboots into the new image when
//! the apply is done (in `update.window` when one is set).

pub mod apply;
pub mod channel;
pub mod uboot;

use kiln_contract::digest::unhex32;
use super::{console, install, sys, volume};
use kiln_contract::config;
use kiln_contract::minisign::PublicKey;
use apply::{Applied, ApplyError, Slot, Target};
use uboot::State;
use crate::cmdline::{self, MbrRoot};
use channel::Offer;
use kiln_contract::update::{self, BundleReader, Policy};
use std::collections::BTreeSet;
use std::io::Read;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// State kept across boots, and the local drop directory.
pub const STATE_DIR: &str = "/var/lib/kiln/update";
/// The label of a volume carrying bundles.
pub const DROP_LABEL: &str = "KILNUPD";
const ESP: &str = "/boot";
const PENDING: &str = "pending";
const FAILED: &str = "failed";
const DROP_MOUNT: &str = "/run/kiln/kilnupd";
const SCAN_EVERY: Duration = Duration::from_secs(30);
/// How often the channel is polled while the window is open.
const POLL_EVERY: Duration = Duration::from_secs(600);
/// Longest sleep before the window's opening is checked again (the clock may
/// have been set meanwhile).
const WINDOW_RECHECK: i64 = 600;

/// A boot entry of one slot on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub slot: Slot,
    /// Tries left; None when the entry has no counter (a good image).
    pub left: Option<u32>,
    /// Tries spent.
    pub done: u32,
}

impl Entry {
    /// The name without its counter: `kiln-<profile>-<x>.efi`.
    pub fn good_name(&self) -> String {
        match self.name.find('+') {
            Some(i) => format!("{}.efi", &self.name[..i]),
            None => self.name.clone(),
        }
    }

    fn spent(&self) -> bool {
        self.left == Some(0)
    }
}

/// Parses `kiln-<profile>-<x>[+L[-D]].efi`.
pub fn parse_entry(name: &str, profile: &str) -> Option<Entry> {
    let slot = [Slot::A, Slot::B].into_iter().find(|s| apply::is_slot_entry(name, profile, *s))?;
    let stem = format!("kiln-{profile}-{slot}").len();
    let rest = &name[stem..name.len() - ".efi".len()];
    let (left, done) = match rest.strip_prefix('+') {
        None => (None, 0),
        Some(c) => {
            let mut it = c.splitn(2, '-');
            (it.next().and_then(|x| x.parse().ok()), it.next().and_then(|x| x.parse().ok()).unwrap_or(0))
        }
    };
    Some(Entry { name: name.to_string(), slot, left, done })
}

/// The kiln boot entries of `profile` in `<esp>/EFI/Linux`.
pub fn entries(esp: &Path, profile: &str) -> Vec<Entry> {
    let mut out: Vec<Entry> = fs::read_dir(esp.join(apply::ENTRY_DIR))
        .map(|rd| rd.flatten().filter_map(|e| parse_entry(&e.file_name().to_string_lossy(), profile)).collect())
        .unwrap_or_default();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// What the running boot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessed {
    /// The running slot's entry has no counter.
    Good,
    /// The running slot's entry has a counter. `fallback`: the other slot
    /// has an entry with tries left to boot instead.
    Trial { entry: Entry, fallback: bool },
    /// No rollback here (PXE, an ISO, no entry for the running slot).
    Unmanaged(String),
}

/// What `/boot/kiln/state` on a u-boot card says about a boot of `running`
/// (as [`assess`] for boot entries). `tries`: what a trial started with, for
/// the report.
pub fn assess_uboot(state: Option<State>, running: Slot, tries: u32) -> (Assessed, Option<Entry>) {
    let Some(s) = state else { return (Assessed::Unmanaged(format!("the boot partition has no readable /{}", uboot::STATE)), None) };
    let entry = |t: Slot, n: u32| Entry { name: format!("/{}", uboot::slot_dir(t)), slot: t, left: Some(n), done: tries.saturating_sub(n) };
    match s.trial {
        Some((t, n)) if t == running => (Assessed::Trial { entry: entry(t, n), fallback: s.good != running }, None),
        _ if s.good == running => (Assessed::Good, s.trial.filter(|(_, n)| *n == 0).map(|(t, n)| entry(t, n))),
        _ => (Assessed::Unmanaged(format!("slot {running} booted, but /{} says slot {} is the good one and slot {running} is not on trial", uboot::STATE, s.good)), None),
    }
}

/// What the boot entries say about a boot of `running`; and the other
/// slot's entry when its tries are spent (a fallback happened).
pub fn assess(entries: &[Entry], running: Slot) -> (Assessed, Option<Entry>) {
    let own = entries.iter().find(|e| e.slot == running);
    let other = entries.iter().find(|e| e.slot == running.other());
    let failed = other.filter(|o| o.spent()).cloned();
    let a = match own {
        None => Assessed::Unmanaged(format!("the ESP has no boot entry for slot {running}")),
        Some(e) if e.left.is_none() => Assessed::Good,
        Some(e) => Assessed::Trial { entry: e.clone(), fallback: other.is_some_and(|o| !o.spent()) },
    };
    (a, failed)
}

/// What was being applied (written before the apply, read after a fallback).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pending {
    pub slot: String,
    pub version: String,
    pub from: String,
    pub roothash: String,
}

impl Pending {
    pub fn to_text(&self) -> String {
        format!("slot={}\nversion={}\nfrom={}\nroothash={}\n", self.slot, self.version, self.from, self.roothash)
    }

    pub fn parse(text: &str) -> Pending {
        let mut p = Pending::default();
        for l in text.lines() {
            match l.split_once('=') {
                Some(("slot", v)) => p.slot = v.into(),
                Some(("version", v)) => p.version = v.into(),
                Some(("from", v)) => p.from = v.into(),
                Some(("roothash", v)) => p.roothash = v.into(),
                _ => {}
            }
        }
        p
    }
}

/// The running node, as updates need it.
#[derive(Debug, Clone)]
struct Node {
    disk: PathBuf,
    slot: Slot,
    roothash: [u8; 32],
    profile: String,
    version: Option<String>,
    /// An MBR card booted by u-boot (`kiln.mbr=`); None: a GPT disk with
    /// BLS boot entries.
    mbr: Option<MbrRoot>,
}

impl Node {
    /// This boot's assessment (see [`assess`] and [`assess_uboot`]).
    fn assess(&self, tries: u32) -> (Assessed, Option<Entry>) {
        let esp = Path::new(ESP);
        match self.mbr {
            None => assess(&entries(esp, &self.profile), self.slot),
            Some(_) => match uboot::read_state(esp) {
                Ok(s) => assess_uboot(s, self.slot, tries),
                Err(e) => (Assessed::Unmanaged(format!("reading /boot/{}: {e}", uboot::STATE)), None),
            },
        }
    }
}


fn os_release_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?.trim();
        Some(v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)).filter(|v| !v.is_empty())
    })
}

fn this_node() -> Result<Node, String> {
    let m = install::read_medium()?;
    if m.kind != "disk" {
        return Err(format!("the node booted from {} (not an installed disk with A/B slots)", m.kind));
    }
    let disk = PathBuf::from(m.device.ok_or("stage 1 did not say which disk the root is on")?);
    let cmdline = sys::read("/proc/cmdline").map_err(|e| e.to_string())?;
    let c = cmdline::parse_cmdline(&cmdline)?;
    let roothash = c.roothash;
    let slot = match c.mbr {
        Some(m) => apply::mbr_slot(m.partition).ok_or_else(|| format!("kiln.mbr= names partition {}, which is not a root slot (2 or 3)", m.partition))?,
        None => apply::running_slot(&disk, &roothash).map_err(|e| e.to_string())?,
    };
    let os = sys::read("/etc/os-release").unwrap_or_default();
    let profile = os_release_value(&os, "IMAGE_ID").ok_or("/etc/os-release has no IMAGE_ID (the profile name)")?.to_string();
    let version = update::running_version(&os).map(str::to_string);
    Ok(Node { disk, slot, roothash, profile, version, mbr: c.mbr })
}

fn state(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

fn failed_hashes() -> Vec<String> {
    fs::read_to_string(state(FAILED)).unwrap_or_default().lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

fn write_state(name: &str, text: &str) -> Result<(), String> {
    fs::create_dir_all(STATE_DIR).map_err(|e| format!("creating {STATE_DIR}: {e}"))?;
    let tmp = state(&format!(".{name}.tmp"));
    let path = state(name);
    fs::write(&tmp, text).and_then(|()| File::open(&tmp)?.sync_all()).and_then(|()| fs::rename(&tmp, &path)).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A trial boot with an image to fall back to, as (slot, version, entry):
/// a kiln-init that cannot go on should then reboot rather than park.
pub fn trial_with_fallback() -> Option<(Slot, String, Entry)> {
    let n = this_node().ok()?;
    match n.assess(0).0 {
        Assessed::Trial { entry, fallback: true } => Some((n.slot, n.version.unwrap_or_else(|| "unknown".into()), entry)),
        _ => None,
    }
}

/// As [`trial_with_fallback`], in stage 1, which has no root (so no
/// /etc/os-release): the boot partition is mounted at `esp`; `card`: a
/// u-boot card (`/kiln/state`), else the ESP's boot entries, whose profile is
/// read off the running slot's entry name.
pub fn trial_in(esp: &Path, slot: Slot, card: bool) -> Option<Entry> {
    let assessed = if card {
        assess_uboot(uboot::read_state(esp).ok()?, slot, 0).0
    } else {
        let names: Vec<String> = fs::read_dir(esp.join(apply::ENTRY_DIR)).ok()?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        let mut profiles: Vec<&str> = names.iter().filter_map(|n| entry_profile(n, slot)).collect();
        profiles.sort_unstable();
        profiles.dedup();
        let [profile] = profiles[..] else { return None };
        assess(&entries(esp, profile), slot).0
    };
    match assessed {
        Assessed::Trial { entry, fallback: true } => Some(entry),
        _ => None,
    }
}

/// The profile in `kiln-<profile>-<slot>[+L[-D]].efi`.
fn entry_profile(name: &str, slot: Slot) -> Option<&str> {
    let stem = name.strip_prefix("kiln-")?.strip_suffix(".efi")?;
    let stem = stem.split_once('+').map_or(stem, |(s, _)| s);
    stem.strip_suffix(slot.letter())?.strip_suffix('-').filter(|p| !p.is_empty())
}

/// What a finished apply job found.
enum JobEnd {
    Applied(Applied),
    Nothing,
    /// A channel's offer that was refused (not fetched again this boot).
    Refused(String),
}

/// Where a bundle is read from.
#[derive(Debug, Clone)]
enum Origin {
    /// A file; `consume`: remove (or mark) it once handled (the /var drop).
    File { path: PathBuf, consume: bool },
    /// A channel's offer, streamed over HTTP.
    Channel(Offer),
}

/// A bundle found in a drop or offered by the channel.
#[derive(Debug, Clone)]
struct Found {
    /// For events: `/var/lib/kiln/update/x.kiln`, `KILNUPD:/dev/vdb:x.kiln`
    /// or the bundle's URL.
    source: String,
    origin: Origin,
}

impl Found {
    fn file(source: String, path: PathBuf, consume: bool) -> Found {
        Found { source, origin: Origin::File { path, consume } }
    }

    fn consumed(&self) -> Option<&Path> {
        match &self.origin {
            Origin::File { path, consume: true } => Some(path),
            _ => None,
        }
    }
}

struct Trial {
    entry: Entry,
    fallback: bool,
    deadline: Instant,
    told_no_fallback: bool,
}

/// Boot assessment and update sources, driven by the main loop.
pub struct Updates {
    cfg: config::Update,
    node: Option<Node>,
    trial: Option<Trial>,
    next_scan: Option<Instant>,
    seen: BTreeSet<String>,
    job: Option<JoinHandle<JobEnd>>,
    /// Applied; waiting for the window to reboot.
    reboot_pending: Option<Applied>,
    keys: Vec<PublicKey>,
    /// When the channel is next polled (or the window next checked).
    next_poll: Option<Instant>,
    /// Whether the last look found the window open (events on change only).
    window_open: Option<bool>,
    /// Channel versions refused this boot.
    refused: BTreeSet<String>,
}

impl Updates {
    /// Assesses this boot (events: `rolled-back`, `boot-trial`), and
    /// schedules the first look for bundles.
    pub fn start(cfg: &config::Update) -> Updates {
        let mut u = Updates {
            cfg: cfg.clone(),
            node: None,
            trial: None,
            next_scan: None,
            seen: BTreeSet::new(),
            job: None,
            reboot_pending: None,
            keys: Vec::new(),
            next_poll: None,
            window_open: None,
            refused: BTreeSet::new(),
        };
        let node = match this_node() {
            Ok(n) => n,
            Err(e) => {
                console::info(&format!("updates: not managed here: {e}"));
                return u;
            }
        };
        let (assessed, failed) = node.assess(cfg.tries);
        if let Some(f) = failed {
            report_rollback(&node, &f);
        }
        let running_version = node.version.clone().unwrap_or_else(|| "unknown".into());
        match assessed {
            Assessed::Unmanaged(why) => {
                console::info(&format!("updates: no boot assessment: {why}"));
                return u;
            }
            Assessed::Good => {}
            Assessed::Trial { entry, fallback } => {
                console::event(
                    "boot-trial",
                    &[("slot", &node.slot), ("version", &running_version), ("entry", &entry.name), ("tries_left", &entry.left.unwrap_or(0)), ("health_seconds", &cfg.health_seconds), ("fallback", &if fallback { "yes" } else { "no" })],
                );
                u.trial = Some(Trial { entry, fallback, deadline: Instant::now() + Duration::from_secs(cfg.boot_timeout_seconds.into()), told_no_fallback: false });
            }
        }
        match sys::read(update::KEY_PATH).map_err(|e| e.to_string()).and_then(|t| PublicKey::from_file(&t).map_err(|e| e.to_string())) {
            Ok(k) => u.keys = vec![k],
            Err(e) => {
                console::info(&format!("updates: this image takes no update bundles ({}: {e}); build it with a signing key to update it in place", update::KEY_PATH));
                u.node = Some(node);
                return u;
            }
        }
        u.node = Some(node);
        u.next_scan = Some(Instant::now());
        if cfg.server.is_some() {
            u.next_poll = Some(Instant::now());
        }
        u
    }

    /// When `tick` next has something to do.
    pub fn next_deadline(&self, payload_since: Option<Instant>) -> Option<Instant> {
        let mut d: Vec<Instant> = Vec::new();
        if let Some(t) = &self.trial {
            d.push(t.deadline);
            if let Some(s) = payload_since {
                d.push(s + Duration::from_secs(self.cfg.health_seconds.into()));
            }
        } else {
            d.extend(self.next_scan);
            d.extend(self.next_poll);
        }
        if self.job.is_some() {
            d.push(Instant::now() + Duration::from_secs(1));
        }
        if self.reboot_pending.is_some() {
            d.push(Instant::now() + Duration::from_secs(30));
        }
        d.into_iter().min()
    }

    /// Marks a trial boot good, gives up on one, starts and collects apply
    /// jobs. Some(reason) asks the caller to stop k0s and reboot.
    pub fn tick(&mut self, payload_since: Option<Instant>) -> Option<&'static str> {
        let now = Instant::now();
        if let Some(t) = &mut self.trial {
            if payload_since.is_some_and(|s| now.saturating_duration_since(s) >= Duration::from_secs(self.cfg.health_seconds.into())) {
                let entry = t.entry.clone();
                self.trial = None;
                self.mark_good(&entry);
                self.next_scan = Some(now);
            } else if now >= t.deadline {
                if t.fallback {
                    let n = self.node.as_ref();
                    console::event(
                        "boot-unhealthy",
                        &[("slot", &n.map(|n| n.slot.letter()).unwrap_or("?")), ("seconds", &self.cfg.boot_timeout_seconds), ("tries_left", &t.entry.left.unwrap_or(0)), ("action", &"reboot")],
                    );
                    console::warn(&format!("the payload did not run healthy for {} s within {} s of boot: rebooting to spend a try (the previous image boots when they are spent)", self.cfg.health_seconds, self.cfg.boot_timeout_seconds));
                    return Some("boot-unhealthy");
                }
                if !t.told_no_fallback {
                    t.told_no_fallback = true;
                    console::warn("the payload is not healthy yet, but there is no previous image to fall back to: staying up");
                }
            }
            return None;
        }
        if let Some(j) = self.job.take_if(|j| j.is_finished()) {
            match j.join() {
                Ok(JobEnd::Applied(a)) => self.reboot_pending = Some(a),
                Ok(JobEnd::Refused(v)) => {
                    self.refused.insert(v);
                }
                _ => {}
            }
            let _ = sys::umount(DROP_MOUNT, libc::MNT_DETACH);
        }
        if let Some(a) = &self.reboot_pending {
            match &self.cfg.window {
                Some(w) if !w.contains(unix_now()) => {}
                _ => {
                    console::info(&format!("rebooting into {} (slot {})", a.version, a.slot));
                    return Some("update-applied");
                }
            }
            return None;
        }
        if self.job.is_none() && self.next_scan.is_some_and(|t| t <= now) {
            self.next_scan = Some(now + SCAN_EVERY);
            let found = self.scan();
            if found.is_empty() {
                let _ = sys::umount(DROP_MOUNT, libc::MNT_DETACH);
            } else {
                self.start_job(found);
            }
        }
        if self.job.is_none() && self.next_poll.is_some_and(|t| t <= now) {
            self.poll(now);
        }
        None
    }

    /// In the window: polls the channel (in the apply thread). Outside:
    /// says when it opens, once, and sleeps until then.
    fn poll(&mut self, now: Instant) {
        let (Some(server), Some(ch), Some(w)) = (self.cfg.server.clone(), self.cfg.channel.clone(), self.cfg.window.clone()) else {
            self.next_poll = None;
            return;
        };
        let unix = unix_now();
        let wait = w.seconds_until(unix);
        if wait > 0 {
            if self.window_open != Some(false) {
                self.window_open = Some(false);
                console::event("update-window", &[("state", &"closed"), ("opens_in", &wait), ("start", &w.start), ("time", &unix)]);
            }
            self.next_poll = Some(now + Duration::from_secs(wait.clamp(1, WINDOW_RECHECK) as u64));
            return;
        }
        if self.window_open != Some(true) {
            self.window_open = Some(true);
            console::event("update-window", &[("state", &"open"), ("start", &w.start), ("length_minutes", &w.length_minutes), ("time", &unix)]);
        }
        self.next_poll = Some(now + POLL_EVERY);
        let Some(node) = self.node.clone() else { return };
        let refused = self.refused.clone();
        self.spawn(move |node: &Node| match check_channel(node, &server, &ch, &refused) {
            Some(f) => vec![f],
            None => Vec::new(),
        }, node);
    }

    fn mark_good(&self, e: &Entry) {
        let Some(n) = &self.node else { return };
        // A power cut after the rename (or the state's one-sector write)
        // leaves it good; before, the next boot is a trial again.
        let (good, r) = match n.mbr {
            None => {
                let dir = Path::new(ESP).join(apply::ENTRY_DIR);
                let good = e.good_name();
                let r = sys::rename_synced(&dir.join(&e.name), &dir.join(&good));
                (good, r)
            }
            Some(_) => (e.name.clone(), uboot::write_state(Path::new(ESP), &State { good: n.slot, trial: None })),
        };
        let version = n.version.clone().unwrap_or_else(|| "unknown".into());
        match r {
            Ok(()) => {
                let _ = fs::remove_file(state(PENDING));
                console::event("boot-good", &[("slot", &n.slot), ("version", &version), ("entry", &good), ("uptime", &format!("{:.1}", sys::uptime()))]);
            }
            Err(err) if n.mbr.is_some() => console::error(&format!("marking the boot good: writing /boot/{}: {err}; the next boot is a trial again", uboot::STATE)),
            Err(err) => console::error(&format!("marking the boot good: renaming {} to {good} on the ESP: {err}; the next boot is a trial again", e.name)),
        }
    }

    /// Bundles not looked at yet this boot.
    fn scan(&mut self) -> Vec<Found> {
        let mut found = Vec::new();
        if let Ok(rd) = fs::read_dir(STATE_DIR) {
            let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "kiln")).collect();
            names.sort();
            for p in names {
                found.push(Found::file(p.display().to_string(), p, true));
            }
        }
        if let Some((dev, fs_)) = volume::labelled(DROP_LABEL).into_iter().next() {
            if !self.seen.contains(&format!("volume {dev}")) {
                self.seen.insert(format!("volume {dev}"));
                let _ = sys::mkdir_p(DROP_MOUNT);
                let _ = sys::umount(DROP_MOUNT, libc::MNT_DETACH);
                match sys::mount(&dev, DROP_MOUNT, fs_.mount_type(), libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None) {
                    Ok(()) => {
                        let mut names: Vec<PathBuf> = fs::read_dir(DROP_MOUNT)
                            .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("kiln"))).collect())
                            .unwrap_or_default();
                        names.sort();
                        if names.is_empty() {
                            console::warn(&format!("{DROP_LABEL} volume {dev} has no *.kiln file at its root"));
                        }
                        for p in names {
                            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                            found.push(Found::file(format!("{DROP_LABEL}:{dev}:{name}"), p, false));
                        }
                    }
                    Err(e) => console::warn(&format!("{DROP_LABEL} volume {dev}: mounting it read-only: {e}")),
                }
            }
        } else {
            self.seen.retain(|s| !s.starts_with("volume "));
        }
        found.retain(|f| {
            let Origin::File { path, .. } = &f.origin else { return true };
            let key = fs::metadata(path).map(|m| format!("{} {} {:?}", f.source, m.len(), m.modified().ok())).unwrap_or_default();
            self.seen.insert(key)
        });
        found
    }

    fn start_job(&mut self, found: Vec<Found>) {
        let Some(node) = self.node.clone() else { return };
        self.spawn(move |_: &Node| found, node);
    }

    /// Runs `find` and then takes what it found, in the apply thread.
    fn spawn(&mut self, find: impl FnOnce(&Node) -> Vec<Found> + Send + 'static, node: Node) {
        let (keys, allow_downgrade, tries) = (self.keys.clone(), self.cfg.allow_downgrade, self.cfg.tries);
        let spawned = std::thread::Builder::new().name("update".into()).spawn(move || {
            let mut end = JobEnd::Nothing;
            for f in find(&node) {
                match take(&node, &keys, allow_downgrade, tries, &f) {
                    Taken::Applied(a) => return JobEnd::Applied(a),
                    Taken::Refused => {
                        if let Origin::Channel(o) = &f.origin {
                            end = JobEnd::Refused(o.version.clone());
                        }
                    }
                    Taken::Skipped => {}
                }
            }
            end
        });
        match spawned {
            Ok(j) => self.job = Some(j),
            Err(e) => console::error(&format!("updates: starting the apply thread: {e}")),
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn report_rollback(node: &Node, failed: &Entry) {
    let p = Pending::parse(&fs::read_to_string(state(PENDING)).unwrap_or_default());
    let from = if p.slot == failed.slot.letter() && !p.version.is_empty() { p.version.clone() } else { "unknown".into() };
    let to = node.version.clone().unwrap_or_else(|| "unknown".into());
    console::event("rolled-back", &[("from", &from), ("to", &to), ("slot", &failed.slot), ("tries", &failed.done), ("entry", &failed.name)]);
    console::warn(&format!("image {from} in slot {} never became healthy in {} boots; running {to} from slot {} again. That bundle is not applied again on this node", failed.slot, failed.done, node.slot));
    if p.slot == failed.slot.letter() && !p.roothash.is_empty() {
        let mut hashes = failed_hashes();
        if !hashes.contains(&p.roothash) {
            hashes.push(p.roothash.clone());
            if let Err(e) = write_state(FAILED, &(hashes.join("\n") + "\n")) {
                console::error(&e);
            }
        }
    }
    let _ = fs::remove_file(state(PENDING));
    let esp = Path::new(ESP);
    if node.mbr.is_some() {
        if let Err(e) = uboot::write_state(esp, &State { good: node.slot, trial: None }) {
            console::error(&format!("clearing the spent trial of slot {} in /boot/{}: {e}", failed.slot, uboot::STATE));
        }
        return;
    }
    let dir = esp.join(apply::ENTRY_DIR);
    if let Err(e) = fs::remove_file(dir.join(&failed.name)) {
        console::error(&format!("removing the failed boot entry {}: {e}", failed.name));
    }
    sync_dir(&dir);
}

/// What the channel offers, when it is newer than the running image and
/// was not refused or rolled back before (events: `update-checked`).
fn check_channel(node: &Node, server: &str, ch: &str, refused: &BTreeSet<String>) -> Option<Found> {
    let url = channel::index_url(server, ch);
    let offer = channel::fetch_index(server, ch, &fetch_options()).and_then(|i| i.for_arch(channel::this_arch()));
    let running = node.version.clone().unwrap_or_else(|| "unknown".into());
    let offer = match offer {
        Ok(o) => o,
        Err(e) => {
            console::event("update-checked", &[("index", &url), ("result", &"error"), ("reason", &e)]);
            console::info(e.hint());
            return None;
        }
    };
    let result = if !channel::newer(&offer.version, &running) {
        "up-to-date"
    } else if refused.contains(&offer.version) {
        "refused-before"
    } else {
        "newer"
    };
    console::event("update-checked", &[("index", &url), ("offered", &offer.version), ("running", &running), ("result", &result)]);
    (result == "newer").then(|| Found { source: offer.url.clone(), origin: Origin::Channel(offer) })
}

/// Downloads may be slow; a server that stops sending for a minute is
/// given up on (the next poll tries again).
fn fetch_options() -> crate::node::fetch::Options {
    crate::node::fetch::Options { read_timeout: Duration::from_secs(60), ..Default::default() }
}

enum Taken {
    Applied(Applied),
    Refused,
    Skipped,
}

/// Verifies and applies one bundle; events say what happened.
fn take(node: &Node, keys: &[PublicKey], allow_downgrade: bool, tries: u32, f: &Found) -> Taken {
    let reject = |reason: &str| {
        console::event("update-rejected", &[("source", &f.source), ("reason", &reason)]);
        if let Some(path) = f.consumed() {
            let mut to = path.to_path_buf().into_os_string();
            to.push(".rejected");
            let _ = fs::rename(path, &to);
        }
        Taken::Refused
    };
    let mut file_len = None;
    let input: Box<dyn Read> = match &f.origin {
        Origin::File { path, .. } => match File::open(path) {
            Ok(x) => {
                file_len = x.metadata().ok().map(|m| m.len());
                Box::new(x)
            }
            Err(e) => return reject(&format!("opening it: {e}")),
        },
        Origin::Channel(offer) => match channel::open_bundle(offer, &fetch_options()) {
            Ok(x) => Box::new(x),
            Err(e) => {
                // The server's trouble, not the bundle's: tried again at the
                // next poll.
                console::event("update-checked", &[("index", &f.source), ("result", &"error"), ("reason", &e)]);
                return Taken::Skipped;
            }
        },
    };
    let policy = Policy { keys, arch: channel::this_arch(), profile: &node.profile, running_version: node.version.as_deref(), allow_downgrade };
    let reader = match BundleReader::open(std::io::BufReader::with_capacity(1 << 20, input), &policy) {
        Ok(r) => r,
        Err(e) => return reject(&e.to_string()),
    };
    // A short file is refused before anything is written (a cut download
    // or copy); a stream cut short fails while the inactive slot is
    // written, before any switch.
    if let Some(len) = file_len.filter(|l| *l < reader.expected_len()) {
        return reject(&format!("the update bundle is truncated: the file is {len} bytes, but its manifest's parts need at least {}; copy or download it again, completely", reader.expected_len()));
    }
    let m = reader.manifest().clone();
    let skip = |reason: String| {
        console::event("update-skipped", &[("source", &f.source), ("version", &m.version), ("reason", &reason)]);
        if let Some(path) = f.consumed() {
            let _ = fs::remove_file(path);
        }
        Taken::Skipped
    };
    if unhex32(&m.roothash) == Some(node.roothash) {
        return skip("the node already runs this image".into());
    }
    if failed_hashes().contains(&m.roothash) {
        return skip("this image was rolled back on this node before".into());
    }
    // systemd-boot orders entries by version: a different image with the
    // running version might never be booted, or never be left.
    if node.version.as_deref() == Some(m.version.as_str()) {
        return reject(&format!("the bundle is a different image with the running version {}; give every build its own version (the boot loader orders images by it)", m.version));
    }
    let x = node.slot.other();
    let from = node.version.clone().unwrap_or_else(|| "unknown".into());
    if let Err(e) = write_state(PENDING, &Pending { slot: x.letter().into(), version: m.version.clone(), from: from.clone(), roothash: m.roothash.clone() }.to_text()) {
        return reject(&format!("cannot record the update on /var: {e}"));
    }
    console::event("update-applying", &[("source", &f.source), ("version", &m.version), ("from", &from), ("slot", &x)]);
    let t0 = Instant::now();
    let progress = |s: apply::Step| console::info(&format!("update: {s}"));
    let target = Target { disk: &node.disk, esp: Path::new(ESP), running_roothash: node.roothash, tries, progress: Some(&progress), mbr: node.mbr };
    match apply::apply(reader, &target) {
        Ok(a) => {
            console::event(
                "update-applied",
                &[
                    ("source", &f.source),
                    ("version", &a.version),
                    ("from", &from),
                    ("slot", &a.slot),
                    ("entry", &a.entry),
                    ("bytes", &a.bytes_written()),
                    ("seconds", &format!("{:.1}", t0.elapsed().as_secs_f64())),
                    ("readback_seconds", &format!("{:.1}", a.readback.as_secs_f64())),
                ],
            );
            if let Some(path) = f.consumed() {
                let _ = fs::remove_file(path);
            }
            Taken::Applied(a)
        }
        Err(ApplyError::AlreadyRunning { .. }) => {
            let _ = fs::remove_file(state(PENDING));
            skip("the node already runs this image".into())
        }
        Err(e) => {
            let _ = fs::remove_file(state(PENDING));
            reject(&e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str) -> Entry {
        parse_entry(name, "edge").unwrap_or_else(|| panic!("{name}"))
    }

    #[test]
    fn entries_parse_with_and_without_counters() {
        assert_eq!(e("kiln-edge-a.efi"), Entry { name: "kiln-edge-a.efi".into(), slot: Slot::A, left: None, done: 0 });
        assert_eq!(e("kiln-edge-b+3.efi").left, Some(3));
        let x = e("kiln-edge-b+1-2.efi");
        assert_eq!((x.slot, x.left, x.done), (Slot::B, Some(1), 2));
        assert_eq!(x.good_name(), "kiln-edge-b.efi");
        assert!(e("kiln-edge-a+0-3.efi").spent());
        assert_eq!(parse_entry("kiln-other-a.efi", "edge"), None);
        assert_eq!(parse_entry("kiln-edge-c.efi", "edge"), None);
        assert_eq!(parse_entry(".kiln-edge-a.efi.tmp", "edge"), None);
    }

    #[test]
    fn assessment_of_each_boot() {
        // A fresh image's first boot: on trial, nothing to fall back to.
        assert_eq!(assess(&[e("kiln-edge-a+2-1.efi")], Slot::A).0, Assessed::Trial { entry: e("kiln-edge-a+2-1.efi"), fallback: false });
        // After an update: B on trial, A good to fall back to.
        assert_eq!(assess(&[e("kiln-edge-a.efi"), e("kiln-edge-b+2-1.efi")], Slot::B).0, Assessed::Trial { entry: e("kiln-edge-b+2-1.efi"), fallback: true });
        // B marked good.
        assert_eq!(assess(&[e("kiln-edge-a.efi"), e("kiln-edge-b.efi")], Slot::B), (Assessed::Good, None));
        // Rolled back: A runs, B's tries are spent.
        assert_eq!(assess(&[e("kiln-edge-a.efi"), e("kiln-edge-b+0-3.efi")], Slot::A), (Assessed::Good, Some(e("kiln-edge-b+0-3.efi"))));
        // A trial whose fallback is spent too has nothing to fall back to.
        assert_eq!(assess(&[e("kiln-edge-a+0-3.efi"), e("kiln-edge-b+1-2.efi")], Slot::B).0, Assessed::Trial { entry: e("kiln-edge-b+1-2.efi"), fallback: false });
        assert!(matches!(assess(&[e("kiln-edge-b.efi")], Slot::A).0, Assessed::Unmanaged(_)));
    }

    #[test]
    fn assessment_of_each_uboot_boot() {
        let st = |good, trial| Some(State { good, trial });
        let entry = |slot, left, done| Entry { name: format!("/kiln/{slot}"), slot, left: Some(left), done };
        // A fresh card: slot a good.
        assert_eq!(assess_uboot(st(Slot::A, None), Slot::A, 3), (Assessed::Good, None));
        // After an update, boot.scr took one of three tries: b on trial.
        assert_eq!(assess_uboot(st(Slot::A, Some((Slot::B, 2))), Slot::B, 3).0, Assessed::Trial { entry: entry(Slot::B, 2, 1), fallback: true });
        // The last try.
        assert_eq!(assess_uboot(st(Slot::A, Some((Slot::B, 0))), Slot::B, 3).0, Assessed::Trial { entry: entry(Slot::B, 0, 3), fallback: true });
        // Tries spent, boot.scr booted a: a rollback to report.
        assert_eq!(assess_uboot(st(Slot::A, Some((Slot::B, 0))), Slot::A, 3), (Assessed::Good, Some(entry(Slot::B, 0, 3))));
        // b's files did not load and boot.scr fell through to a with tries
        // left: not a rollback yet (the next boot tries b again).
        assert_eq!(assess_uboot(st(Slot::A, Some((Slot::B, 1))), Slot::A, 3), (Assessed::Good, None));
        // b marked good.
        assert_eq!(assess_uboot(st(Slot::B, None), Slot::B, 3), (Assessed::Good, None));
        assert!(matches!(assess_uboot(st(Slot::B, None), Slot::A, 3).0, Assessed::Unmanaged(_)));
        assert!(matches!(assess_uboot(None, Slot::A, 3).0, Assessed::Unmanaged(_)));
    }

    #[test]
    fn stage1_sees_a_trial_from_the_boot_partition_alone() {
        let esp = tempfile::tempdir().unwrap();
        let dir = esp.path().join(apply::ENTRY_DIR);
        fs::create_dir_all(&dir).unwrap();
        let put = |names: &[&str]| {
            for e in fs::read_dir(&dir).unwrap().flatten() {
                fs::remove_file(e.path()).unwrap();
            }
            for n in names {
                fs::write(dir.join(n), b"").unwrap();
            }
        };
        // The profile comes from the running slot's entry ("my-edge-b").
        put(&["kiln-my-edge-b-a.efi", "kiln-my-edge-b-b+1-1.efi", "other.efi"]);
        assert_eq!(trial_in(esp.path(), Slot::B, false).map(|e| e.name), Some("kiln-my-edge-b-b+1-1.efi".into()));
        assert_eq!(trial_in(esp.path(), Slot::A, false), None);
        // A fresh image's first boot has nothing to fall back to.
        put(&["kiln-edge-a+2-1.efi"]);
        assert_eq!(trial_in(esp.path(), Slot::A, false), None);
        // Good, or no entries at all.
        put(&["kiln-edge-a.efi", "kiln-edge-b.efi"]);
        assert_eq!(trial_in(esp.path(), Slot::B, false), None);
        put(&[]);
        assert_eq!(trial_in(esp.path(), Slot::B, false), None);
        // Two profiles with an entry for the slot: not ours to guess.
        put(&["kiln-x-a.efi", "kiln-x-b+1-1.efi", "kiln-y-b+1-1.efi"]);
        assert_eq!(trial_in(esp.path(), Slot::B, false), None);
        // A card: /kiln/state.
        assert_eq!(trial_in(esp.path(), Slot::B, true), None);
        fs::create_dir_all(esp.path().join("kiln")).unwrap();
        uboot::write_state(esp.path(), &State { good: Slot::A, trial: Some((Slot::B, 1)) }).unwrap();
        assert_eq!(trial_in(esp.path(), Slot::B, true).map(|e| (e.slot, e.left)), Some((Slot::B, Some(1))));
        assert_eq!(trial_in(esp.path(), Slot::A, true), None);
        uboot::write_state(esp.path(), &State { good: Slot::A, trial: None }).unwrap();
        assert_eq!(trial_in(esp.path(), Slot::A, true), None);
    }

    #[test]
    fn pending_round_trips() {
        let p = Pending { slot: "b".into(), version: "2.0.0".into(), from: "1.0.0".into(), roothash: "ab".repeat(32) };
        assert_eq!(Pending::parse(&p.to_text()), p);
        assert_eq!(Pending::parse("junk\n"), Pending::default());
    }

    #[test]
    fn os_release_values() {
        let os = "NAME=kiln\nIMAGE_ID=\"edge\"\nIMAGE_VERSION=1.2\n";
        assert_eq!(os_release_value(os, "IMAGE_ID"), Some("edge"));
        assert_eq!(os_release_value(os, "IMAGE"), None);
        assert_eq!(unhex32(&"0f".repeat(32)), Some([0x0f; 32]));
        assert_eq!(unhex32("0f"), None);
    }
}
