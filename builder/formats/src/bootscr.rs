//! `boot.scr` for u-boot boards: the A/B slot choice and its boot counter,
//! as a u-boot script in the legacy image format (`mkimage -T script`).
//!
//! u-boot's distro boot runs `/boot.scr` from the boot partition. The
//! script reads `/kiln/state` (`kiln_good=a`, and while an update is on
//! trial `kiln_try=b` and `kiln_tries=N`), takes a try by writing the state
//! back with one less, and boots `/kiln/<slot>/extlinux.conf` with
//! `sysboot`; once the tries are spent it boots the good slot. A trial
//! slot whose files do not load (a cut write) falls through to the good
//! slot in the same boot. So the
//! fallback needs nothing from the new image, as systemd-boot's counting on
//! UEFI. kiln-init marks a trial good (`kiln_good=<slot>`, no try) and
//! installs new trials; see kiln-init's node::update.
//!
//! It uses only commands Debian's u-boot builds have (`load`, `env
//! import`/`export`, `itest`, `fatwrite`, `sysboot`). It takes a try with
//! an `itest` chain rather than `setexpr`, which Debian's am335x builds
//! (BeagleBone Black) leave out: there the trial's tries would never go
//! down. u-boot's own `bootcount` is built into few boards and keeps its
//! count in places (RAM, an RTC, the environment) that differ per board.

use crate::gpt::crc32;

/// The script's path on the boot FAT.
pub const PATH: &str = "/boot.scr";

/// The script text.
pub fn script() -> String {
    [
        "# kiln: A/B slot choice with a boot counter (written by kiln build).",
        "setenv kiln_good a",
        "setenv kiln_try",
        "setenv kiln_tries 0",
        "if load ${devtype} ${devnum}:${distro_bootpart} ${scriptaddr} /kiln/state; then env import -t ${scriptaddr} ${filesize} kiln_good kiln_try kiln_tries; fi",
        "setenv kiln_slot ${kiln_good}",
        "if test -n \"${kiln_try}\" && itest ${kiln_tries} > 0; then",
        "  if itest ${kiln_tries} == 1; then setenv kiln_tries 0",
        "  elif itest ${kiln_tries} == 2; then setenv kiln_tries 1",
        "  elif itest ${kiln_tries} == 3; then setenv kiln_tries 2",
        "  elif itest ${kiln_tries} == 4; then setenv kiln_tries 3",
        "  elif itest ${kiln_tries} == 5; then setenv kiln_tries 4",
        "  elif itest ${kiln_tries} == 6; then setenv kiln_tries 5",
        "  elif itest ${kiln_tries} == 7; then setenv kiln_tries 6",
        "  elif itest ${kiln_tries} == 8; then setenv kiln_tries 7",
        "  else setenv kiln_tries 8",
        "  fi",
        "  setenv kiln_slot ${kiln_try}",
        "  env export -t ${scriptaddr} kiln_good kiln_try kiln_tries",
        "  fatwrite ${devtype} ${devnum}:${distro_bootpart} ${scriptaddr} /kiln/state ${filesize}",
        "fi",
        "echo \"kiln: slot ${kiln_slot} (good ${kiln_good}, trying ${kiln_try} with ${kiln_tries} tries left)\"",
        "sysboot ${devtype} ${devnum}:${distro_bootpart} any ${scriptaddr} /kiln/${kiln_slot}/extlinux.conf",
        "echo \"kiln: /kiln/${kiln_slot}/extlinux.conf did not boot\"",
        "if test \"${kiln_slot}\" != \"${kiln_good}\"; then sysboot ${devtype} ${devnum}:${distro_bootpart} any ${scriptaddr} /kiln/${kiln_good}/extlinux.conf; fi",
        "",
    ]
    .join("\n")
}

/// What a u-boot script needs from the u-boot that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    /// Every command it runs, sorted, once; `env`'s with the sub-command
    /// (`env import`), since each is compiled in on its own.
    pub commands: Vec<String>,
    /// It uses the hush shell: `if`/`then`/`fi`, `while`, `&&` or `||`.
    pub hush: bool,
}

/// Hush keywords after which a new command starts.
const STARTS: [&str; 7] = ["if", "elif", "then", "else", "while", "until", "do"];
/// Hush keywords that end a compound command.
const ENDS: [&str; 3] = ["fi", "done", "!"];

