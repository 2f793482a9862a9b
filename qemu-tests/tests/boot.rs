//! Boot the default profile (qemu-amd64) under QEMU and check what the node
//! prints on its console.

mod common;
use common::{boot, built, BOOT_TIMEOUT};
use std::time::Duration;

const PROFILE: &str = "qemu-amd64";

#[test]
fn boots_to_payload_started_with_every_check_ok() {
    let out = built(PROFILE);
    let mut n = boot("boots_to_payload_started", &out, None);
    n.event("started", BOOT_TIMEOUT);
    let net = n.event("network-up", BOOT_TIMEOUT);
    assert_eq!(net.get("addr"), Some("10.0.2.15/24"), "QEMU user networking gives 10.0.2.15");
    n.event("preflight-ok", BOOT_TIMEOUT);
    let started = n.event("payload-started", BOOT_TIMEOUT);
    assert_eq!(started.get("role"), Some("single"));
    let checks = n.standin_checks();
    let failed: Vec<_> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(checks.len() >= 15, "expected every contract check, got {checks:#?}");
    if !failed.is_empty() {
        n.fail(format!("stand-in checks failed: {failed:#?}"));
    }
    let log = n.vm.log();
    assert!(log.iter().any(|l| l.contains("stand-in: argv") && l.contains("k0s controller --single")), "the default role is single");
    // Figures for the record (printed with --nocapture).
    eprintln!(
        "figures: payload-started at uptime={}s init_rss_kib={} mem_used_kib={}",
        started.get("uptime").unwrap_or("?"),
        started.get("init_rss_kib").unwrap_or("?"),
        started.get("mem_used_kib").unwrap_or("?")
    );
}

#[test]
fn fw_cfg_config_sets_hostname_and_role() {
    let out = built(PROFILE);
    let cfg = "role = \"controller+worker\"\nhostname = \"fwcfg-node-1\"\n[k0s]\nlabels = { site = \"lab\" }\n";
    let mut n = boot("fw_cfg_config", &out, Some(cfg));
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("source"), Some("fw_cfg"));
    assert_eq!(loaded.get("hostname"), Some("fwcfg-node-1"));
    let started = n.event("payload-started", BOOT_TIMEOUT);
    assert_eq!(started.get("role"), Some("controller+worker"));
    let argv = n.line("stand-in argv", BOOT_TIMEOUT, |l| l.contains("stand-in: argv"));
    assert!(argv.contains("k0s controller --enable-worker"), "{argv}");
    assert!(argv.contains("--labels=site=lab"), "{argv}");
    let checks = n.standin_checks();
    assert!(checks.iter().any(|l| l.contains("check hostname ok")), "{checks:#?}");
    let log = n.vm.log();
    assert!(log.iter().any(|l| l.contains("stand-in: role=controller+worker")), "the stand-in sees the role");
}

#[test]
fn killed_payload_is_restarted_with_backoff() {
    let out = built(PROFILE);
    let cfg = "role = \"single\"\n[debug]\nshell = true\n";
    let mut n = boot("killed_payload", &out, Some(cfg));
    let first = n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    let pid = first.get("pid").unwrap_or_default().to_string();
    // From inside the node: the debug shell on the console.
    n.vm.send(&format!("\nkill -9 {pid}\n")).unwrap();
    let exited = n.event("payload-exited", Duration::from_secs(120));
    assert_eq!(exited.get("status"), Some("signal-9"), "{exited:?}");
    let restarting = n.event("payload-restarting", Duration::from_secs(30));
    assert_eq!(restarting.get("delay"), Some("10s"), "RestartSec=10, like the k0s unit: {restarting:?}");
    let again = n.event("payload-started", Duration::from_secs(120));
    assert_eq!(again.get("attempt"), Some("2"));
    assert_ne!(again.get("pid"), first.get("pid"));
    // And again: the delay grows.
    let pid2 = again.get("pid").unwrap_or_default().to_string();
    n.standin_checks();
    n.vm.send(&format!("kill -9 {pid2}\n")).unwrap();
    n.event("payload-exited", Duration::from_secs(120));
    let r2 = n.event("payload-restarting", Duration::from_secs(30));
    assert_eq!(r2.get("delay"), Some("20s"), "a second failure in a row doubles it: {r2:?}");
    n.event("payload-started", Duration::from_secs(120));
}

#[test]
fn acpi_powerdown_stops_payload_then_powers_off() {
    let out = built(PROFILE);
    let mut n = boot("acpi_powerdown", &out, None);
    n.event("payload-started", BOOT_TIMEOUT);
    n.line("stand-in running", BOOT_TIMEOUT, |l| l.contains("stand-in: running"));
    n.vm.powerdown().unwrap_or_else(|e| panic!("QMP system_powerdown: {e}"));
    let sd = n.event("shutdown", Duration::from_secs(60));
    assert_eq!(sd.get("action"), Some("poweroff"));
    assert_eq!(sd.get("reason"), Some("power-button"));
    n.line("stand-in got SIGTERM", Duration::from_secs(60), |l| l.contains("stand-in: got SIGTERM"));
    let exited = n.event("payload-exited", Duration::from_secs(100));
    assert_eq!(exited.get("status"), Some("exit-0"), "the stand-in exits 0 after SIGTERM, as k0s does");
    n.event("shutdown-complete", Duration::from_secs(60));
    let status = n.vm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("QEMU did not exit after power-off: {e}"));
    assert!(status.success(), "QEMU exit: {status}");
}

/// A malformed config: maintenance, not a crash loop. The image is built
/// with `node.debug_shell = true`, so a root shell is on the console in
/// maintenance, before any config was read: a command typed there runs.
#[test]
fn malformed_node_config_gives_maintenance_not_a_crash_loop() {
    // Only the PXE bundle, which this boot uses: the quickest build.
    let out = built(&common::derived(PROFILE, "qemu-amd64-debug-shell", "outputs = [\"pxe\"]\n", "debug_shell = true\n"));
    let cfg = "role = \"single\"\n[k0s]\nlables = { a = \"b\" }\n";
    let mut n = boot("malformed_config", &out, Some(cfg));
    let m = n.event("maintenance", BOOT_TIMEOUT);
    let reason = m.get("reason").unwrap_or_default();
    assert!(reason.contains("fw_cfg") && reason.contains("lables") && reason.contains("line 3"), "reason names source, key and line: {reason}");
    // It stays in maintenance: no payload, no restart of init, no repeat.
    let r = n.vm.wait_for("anything after maintenance", Duration::from_secs(20), |l| {
        kiln_contract::event::parse(l).is_some_and(|e| matches!(e.name.as_str(), "payload-started" | "started" | "maintenance"))
    });
    assert!(r.is_err(), "expected quiet maintenance, got {r:?}");
    let log = n.vm.log();
    assert!(!log.iter().any(|l| l.contains("Kernel panic")), "no kernel panic");
    assert!(log.iter().any(|l| l.contains("kiln-init: error node config from fw_cfg is invalid")), "a clear console error");
    assert!(log.iter().any(|l| l.contains("kiln-init: warning debug shell on the console (node.debug_shell in the image)")), "the shell is announced");
    // The maintenance shell: the arithmetic shows the shell ran it (the
    // echoed command line holds `$((6*7))`, not 42).
    n.vm.send("\necho kiln-shell-$((6*7)) $(cat /proc/1/comm)\n").unwrap();
    let out = n.line("the shell's answer", Duration::from_secs(60), |l| l.contains("kiln-shell-42"));
    assert!(out.contains("kiln-shell-42 init"), "PID 1 is kiln-init, started as /sbin/init: {out}");
}
