//! Maintenance is a wait, never a crash loop or a dead end: an invalid
//! config from each source gives a `maintenance` event whose reason names the
//! source, the key and the line, and a replaced config brings the node up.
//!
//! (The invalid-fw_cfg case with a TOML schema error is in boot.rs.)

mod common;

use common::{boot_with, built, config_stick, copy_disk, esp_image, mcopy, plug, qmp, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use std::time::Duration;

const PROFILE: &str = "qemu-amd64";

/// The reason of the next `maintenance` event, which must name all of `what`.
fn maintenance_naming(n: &mut common::Node, what: &[&str]) -> String {
    let m = n.event("maintenance", BOOT_TIMEOUT);
    let reason = m.get("reason").unwrap_or_default().to_string();
    if !what.iter().all(|w| reason.contains(w)) {
        n.fail(format!("the maintenance reason should name {what:?}: {reason}"));
    }
    reason
}

fn power_off(n: &mut common::Node) {
    if let Err(e) = n.vm.powerdown() {
        n.fail(format!("QMP system_powerdown: {e}"));
    }
    let sd = n.event("shutdown", Duration::from_secs(60));
    assert_eq!(sd.get("reason"), Some("power-button"), "{sd:?}");
    n.event("shutdown-complete", Duration::from_secs(120));
    if let Err(e) = n.vm.wait_exit(Duration::from_secs(60)) {
        n.fail(format!("QEMU did not exit after power-off: {e}"));
    }
}

/// Disk boot: the ESP's node.toml and KILNCFG USB sticks.
///
/// Boot 1: the ESP holds an invalid node.toml and an invalid KILNCFG stick is
/// plugged in at power-on. The stick comes first (maintenance names it);
/// pulled out, the ESP's file is next (maintenance names it); a stick with a
/// valid config plugged in while the node waits brings it up. Power off,
/// replace node.toml on the ESP, boot 2 (no stick): the node comes up from
/// the ESP.
#[test]
fn invalid_esp_and_kilncfg_configs_wait_until_replaced() {
    let out = built(PROFILE);
    let disk = copy_disk(&out, "maint_esp");
    let esp = esp_image(&disk);
    mcopy(&esp, "role = \"single\"\n\n[network]\nwait_secs = 10\n", "node.toml");
    let bad_stick = config_stick("maint-bad-stick.img", "KILNCFG", "role = \"single\"\nhostname = \"Not_A_Hostname\"\n");
    let good_stick = config_stick("maint-good-stick.img", "KILNCFG", "# from the stick\nrole = \"single\"\nhostname = \"from-the-stick\"\n");
    let stick_arg = format!("if=none,id=stick0,format=raw,readonly=on,file={}", bad_stick.display());
    let mut n = boot_with("maint_esp_kilncfg", &out, None, |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk.clone());
        s.extra_args = ["-device", "qemu-xhci,id=xhci", "-drive", &stick_arg, "-device", "usb-storage,bus=xhci.0,drive=stick0,id=stick0,removable=on"].map(String::from).to_vec();
    });
    // The stick, present at power-on, is found and named with its device.
    maintenance_naming(&mut n, &["kilncfg", "/dev/sd", "hostname", "line 2"]);
    assert!(n.vm.log().iter().any(|l| l.contains("kiln-init: error node config from kilncfg is invalid")), "a clear console error");
    qmp(&n, "device_del", serde_json::json!({ "id": "stick0" }));
    // Without the stick, the ESP's file is the config: also invalid.
    maintenance_naming(&mut n, &["esp", "network.wait_secs", "line 4"]);
    // A stick with a valid config, plugged in while the node waits.
    plug(&n, "stick1", &good_stick);
    let loaded = n.event("config-loaded", Duration::from_secs(120));
    assert_eq!(loaded.get("source"), Some("kilncfg"), "{loaded:?}");
    assert_eq!(loaded.get("hostname"), Some("from-the-stick"), "{loaded:?}");
    assert!(loaded.get("dev").is_some_and(|d| d.starts_with("/dev/sd")), "config-loaded names the device: {loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    let checks = n.standin_checks();
    assert!(checks.iter().any(|l| l.contains("check hostname ok")), "{checks:#?}");
    power_off(&mut n);
    drop(n);

    // The technician fixes node.toml on the ESP; no stick.
    mcopy(&esp, "role = \"single\"\nhostname = \"from-the-esp\"\n", "node.toml");
    let mut n = boot_with("maint_esp_fixed", &out, None, |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk.clone());
    });
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("source"), Some("esp"), "{loaded:?}");
    assert_eq!(loaded.get("hostname"), Some("from-the-esp"), "{loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    let log = n.vm.log();
    assert!(!log.iter().any(|l| l.contains("kiln-init: maintenance")), "no maintenance with a valid config");
}