/// The commands `text` runs, read as u-boot's hush shell reads it: a
/// command is the first word of a line, or the word after `;`, `&&`, `||`
/// or a keyword that starts one (`if`, `then`, `else`, …). Words inside
/// quotes are never commands; `#` starts a comment at a word's start.
pub fn needs(text: &str) -> Needs {
    let mut commands = Vec::new();
    let mut hush = false;
    for line in text.lines() {
        let mut at_start = true;
        // (word, ends with `;`) in order; the previous word for `env`'s
        // sub-command.
        let mut last_cmd: Option<String> = None;
        for (word, quoted, semicolon) in words(line) {
            if !quoted && word.starts_with('#') {
                break;
            }
            if !quoted && (word == "&&" || word == "||") {
                hush = true;
                at_start = true;
                last_cmd = None;
                continue;
            }
            if let Some(cmd) = last_cmd.take() {
                if cmd == "env" && !word.is_empty() && !quoted {
                    commands.push(format!("env {word}"));
                }
            }
            if at_start && !quoted && !word.is_empty() {
                if STARTS.contains(&word.as_str()) || ENDS.contains(&word.as_str()) {
                    hush = true;
                    at_start = STARTS.contains(&word.as_str());
                } else {
                    commands.push(word.clone());
                    last_cmd = Some(word);
                    at_start = false;
                }
            }
            if semicolon {
                at_start = true;
                last_cmd = None;
            }
        }
    }
    commands.sort();
    commands.dedup();
    Needs { commands, hush }
}

/// The words of a line: (text, had quotes, followed by an unquoted `;`).
fn words(line: &str) -> Vec<(String, bool, bool)> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut in_q) = (String::new(), false, None::<char>);
    let flush = |cur: &mut String, quoted: &mut bool, semi: bool, out: &mut Vec<(String, bool, bool)>| {
        if !cur.is_empty() || *quoted || semi {
            out.push((std::mem::take(cur), *quoted, semi));
        }
        *quoted = false;
    };
    for c in line.chars() {
        match (in_q, c) {
            (Some(q), c) if c == q => in_q = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                in_q = Some(c);
                quoted = true;
            }
            (None, ';') => flush(&mut cur, &mut quoted, true, &mut out),
            (None, c) if c.is_whitespace() => flush(&mut cur, &mut quoted, false, &mut out),
            (None, c) => cur.push(c),
        }
    }
    flush(&mut cur, &mut quoted, false, &mut out);
    out
}

const MAGIC: u32 = 0x2705_1956;
const OS_LINUX: u8 = 5;
const ARCH_ARM: u8 = 2;
const TYPE_SCRIPT: u8 = 6;
const COMP_NONE: u8 = 0;

/// `text` as `mkimage -A arm -T script -C none -n <name>` writes it (with
/// `SOURCE_DATE_EPOCH=<time>`): a 64-byte legacy header, then one sub-image
/// (its length, a zero terminator, the text).
pub fn image(text: &str, name: &str, time: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(text.len() + 12);
    data.extend_from_slice(&(text.len() as u32).to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    // mkimage pads a sub-image to 4 bytes only when another follows.
    data.extend_from_slice(text.as_bytes());
    let mut h = [0u8; 64];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&time.to_be_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    h[24..28].copy_from_slice(&crc32(&data).to_be_bytes());
    h[28] = OS_LINUX;
    h[29] = ARCH_ARM;
    h[30] = TYPE_SCRIPT;
    h[31] = COMP_NONE;
    let n = name.as_bytes();
    h[32..32 + n.len().min(31)].copy_from_slice(&n[..n.len().min(31)]);
    let hcrc = crc32(&h);
    h[4..8].copy_from_slice(&hcrc.to_be_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_as_mkimage() {
        let Some(mkimage) = kiln_testkit::checker("mkimage", "u-boot-tools") else {
            return;
        };
        let out = std::process::Command::new(&mkimage)
            .arg("-V")
            .output()
            .unwrap();
        assert!(out.status.success());
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("boot.cmd");
        let dst = d.path().join("boot.scr");
        for text in [script(), "echo odd length\n".to_string(), "echo odder length\n".to_string()] {
            std::fs::write(&src, &text).unwrap();
            let r = std::process::Command::new(&mkimage)
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .args(["-A", "arm", "-O", "linux", "-T", "script", "-C", "none", "-n", "kiln"])
                .arg("-d")
                .arg(&src)
                .arg(&dst)
                .output()
                .unwrap();
            assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
            assert_eq!(image(&text, "kiln", 1_700_000_000), std::fs::read(&dst).unwrap());
        }
    }

    #[test]
    fn needs_lists_the_commands_a_script_runs() {
        let n = needs(&script());
        assert!(n.hush);
        assert_eq!(n.commands, ["echo", "env", "env export", "env import", "fatwrite", "itest", "load", "setenv", "sysboot", "test"]);
        let n = needs("# setexpr in a comment\nsetenv a \"if x; then setexpr\"; setexpr b 1 + 1 # bootz\nwhile itest 1 == 0; do true; done\n");
        assert_eq!(n.commands, ["itest", "setenv", "setexpr", "true"]);
        assert!(n.hush);
        assert!(!needs("setenv a b\nboot\n").hush);
    }

    #[test]
    fn the_script_reads_and_writes_the_state_it_boots_by() {
        let s = script();
        let state = format!("/{}", kiln_contract::uboot::STATE);
        assert!(s.contains(&state) && s.contains("fatwrite") && s.contains("/kiln/${kiln_slot}/extlinux.conf"));
    }
}
