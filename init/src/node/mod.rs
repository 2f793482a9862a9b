//! kiln-init as PID 1: bring the node up from its config, supervise k0s,
//! and shut down cleanly. Failures become logged states (maintenance, a
//! retry), never a panic or a crash loop.

pub mod appliance;
pub mod clock;
pub mod coldplug;
pub mod console;
pub mod fetch;
pub mod host;
pub mod install;
pub mod k0sfiles;
pub mod kmod;
pub mod maintenance;
pub mod netup;
pub mod preflight;
pub mod secureboot;
pub mod shell;
pub mod sources;
pub mod supervisor;
pub mod sys;
pub mod tls;
pub mod update;
pub mod vardisk;
pub mod volume;
pub mod watchdog;

// Stage 1 (initramfs → verified root); see stage1.rs.
pub mod gpt;
pub mod grow;
pub mod ramroot;
pub mod stage1;

use crate::k0s;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use supervisor::Supervisor;

/// How to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Poweroff,
    Reboot,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Poweroff => "poweroff",
            Action::Reboot => "reboot",
        }
    }
}

/// How long k0s gets to stop after SIGTERM (the OpenRC unit's 90 s).
const STOP_GRACE: Duration = Duration::from_secs(90);

/// Signals PID 1 handles, read through a signalfd.
const SIGNALS: &[libc::c_int] = &[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGPWR, libc::SIGHUP];

struct Events {
    sigfd: OwnedFd,
    buttons: Vec<OwnedFd>,
}

fn block_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local set; signalfd returns a new fd.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, *s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Input devices that can report KEY_POWER (the ACPI power button, or
/// gpio-keys on ARM boards).
fn open_buttons() -> Vec<OwnedFd> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/dev/input") else { return out };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("event") {
            continue;
        }
        let Ok(c) = std::ffi::CString::new(format!("/dev/input/{name}")) else { continue };
        // SAFETY: valid C string.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: fd was just opened and is owned here.
            out.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    out
}

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// Reads pending input events; true if the power key was pressed.
fn power_pressed(fd: &OwnedFd) -> bool {
    // struct input_event: a timeval (two longs), u16 type, u16 code, s32 value.
    let tv = 2 * std::mem::size_of::<libc::c_long>();
    let size = tv + 8;
    let mut buf = [0u8; 24 * 16];
    let mut pressed = false;
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            return pressed;
        }
        for ev in buf[..n as usize].chunks_exact(size) {
            let ty = u16::from_ne_bytes([ev[tv], ev[tv + 1]]);
            let code = u16::from_ne_bytes([ev[tv + 2], ev[tv + 3]]);
            let value = i32::from_ne_bytes([ev[tv + 4], ev[tv + 5], ev[tv + 6], ev[tv + 7]]);
            if ty == EV_KEY && code == KEY_POWER && value == 1 {
                pressed = true;
            }
        }
    }
}

enum Wake {
    Signal(libc::c_int),
    Power,
    PayloadOutput,
    Timeout,
}