/// PXE boot, fw_cfg: a config whose TOML is fine but whose value is out of
/// range (found by validation, not by the TOML reader) gives maintenance
/// naming the key and line; the node still answers the power button; the
/// next boot with a valid config comes up.
#[test]
fn invalid_fw_cfg_then_a_valid_one_on_the_next_boot() {
    let out = built(PROFILE);
    let bad = "role = \"single\"\n\n[[network.interfaces]]\nname = \"eth0\"\nvlan = 5000\n";
    let mut n = boot_with("maint_fwcfg_bad", &out, Some(bad), |s| s.boot = BootFrom::Pxe);
    maintenance_naming(&mut n, &["fw_cfg", "network.interfaces[0].vlan", "line 5", "4094"]);
    // Quiet while waiting: the same problem is not announced again.
    let again = n.vm.wait_for("a repeated maintenance event", Duration::from_secs(20), |l| {
        kiln_contract::event::parse(l).is_some_and(|e| matches!(e.name.as_str(), "maintenance" | "payload-started"))
    });
    assert!(again.is_err(), "expected quiet maintenance, got {again:?}");
    power_off(&mut n);
    drop(n);

    let good = "role = \"single\"\nhostname = \"fixed-by-fwcfg\"\n";
    let mut n = boot_with("maint_fwcfg_good", &out, Some(good), |s| s.boot = BootFrom::Pxe);
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("source"), Some("fw_cfg"), "{loaded:?}");
    assert_eq!(loaded.get("hostname"), Some("fixed-by-fwcfg"), "{loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
}

/// Preflight failure is a wait, not a dead end. The kernel runs without the
/// memory cgroup controller (`cgroup_disable=memory`), which every role that
/// runs workloads needs: the image's default config (role single) is refused
/// with `preflight-failed` and `maintenance`, and the same config is not
/// tried again. A KILNCFG stick with a role this kernel can run (controller)
/// plugged in while the node waits brings it up, without a reboot.
#[test]
fn preflight_failure_waits_for_a_changed_config() {
    let out = built(PROFILE);
    let cmdline = std::fs::read_to_string(out.join("pxe/cmdline")).expect("pxe/cmdline");
    let append = format!("{} cgroup_disable=memory", cmdline.trim());
    let stick = config_stick("maint-controller-stick.img", "KILNCFG", "role = \"controller\"\nhostname = \"controller-only\"\n");
    let mut n = boot_with("maint_preflight", &out, None, |s| {
        s.boot = BootFrom::Pxe;
        // The last -append wins.
        s.extra_args = ["-append", &append, "-device", "qemu-xhci,id=xhci"].map(String::from).to_vec();
    });
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!((loaded.get("source"), loaded.get("role")), (Some("image"), Some("single")), "{loaded:?}");
    let failed = n.event("preflight-failed", Duration::from_secs(60));
    assert!(failed.get("missing").is_some_and(|m| m.contains("cgroup controller memory")), "{failed:?}");
    maintenance_naming(&mut n, &["preflight failed for role single", "memory"]);
    // Waiting quietly: the refused config is not loaded again.
    let again = n.vm.wait_for("the refused config loaded again", Duration::from_secs(15), |l| {
        kiln_contract::event::parse(l).is_some_and(|e| matches!(e.name.as_str(), "config-loaded" | "maintenance" | "payload-started"))
    });
    assert!(again.is_err(), "expected a quiet wait, got {again:?}");
    plug(&n, "stick1", &stick);
    let loaded = n.event("config-loaded", Duration::from_secs(120));
    assert_eq!((loaded.get("source"), loaded.get("role")), (Some("kilncfg"), Some("controller")), "{loaded:?}");
    n.event("preflight-ok", BOOT_TIMEOUT);
    let started = n.event("payload-started", BOOT_TIMEOUT);
    assert_eq!(started.get("role"), Some("controller"), "{started:?}");
}
