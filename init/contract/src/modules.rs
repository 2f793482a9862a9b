//! Kernel modules kiln-init loads by name. With a distro kernel (drivers as
//! modules) the builder reads these lists to decide which `.ko` files go
//! into the initramfs and the root; with kiln's own kernel they are built in
//! and loading them is a no-op.

/// What stage 1 needs to find, verify and mount the root, /var and the ESP,
/// and to read a `KILNCFG` volume: loaded before it looks for the root.
/// (`nls_ascii`: the FAT_DEFAULT_IOCHARSET of Debian's kernel; vfat refuses
/// to mount without it.)
pub const STAGE1_MODULES: &[&str] = &["dm_mod", "dm_verity", "squashfs", "ext4", "vfat", "nls_cp437", "nls_iso8859_1", "nls_utf8", "isofs", "loop", "nls_ascii"];

/// What k0s modprobes at worker start: stage 2 loads them first, with their
/// dependencies, so it never has to.
pub const K0S_MODULES: &[&str] = &["overlay", "nf_conntrack", "br_netfilter", "ip_tables", "xt_conntrack", "veth", "vxlan"];

/// A module name as the kernel spells it: `dm-verity` is `dm_verity`.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a `modules.dep` path (`kernel/fs/ext4/ext4.ko.xz`).
pub fn name_of_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalise(file.split(".ko").next().unwrap_or(file))
}

/// An alias as kmod compares it: dashes are underscores, except inside
/// `[...]` classes where a dash is a range.
pub fn normalise_alias(alias: &str) -> String {
    let mut out = String::with_capacity(alias.len());
    let mut in_class = false;
    for c in alias.chars() {
        match c {
            '[' => in_class = true,
            ']' => in_class = false,
            '-' if !in_class => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// fnmatch(3) without flags, as kmod matches `modules.alias`: `*`, `?`,
/// `[...]` classes with ranges and `!`/`^` negation, `\` escapes.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    // Where to resume after the last `*`: the pattern after it, and the next
    // string position it would swallow up to.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if p.get(pi) == Some(&b'*') {
            pi += 1;
            star = Some((pi, si));
            continue;
        }
        if let Some(next) = step(p, pi, s[si]) {
            pi = next;
            si += 1;
            continue;
        }
        match star {
            Some((sp, ss)) => {
                pi = sp;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Matches one pattern element (not `*`) at `pi` against `c`; the index of
/// the next element when it matches.
fn step(p: &[u8], pi: usize, c: u8) -> Option<usize> {
    match *p.get(pi)? {
        b'?' => Some(pi + 1),
        b'[' => match class(p, pi + 1, c) {
            Some((true, end)) => Some(end),
            Some((false, _)) => None,
            // No closing bracket: a literal `[`.
            None => (c == b'[').then_some(pi + 1),
        },
        b'\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        lit => (lit == c).then_some(pi + 1),
    }
}

/// A bracket class starting after its `[`: whether `c` is in it, and the
/// index after its `]`. None when the class is not closed.
fn class(p: &[u8], mut i: usize, c: u8) -> Option<(bool, usize)> {
    let negate = matches!(p.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let lo = *p.get(i)?;
        if lo == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&hi| hi != b']') {
            hit |= (lo..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            hit |= lo == c;
            i += 1;
        }
    }
}