impl Events {
    /// Waits for a signal, a power key press, payload output, or the timeout.
    fn wait(&self, payload: Option<&OwnedFd>, timeout: Duration) -> Vec<Wake> {
        let mut fds = vec![libc::pollfd { fd: self.sigfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        for b in &self.buttons {
            fds.push(libc::pollfd { fd: b.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let pidx = fds.len();
        if let Some(p) = payload {
            fds.push(libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        watchdog::pet();
        let ms = timeout.min(watchdog::PET_EVERY).as_millis() as libc::c_int;
        // SAFETY: valid array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        let mut out = Vec::new();
        if n <= 0 {
            out.push(Wake::Timeout);
            return out;
        }
        if fds[0].revents != 0 {
            loop {
                // SAFETY: signalfd_siginfo is plain data; read fills it.
                let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                let sz = std::mem::size_of::<libc::signalfd_siginfo>();
                let r = unsafe { libc::read(self.sigfd.as_raw_fd(), &mut si as *mut _ as *mut libc::c_void, sz) };
                if r as usize != sz {
                    break;
                }
                out.push(Wake::Signal(si.ssi_signo as libc::c_int));
            }
        }
        for (i, b) in self.buttons.iter().enumerate() {
            if fds[i + 1].revents != 0 && power_pressed(b) {
                out.push(Wake::Power);
            }
        }
        if payload.is_some() && fds[pidx].revents != 0 {
            out.push(Wake::PayloadOutput);
        }
        out
    }
}

/// Loads modules for the devices present (the root's modules are a superset
/// of stage 1's), reports PCI devices without a driver, and emits the
/// `coldplug` event. Returns the uevent socket for hotplug, opened first so
/// that no device added meanwhile is missed.
fn coldplug_at_boot() -> Option<OwnedFd> {
    let t0 = Instant::now();
    let uevents = coldplug::open_uevents().map_err(|e| console::warn(&format!("hotplug: the kernel's uevent socket: {e}; devices plugged in later get no module loaded"))).ok();
    let mut state = coldplug::State::default();
    let summary = coldplug::scan(&mut state);
    coldplug::report_unclaimed(&mut state);
    console::event("coldplug", &[("modules", &summary.loaded.len()), ("seconds", &format!("{:.2}", t0.elapsed().as_secs_f64()))]);
    uevents
}

/// The whole life of the node. Never returns.
pub fn run() -> ! {
    sys::attach_console();
    if let Err(e) = host::mount_pseudo() {
        // Without /proc and /dev little works, but say so and keep going.
        console::error(&format!("mounting pseudo filesystems: {e}"));
    }
    // Kernel messages at info and below stay off the console, so event lines
    // copied to /dev/kmsg are not printed twice.
    let _ = sys::write("/proc/sys/kernel/printk", "4 4 1 7");
    console::open_kmsg();
    console::open_mirrors();
    console::event("started", &[("version", &env!("CARGO_PKG_VERSION")), ("uptime", &format!("{:.2}", sys::uptime())), ("secureboot", &secureboot::state())]);
    // Drivers for what is present, before anything looks for disks or NICs.
    let uevents = coldplug_at_boot();
    // SAFETY: plain syscall; Ctrl-Alt-Del then arrives as SIGINT.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) };
    watchdog::arm();
    fault_injection();
    let events = match block_signals() {
        Ok(fd) => Events { sigfd: fd, buttons: open_buttons() },
        Err(e) => {
            console::error(&format!("signalfd: {e}; cannot supervise"));
            watchdog::idle_forever();
        }
    };
    if let Some(sock) = uevents {
        coldplug::start_hotplug(sock);
    }
    let controllers = match host::setup_cgroups() {
        Ok(c) => c,
        Err(e) => {
            console::error(&format!("cgroups: {e}"));
            Vec::new()
        }
    };
    // Modules first: br_netfilter makes the bridge sysctls exist.
    let missing = host::load_modules();
    if !missing.is_empty() {
        console::warn(&format!("kernel modules not found (neither built in nor in /lib/modules): {}", missing.join(" ")));
    }
    host::set_sysctls();
    // The image's debug shell comes first, so that it is there however far
    // the node gets.
    if shell::in_image() {
        shell::enable("node.debug_shell in the image");
    }
    // The installer, when the cmdline asks for it: before the config, which
    // an installer medium need not carry.
    if let Some(t) = install::requested_on_cmdline() {
        if let Err(reason) = install_now(&t, "cmdline") {
            maintenance(&events, &reason);
        }
    }

    // With kiln.config=URL the network comes up first, to fetch the config.
    let mut url = sources::UrlSource::from_cmdline();
    if url.is_none() {
        volume::settle();
    }
    // A config that is valid but cannot be used here (preflight fails for
    // its role, its install fails) sends the node back to waiting for a
    // changed one.
    let mut announcer = maintenance::Announcer::default();
    let mut refused: Option<maintenance::Refused> = None;
    let mac = netup::first_mac();
    let (cfg, pre, text) = loop {
        let loaded = wait_for_config(&events, url.as_mut(), refused.as_ref(), &mut announcer);
        let cfg = loaded.config;
        let hostname = host::hostname(&cfg, mac);
        let mut fields: Vec<(&str, &dyn std::fmt::Display)> = vec![("source", &loaded.source), ("role", &cfg.role), ("hostname", &hostname)];
        if let Some(d) = &loaded.dev {
            fields.push(("dev", d));
        }
        console::event("config-loaded", &fields);
        let pre = preflight::run(cfg.role, &controllers);
        let mut why = None;
        if !pre.failures.is_empty() {
            console::event("preflight-failed", &[("role", &cfg.role), ("missing", &pre.failures.join(","))]);
            let reason = format!("preflight failed for role {}: missing {}", cfg.role, pre.failures.join(", "));
            why = Some((reason, "give the node a role it can run here (a controller needs the least), or fix what is missing: kernel options need an image with a kernel that has them (kiln kernel check), a cgroup controller may be off on the kernel command line (cgroup_disable=)".to_string()));
        } else if let Some(t) = cfg.install.disk.clone().filter(|_| install::read_medium().is_ok_and(|m| m.kind == "iso")) {
            why = install_now(&t, "node.toml").err().map(|r| (r, "name another disk in install.disk, or fix the one named".to_string()));
        }
        match why {
            None => break (cfg, pre, loaded.text),
            Some((reason, hint)) => {
                let r = maintenance::Refused { text: loaded.text, reason, hint };
                let p = maintenance::refused_again(&r);
                if announcer.is_new(&p) {
                    announce(&p);
                }
                refused = Some(r);
            }
        }
    };
    let hostname = host::hostname(&cfg, mac);
    if let Err(e) = host::apply_hostname(&hostname) {
        console::error(&format!("hostname: {e}"));
    }
    let _ = host::write_machine_id(&format!("{hostname}{mac:?}"));
    // /var onto storage.var_disk, before anything writes there.
    vardisk::setup(&cfg);
    let mut net = match url.as_mut().and_then(|u| u.take_network(&cfg)) {
        Some(n) => n,
        None => netup::bring_up(&cfg, &hostname),
    };
    if let Err(e) = host::write_resolv_conf(&net.dns, &net.search) {
        console::error(&format!("resolv.conf: {e}"));
    }
    // The clock before the payload judges any TLS certificate (bounded wait).
    clock::sync_at_boot(&cfg.time, &net);

    let warnings = pre.warnings.len() + preflight::var_space().len();
    console::event("preflight-ok", &[("role", &cfg.role), ("warnings", &warnings)]);

    // Baked images and manifests where k0s imports and applies them.
    appliance::place_default();
    let inv = k0s::invocation(&cfg, cfg!(target_arch = "arm"));
    let mut sup = Supervisor::new(inv, cfg.role.as_str(), cfg.log.max_bytes, cfg.log.console_lines_per_second);
    // The CA and manifests: a refusal (this node's /var holds another
    // cluster's CA) is fixed by a changed config, such as the one the node
    // was created with. /var and the network are set up from this one, so
    // the changed config is applied by a reboot.
    if let Err(e) = k0sfiles::apply(&cfg.k0s) {
        console::error(&format!("k0s files: {e}"));
        let r = maintenance::Refused { text: text.clone(), reason: e, hint: "boot the node with the node config it was created with, or wipe /var to start it afresh; a changed config reboots the node to apply it".into() };
        let p = maintenance::refused_again(&r);
        if announcer.is_new(&p) {
            announce(&p);
        }
        let l = wait_for_config(&events, url.as_mut(), Some(&r), &mut announcer);
        console::info(&format!("a changed node config from {}: rebooting to apply it from the start", l.source));
        console::event("shutdown", &[("action", &"reboot"), ("reason", &"config-changed")]);
        final_shutdown(Action::Reboot, "config-changed");
    }
    if cfg.debug.shell {
        shell::enable("debug.shell = true in the node config");
    }
    let mut upd = update::Updates::start(&cfg.update);

    loop {
        let now = Instant::now();
        let payload_since = sup.running.as_ref().map(|r| r.started);
        if let Some(reason) = upd.tick(payload_since) {
            shutdown(&events, &mut sup, Action::Reboot, reason);
        }
        if sup.next_start.is_some_and(|t| t <= now) && sup.running.is_none() {
            sup.start();
        }
        if net.next_deadline().is_some_and(|t| t <= now) {
            net.renew_due(&hostname);
        }
        sup.tick();
        let deadlines = [sup.next_start, net.next_deadline(), sup.note_due(), upd.next_deadline(sup.running.as_ref().map(|r| r.started))];
        let timeout = deadlines.iter().flatten().map(|t| t.saturating_duration_since(Instant::now())).min().unwrap_or(Duration::from_secs(60));
        let out = sup.running.as_ref().map(|r| &r.out);
        for wake in events.wait(out, timeout) {
            match wake {
                Wake::PayloadOutput => sup.pump(),
                Wake::Signal(libc::SIGCHLD) => {
                    for (pid, status) in sys::reap() {
                        if sup.running.as_ref().is_some_and(|r| r.pid == pid) {
                            sup.exited(status, true);
                        }
                    }
                    shell::tick();
                }
                Wake::Signal(s) => {
                    if let Some(action) = action_for(s) {
                        shutdown(&events, &mut sup, action, signal_name(s));
                    }
                }
                Wake::Power => shutdown(&events, &mut sup, Action::Poweroff, "power-button"),
                Wake::Timeout => {}
            }
        }
    }
}

fn action_for(sig: libc::c_int) -> Option<Action> {
    match sig {
        libc::SIGTERM | libc::SIGINT => Some(Action::Reboot),
        libc::SIGUSR1 | libc::SIGUSR2 | libc::SIGPWR => Some(Action::Poweroff),
        _ => None,
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "ctrl-alt-del",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPWR => "SIGPWR",
        _ => "signal",
    }
}

/// Loads the config, or waits in maintenance until a valid one appears
/// (one that is not `refused`). A URL is retried with backoff (1 s
/// doubling to 30 s), local sources every 5 s; each problem is announced
/// once, fetch failures on every try.
fn wait_for_config(events: &Events, mut url: Option<&mut sources::UrlSource>, refused: Option<&maintenance::Refused>, announcer: &mut maintenance::Announcer) -> maintenance::Loaded {
    let trust = sources::Trust::read();
    let mut attempt = 0u32;
    loop {
        let found = match url.as_deref_mut() {
            Some(u) => u.load(&trust),
            None => sources::load(&trust),
        };
        let wait = if url.is_some() { sources::backoff(attempt) } else { Duration::from_secs(5) };
        attempt = attempt.saturating_add(1);
        match maintenance::judge(found, refused) {
            maintenance::Verdict::Use(l) => return *l,
            maintenance::Verdict::Wait(p) => {
                if p.every_time {
                    console::error(&format!("{}; retrying in {} s", p.error, wait.as_secs()));
                }
                if announcer.is_new(&p) {
                    announce(&p);
                }
            }
        }
        let until = Instant::now() + wait;
        while Instant::now() < until {
            idle(events, until.saturating_duration_since(Instant::now()));
        }
    }
}

/// A new problem: the console error (unless already printed), the
/// `maintenance` event, and what to do.
fn announce(p: &maintenance::Problem) {
    if !p.every_time {
        console::error(&p.error);
    }
    console::event("maintenance", &[("reason", &p.reason)]);
    if let Some(h) = &p.hint {
        console::info(h);
    }
}

/// Maintenance with nothing to watch (the installer asked for on the kernel
/// command line failed): say why, then keep reaping and answering power
/// requests. The operator fixes the cause and reboots.
fn maintenance(events: &Events, reason: &str) -> ! {
    console::event("maintenance", &[("reason", &reason)]);
    loop {
        idle(events, Duration::from_secs(60));
    }
}

/// Waits, reaping orphans and acting on shutdown requests.
fn idle(events: &Events, d: Duration) {
    for wake in events.wait(None, d) {
        match wake {
            Wake::Signal(libc::SIGCHLD) => {
                sys::reap();
                shell::tick();
            }
            Wake::Signal(s) => {
                if let Some(a) = action_for(s) {
                    console::event("shutdown", &[("action", &a.as_str()), ("reason", &signal_name(s))]);
                    final_shutdown(a, signal_name(s));
                }
            }
            Wake::Power => {
                console::event("shutdown", &[("action", &"poweroff"), ("reason", &"power-button")]);
                final_shutdown(Action::Poweroff, "power-button")
            }
            _ => {}
        }
    }
}

/// Installs this ISO onto `target` and reboots into it. Returns Ok when
/// the disk already holds this image, Err with the reason when the install
/// failed.
fn install_now(target: &str, why: &str) -> Result<(), String> {
    match install::run(target, why) {
        Ok(install::Outcome::Installed { target, bytes, seconds }) => {
            console::event("install-complete", &[("target", &target), ("bytes", &bytes), ("seconds", &format!("{seconds:.1}")), ("verified", &"yes")]);
            console::info("installed; rebooting into the disk (remove the install medium, or boot from the disk first)");
            final_shutdown(Action::Reboot, "installed")
        }
        Ok(install::Outcome::AlreadyInstalled { target }) => {
            console::warn(&format!("{target} already holds this image; not installing again. Remove the install medium, or boot from {target} first; booting from the medium now"));
            Ok(())
        }
        Err(e) => {
            console::error(&format!("install ({why}): {e}"));
            console::event("install-failed", &[("target", &target), ("reason", &e)]);
            Err(format!("install to {target} failed: {e}"))
        }
    }
}

/// After a panic: on a trial boot with an image to fall back to, reboot
/// (spending a try); otherwise reap forever.
pub fn park() -> ! {
    if let Some((slot, version, entry)) = update::trial_with_fallback() {
        console::event(
            "boot-failed",
            &[("slot", &slot), ("version", &version), ("entry", &entry.name), ("tries_left", &entry.left.unwrap_or(0)), ("reason", &"kiln-init panicked on a trial boot"), ("action", &"reboot")],
        );
        console::warn("this image is on trial and kiln-init cannot go on: rebooting in 5 s to spend a try (the previous image boots when they are spent)");
        std::thread::sleep(Duration::from_secs(5));
        final_shutdown(Action::Reboot, "trial-boot-failed")
    }
    watchdog::idle_forever()
}


/// `kiln.fault=panic` on the kernel cmdline makes kiln-init panic here, at
/// the start of stage 2: a drill for rollback (a bundle built with it must
/// be rolled back). The cmdline is part of the signed boot entry, so only
/// whoever builds the image can set it.
fn fault_injection() {
    let cmdline = sys::read("/proc/cmdline").unwrap_or_default();
    if crate::cmdline::words(&cmdline).iter().any(|w| w == "kiln.fault=panic") {
        panic!("kiln.fault=panic on the kernel cmdline: panicking as asked (a rollback drill)");
    }
}

/// Stops k0s (SIGTERM, up to 90 s), then everything else, then ends.
fn shutdown(events: &Events, sup: &mut Supervisor, action: Action, reason: &str) -> ! {
    console::event("shutdown", &[("action", &action.as_str()), ("reason", &reason)]);
    if let Some(pid) = sup.running.as_ref().map(|r| r.pid) {
        sys::kill(pid, libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while sup.running.is_some() && Instant::now() < deadline {
            let out = sup.running.as_ref().map(|r| &r.out);
            for wake in events.wait(out, deadline.saturating_duration_since(Instant::now())) {
                match wake {
                    Wake::PayloadOutput => sup.pump(),
                    Wake::Signal(libc::SIGCHLD) => {
                        for (p, status) in sys::reap() {
                            if p == pid {
                                sup.exited(status, false);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if sup.running.is_some() {
            console::warn(&format!("k0s did not stop within {} s; killing its cgroup", STOP_GRACE.as_secs()));
        }
    }
    final_shutdown(action, reason)
}

fn final_shutdown(action: Action, reason: &str) -> ! {
    // Whatever is left of k0s's tree (containerd, shims, kubelet) first.
    let _ = sys::write(format!("{}/cgroup.kill", host::PAYLOAD_CGROUP), "1");
    sys::kill(-1, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        sys::reap();
        if !has_other_processes() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sys::kill(-1, libc::SIGKILL);
    sys::reap();
    sys::sync();
    unmount_all();
    sys::sync();
    console::event("shutdown-complete", &[("action", &action.as_str()), ("reason", &reason)]);
    let cmd = match action {
        Action::Poweroff => libc::LINUX_REBOOT_CMD_POWER_OFF,
        Action::Reboot => libc::LINUX_REBOOT_CMD_RESTART,
    };
    let e = sys::reboot(cmd);
    console::error(&format!("reboot({}) failed: {e}", action.as_str()));
    watchdog::idle_forever()
}

fn has_other_processes() -> bool {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.parse::<i32>().is_ok_and(|p| p > 1) && std::fs::read_to_string(format!("/proc/{n}/cmdline")).is_ok_and(|c| !c.is_empty())
            })
        })
        .unwrap_or(false)
}

/// Unmounts everything it can, deepest first; what stays busy is remounted
/// read-only.
fn unmount_all() {
    let mounts = sys::read("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    targets.reverse();
    for t in targets {
        if matches!(t, "/" | "/proc" | "/sys" | "/dev") {
            continue;
        }
        if sys::umount(t, 0).is_err() {
            let _ = sys::remount(t, libc::MS_REMOUNT | libc::MS_RDONLY);
        }
    }
}

