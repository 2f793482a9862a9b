//! Kernel modules without kmod: the index depmod writes under
//! `/lib/modules/<release>/` (`modules.dep`, `modules.alias`,
//! `modules.softdep`, `modules.builtin`, `modules.builtin.alias`, as text),
//! a loader that inserts a module after its dependencies with
//! `finit_module`, and kiln-init's `modprobe` personality, which the kernel
//! runs for `request_module` (`/sbin/modprobe -q -- fs-squashfs`).
//!
//! With kiln's own kernel (drivers built in) the index is empty or lists
//! only built-ins, and every load is a quiet no-op.

use super::console;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// `finit_module` flag: the kernel decompresses the file itself.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
const COMPRESSED: &[&str] = &[".ko.xz", ".ko.zst", ".ko.gz"];

/// `/lib/modules/<release>` of the running kernel.
pub fn modules_dir() -> PathBuf {
    Path::new("/lib/modules").join(release())
}

/// The running kernel's release (`uname -r`), without needing /proc.
#[allow(clippy::unnecessary_cast)]
pub fn release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

// ---- names and patterns -------------------------------------------------------

pub use kiln_contract::modules::{glob, name_of_path, normalise, normalise_alias};

/// The literal start of a pattern, before its first special character.
fn literal_prefix(pattern: &str) -> &str {
    let end = pattern.find(['*', '?', '[', '\\']).unwrap_or(pattern.len());
    &pattern[..end]
}

/// The bucket of a device alias: its bus (`pci` of `pci:v…`), or all of it
/// when it has no `:` (`fs_squashfs`).
fn bucket_of(alias: &str) -> &str {
    alias.split_once(':').map_or(alias, |(bus, _)| bus)
}

// ---- the index ------------------------------------------------------------------

/// One alias line: the normalised pattern, its literal prefix, the module.
#[derive(Debug, Clone)]
struct Alias {
    pattern: String,
    prefix: String,
    module: String,
}

/// Alias patterns bucketed by bus, so a `pci:` modalias is matched only
/// against `pci:` patterns (and the few whose bus is itself a glob).
#[derive(Debug, Default, Clone)]
struct Aliases {
    all: Vec<Alias>,
    by_bucket: BTreeMap<String, Vec<usize>>,
    /// Patterns with a glob before their bus's `:`, tried for every alias.
    anywhere: Vec<usize>,
}

impl Aliases {
    fn parse(text: &str) -> Aliases {
        let mut a = Aliases::default();
        for line in text.lines() {
            let mut w = line.split_whitespace();
            let (Some("alias"), Some(pattern), Some(module)) = (w.next(), w.next(), w.next()) else { continue };
            let pattern = normalise_alias(pattern);
            let prefix = literal_prefix(&pattern).to_string();
            let key = if prefix.contains(':') || prefix.len() == pattern.len() { Some(bucket_of(&prefix).to_string()) } else { None };
            let i = a.all.len();
            match key {
                Some(k) => a.by_bucket.entry(k).or_default().push(i),
                None => a.anywhere.push(i),
            }
            a.all.push(Alias { pattern, prefix, module: normalise(module) });
        }
        a
    }

    fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The modules whose pattern matches `alias` (normalised), each once:
    /// those of its bus in file order, then those matched anywhere.
    fn matches(&self, alias: &str) -> Vec<String> {
        let bus = self.by_bucket.get(bucket_of(alias)).map_or(&[][..], |v| &v[..]);
        let mut out: Vec<String> = Vec::new();
        for &i in bus.iter().chain(&self.anywhere) {
            let a = &self.all[i];
            if alias.starts_with(&a.prefix) && glob(&a.pattern, alias) && !out.contains(&a.module) {
                out.push(a.module.clone());
            }
        }
        out
    }
}

/// What `modules.softdep` says to load around a module.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Softdep {
    pub pre: Vec<String>,
    pub post: Vec<String>,
}

/// A loadable module.
#[derive(Debug, Default, Clone)]
struct Module {
    /// Its file, relative to the index's directory (or absolute).
    path: String,
    /// Its dependencies' names, in `modules.dep` order.
    deps: Vec<String>,
    soft: Softdep,
}

/// The module index of one kernel. Missing files make it empty, not wrong.
#[derive(Debug, Default, Clone)]
pub struct Index {
    dir: PathBuf,
    modules: BTreeMap<String, Module>,
    builtin: BTreeSet<String>,
    aliases: Aliases,
    builtin_aliases: Aliases,
}

impl Index {
    /// Reads the index in `dir` (`/lib/modules/<release>`).
    pub fn load(dir: &Path) -> Index {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let mut ix = Index { dir: dir.to_path_buf(), ..Index::default() };
        ix.parse_dep(&read("modules.dep"));
        ix.parse_softdep(&read("modules.softdep"));
        ix.builtin = read("modules.builtin").lines().map(str::trim).filter(|l| !l.is_empty()).map(name_of_path).collect();
        ix.aliases = Aliases::parse(&read("modules.alias"));
        ix.builtin_aliases = Aliases::parse(&read("modules.builtin.alias"));
        ix
    }

    fn parse_dep(&mut self, text: &str) {
        for line in text.lines() {
            let Some((module, deps)) = line.split_once(':') else { continue };
            let module = module.trim();
            if module.is_empty() || module.starts_with('#') {
                continue;
            }
            let deps = deps.split_whitespace().map(name_of_path).collect();
            self.modules.insert(name_of_path(module), Module { path: module.to_string(), deps, soft: Softdep::default() });
        }
    }

    /// Softdeps of modules in `modules.dep` (a built-in has none to load).
    fn parse_softdep(&mut self, text: &str) {
        for line in text.lines() {
            let mut w = line.split_whitespace();
            let (Some("softdep"), Some(module)) = (w.next(), w.next()) else { continue };
            let Some(sd) = self.modules.get_mut(&normalise(module)).map(|m| &mut m.soft) else { continue };
            let mut post = false;
            for word in w {
                match word {
                    "pre:" => post = false,
                    "post:" => post = true,
                    m if post => sd.post.push(normalise(m)),
                    m => sd.pre.push(normalise(m)),
                }
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `modules.alias` has anything: without it (kiln's own
    /// kernel) device aliases cannot load anything.
    pub fn has_aliases(&self) -> bool {
        !self.aliases.is_empty()
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalise(name))
    }

    /// Whether there is a file for module `name`.
    pub fn has_module(&self, name: &str) -> bool {
        self.modules.contains_key(&normalise(name))
    }

    /// The file of module `name`, as `modules.dep` names it.
    pub fn path(&self, name: &str) -> Option<&str> {
        self.modules.get(&normalise(name)).map(|m| m.path.as_str())
    }

    pub fn softdep(&self, name: &str) -> Option<&Softdep> {
        self.modules.get(&normalise(name)).map(|m| &m.soft)
    }

    /// Loadable modules whose `modules.alias` pattern matches a device
    /// alias (a modalias like `pci:v…`, or `fs-squashfs`).
    pub fn alias_matches(&self, alias: &str) -> Vec<String> {
        self.aliases.matches(&normalise_alias(alias))
    }

    /// Built-in modules whose `modules.builtin.alias` pattern matches.
    pub fn builtin_alias_matches(&self, alias: &str) -> Vec<String> {
        self.builtin_aliases.matches(&normalise_alias(alias))
    }

    /// What `modprobe NAME` would load: the module of that name (a file or
    /// a built-in), else the modules an alias names (`modules.alias`, then
    /// `modules.builtin.alias`). Empty when nothing does.
    pub fn resolve(&self, name_or_alias: &str) -> Vec<String> {
        let name = normalise(name_or_alias);
        if self.modules.contains_key(&name) || self.builtin.contains(&name) {
            return vec![name];
        }
        let m = self.alias_matches(name_or_alias);
        if !m.is_empty() {
            return m;
        }
        self.builtin_alias_matches(name_or_alias)
    }
}

// ---- loading --------------------------------------------------------------------

/// The kernel's side of loading, replaceable in tests.
pub trait Kernel: Send {
    /// Whether module `name` is in the kernel already.
    fn is_loaded(&self, name: &str) -> bool;
    /// Inserts the module file at `path`; "already loaded" is success.
    fn insert(&mut self, path: &Path) -> io::Result<()>;
}

/// The running kernel: `/sys/module` and `finit_module`.
pub struct SysKernel;

impl Kernel for SysKernel {
    fn is_loaded(&self, name: &str) -> bool {
        Path::new("/sys/module").join(name).exists()
    }

    fn insert(&mut self, path: &Path) -> io::Result<()> {
        finit_module(path)
    }
}

fn is_compressed(path: &str) -> bool {
    COMPRESSED.iter().any(|s| path.ends_with(s))
}

/// Inserts a module file; compressed ones are handed to the kernel to
/// decompress (Linux 6.1+ with CONFIG_MODULE_DECOMPRESS).
pub fn finit_module(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    let flags = if is_compressed(&path.to_string_lossy()) { MODULE_INIT_COMPRESSED_FILE } else { 0 };
    // SAFETY: a valid fd and an empty NUL-terminated parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), flags) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// Why a module is not in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// No file, no built-in, no alias of that name.
    NotFound(String),
    /// It (or a dependency) failed to insert; already reported.
    Failed(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::NotFound(n) => write!(f, "module {n} not found"),
            LoadError::Failed(n) => write!(f, "module {n} failed to load"),
        }
    }
}

/// The errno's text, without std's ` (os error N)`.
fn errno_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The one line reporting a failed insert.
/// `present`: the file is there (an ENOENT then came from the module's init).
pub fn describe_failure(name: &str, file: &str, e: &io::Error, present: bool) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM | libc::EKEYREJECTED | libc::ENOKEY) => Some("module signature rejected (Secure Boot lockdown?)"),
        Some(libc::ENOEXEC) => Some("built for another kernel"),
        Some(libc::EINVAL | libc::EOPNOTSUPP) if is_compressed(file) => Some("this kernel cannot load compressed modules (CONFIG_MODULE_DECOMPRESS); the image needs it uncompressed"),
        // open() failing, or the module's own init not finding something
        // it asks the kernel for (a crypto algorithm, a firmware file).
        Some(libc::ENOENT) if !present => Some("the file is not in the image"),
        Some(libc::ENOENT) => Some("its init found something it needs missing (a crypto algorithm or firmware; see dmesg)"),
        _ => None,
    };
    let mut s = format!("module {name} ({file}): {}", errno_text(e));
    if let Some(h) = hint {
        s.push_str(&format!(": {h}"));
    }
    s
}

/// Loads modules from an index, each at most once per process: a module
/// that failed is reported once and not tried again.
pub struct Loader {
    index: Index,
    kernel: Box<dyn Kernel>,
    warn: Box<dyn FnMut(&str) + Send>,
    /// Module → whether it is in the kernel (true while being loaded too,
    /// which ends softdep cycles).
    tried: BTreeMap<String, bool>,
}

impl Loader {
    pub fn new(index: Index, kernel: Box<dyn Kernel>, warn: Box<dyn FnMut(&str) + Send>) -> Loader {
        Loader { index, kernel, warn, tried: BTreeMap::new() }
    }

    /// The running kernel's modules; failures go to the console.
    pub fn system() -> Loader {
        Loader::new(Index::load(&modules_dir()), Box::new(SysKernel), Box::new(console::warn))
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Loads module `name` with its dependencies and softdeps. Ok with the
    /// modules newly inserted (none when built in or already loaded).
    pub fn load(&mut self, name: &str) -> Result<Vec<String>, LoadError> {
        let name = normalise(name);
        let known = self.tried.contains_key(&name) || self.index.is_builtin(&name) || self.index.has_module(&name);
        if !known && !self.kernel.is_loaded(&name) {
            return Err(LoadError::NotFound(name));
        }
        let mut loaded = Vec::new();
        if self.load_module(&name, &mut loaded) {
            Ok(loaded)
        } else {
            Err(LoadError::Failed(name))
        }
    }

    /// `modprobe NAME`: resolves a name or alias and loads what it names.
    /// Ok when at least one of those modules is in the kernel afterwards.
    pub fn probe(&mut self, name_or_alias: &str) -> Result<Vec<String>, LoadError> {
        let names = self.index.resolve(name_or_alias);
        if names.is_empty() {
            // Not in the index, yet perhaps in the kernel (an index that
            // does not list its built-ins).
            return self.load(name_or_alias);
        }
        let mut loaded = Vec::new();
        let mut result = Err(LoadError::NotFound(normalise(name_or_alias)));
        for m in names {
            match self.load(&m) {
                Ok(l) => {
                    loaded.extend(l);
                    result = Ok(());
                }
                Err(e @ LoadError::Failed(_)) if result.is_err() => result = Err(e),
                Err(_) => {}
            }
        }
        result.map(|()| loaded)
    }

    /// Loads every module whose `modules.alias` pattern matches a device's
    /// modalias (`modprobe -a`). Returns the modules matched and those
    /// newly inserted.
    pub fn load_matching(&mut self, modalias: &str) -> (Vec<String>, Vec<String>) {
        let matched = self.index.alias_matches(modalias);
        let mut loaded = Vec::new();
        for m in &matched {
            if let Ok(l) = self.load(m) {
                loaded.extend(l);
            }
        }
        (matched, loaded)
    }

    fn load_module(&mut self, name: &str, loaded: &mut Vec<String>) -> bool {
        if let Some(&ok) = self.tried.get(name) {
            return ok;
        }
        self.tried.insert(name.to_string(), true);
        if self.index.is_builtin(name) || self.kernel.is_loaded(name) {
            return true;
        }
        let Some(Module { path: file, deps, soft }) = self.index.modules.get(name).cloned() else {
            // A dependency without its own line in modules.dep (a broken
            // index): its dependent reports the failure.
            self.tried.insert(name.to_string(), false);
            return false;
        };
        self.load_soft(&soft.pre, loaded);
        // Like modprobe: the last dependency listed first.
        for d in deps.iter().rev() {
            if !self.load_module(d, loaded) {
                return self.fail(name, format!("module {name} ({file}): not loaded, it needs {d}, which failed"));
            }
        }
        let path = if Path::new(&file).is_absolute() { PathBuf::from(&file) } else { self.index.dir.join(&file) };
        if let Err(e) = self.kernel.insert(&path) {
            return self.fail(name, describe_failure(name, &file, &e, path.exists()));
        }
        loaded.push(name.to_string());
        self.load_soft(&soft.post, loaded);
        true
    }

    /// Softdeps are best effort: a failure is reported, nothing more.
    fn load_soft(&mut self, names: &[String], loaded: &mut Vec<String>) {
        for s in names {
            if self.index.has_module(s) || self.index.is_builtin(s) {
                self.load_module(s, loaded);
            }
        }
    }

    fn fail(&mut self, name: &str, msg: String) -> bool {
        self.tried.insert(name.to_string(), false);
        (self.warn)(&msg);
        false
    }
}

/// The loader PID 1 shares between stage code, coldplug and the hotplug
/// thread, so each module is tried once per boot stage.
pub fn shared() -> MutexGuard<'static, Loader> {
    static SHARED: OnceLock<Mutex<Loader>> = OnceLock::new();
    SHARED.get_or_init(|| Mutex::new(Loader::system())).lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads modules by name, best effort: returns those newly inserted and
/// those found nowhere (failures are already on the console).
pub fn load_all(names: &[&str]) -> (Vec<String>, Vec<String>) {
    let mut l = shared();
    let (mut loaded, mut missing) = (Vec::new(), Vec::new());
    for n in names {
        match l.probe(n) {
            Ok(m) => loaded.extend(m),
            Err(LoadError::NotFound(n)) => missing.push(n),
            Err(LoadError::Failed(_)) => {}
        }
    }
    (loaded, missing)
}

/// The modules a mount of `fstype` needs (the NLS tables FAT's default
/// mount options name), for mounting a volume.
pub fn fs_modules(fstype: &str) -> &[&str] {
    match fstype {
        "vfat" => &["vfat", "nls_cp437", "nls_iso8859_1", "nls_utf8", "nls_ascii"],
        "iso9660" => &["isofs"],
        "ext4" => &["ext4"],
        "squashfs" => &["squashfs"],
        _ => &[],
    }
}

/// Before mounting `fstype`: its modules, quiet when built in or absent.
pub fn load_for_fs(fstype: &str) {
    load_all(fs_modules(fstype));
}

// ---- modprobe -------------------------------------------------------------------------

/// `modprobe [-q] [-b] [-a] [--] NAME...`, as the kernel's usermode helper
/// and k0s call it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModprobeArgs {
    pub quiet: bool,
    pub verbose: bool,
    pub names: Vec<String>,
}

/// Whether this process was started as `modprobe` (a symlink to kiln-init).
pub fn invoked_as_modprobe(argv0: &str) -> bool {
    argv0.rsplit('/').next() == Some("modprobe")
}

pub fn parse_modprobe(args: &[String]) -> Result<ModprobeArgs, String> {
    let mut a = ModprobeArgs::default();
    let mut options = true;
    for arg in args {
        match arg.as_str() {
            "--" if options => options = false,
            "--quiet" if options => a.quiet = true,
            "--verbose" if options => a.verbose = true,
            "--all" | "--use-blacklist" | "--syslog" if options => {}
            s if options && s.starts_with("--") => return Err(format!("unsupported option {s}: kiln-init's modprobe only loads modules")),
            s if options && s.starts_with('-') && s.len() > 1 => {
                for c in s[1..].chars() {
                    match c {
                        'q' => a.quiet = true,
                        'v' => a.verbose = true,
                        'a' | 'b' | 's' => {}
                        c => return Err(format!("unsupported option -{c}: kiln-init's modprobe only loads modules")),
                    }
                }
            }
            s if s.contains('=') => return Err(format!("{s}: module parameters are not supported")),
            s => a.names.push(s.to_string()),
        }
    }
    if a.names.is_empty() {
        return Err("no module named (usage: modprobe [-q] [-a] [--] NAME...)".into());
    }
    Ok(a)
}

/// Runs as modprobe: loads each name, printing only to stderr. The exit
/// code is 0 when every name is in the kernel afterwards.
pub fn modprobe_main(args: &[String]) -> i32 {
    let a = match parse_modprobe(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("modprobe: {e}");
            return 1;
        }
    };
    let dir = modules_dir();
    let mut loader = Loader::new(Index::load(&dir), Box::new(SysKernel), Box::new(|m: &str| eprintln!("modprobe: {m}")));
    modprobe(&mut loader, &a, &mut |m| eprintln!("modprobe: {m}"))
}

/// The names of `a` through `loader`; `say` gets what modprobe prints.
fn modprobe(loader: &mut Loader, a: &ModprobeArgs, say: &mut dyn FnMut(&str)) -> i32 {
    let mut code = 0;
    for n in &a.names {
        match loader.probe(n) {
            Ok(loaded) if a.verbose => loaded.iter().for_each(|m| say(&format!("loaded {m}"))),
            Ok(_) => {}
            Err(LoadError::NotFound(_)) => {
                if !a.quiet {
                    say(&format!("module {n} not found in {}", loader.index().dir().display()));
                }
                code = 1;
            }
            Err(LoadError::Failed(_)) => code = 1,
        }
    }
    code
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::node::gpt::tests::tempdir;
    use std::sync::{Arc, Mutex};

    #[test]
    fn glob_basics_and_star_backtracking() {
        assert!(glob("abc", "abc"));
        assert!(!glob("abc", "abd"));
        assert!(!glob("abc", "ab"));
        assert!(!glob("ab", "abc"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*", ""));
        assert!(glob("a*", "a"));
        assert!(glob("*c", "abcbc"));
        // The first `*` must give back characters for the literal after it.
        assert!(glob("a*b*c", "axxbyybzc"));
        assert!(glob("*ab*ab", "abxabab"));
        assert!(!glob("a*b*c", "axxbyyb"));
        assert!(glob("pci:v00008086d000010D3sv*sd*bc*sc*i*", "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00"));
        assert!(!glob("pci:v00008086d000010D3sv*sd*bc*sc*i*", "pci:v00008086d000010D4sv00008086sd0000A01Fbc02sc00i00"));
        assert!(glob(r"a\*b", "a*b"));
        assert!(!glob(r"a\*b", "axb"));
    }

    #[test]
    fn glob_classes_ranges_and_negation() {
        assert!(glob("[abc]x", "bx"));
        assert!(!glob("[abc]x", "dx"));
        assert!(glob("v[0-9][0-9]", "v42"));
        assert!(!glob("v[0-9]", "va"));
        assert!(glob("[!0-9]", "a"));
        assert!(!glob("[!0-9]", "5"));
        assert!(glob("[^a]", "b"));
        assert!(!glob("[^a]", "a"));
        // `]` first in a class is a member; `-` last is literal.
        assert!(glob("[]a]", "]"));
        assert!(glob("[a-]", "-"));
        // Unclosed: a literal bracket.
        assert!(glob("[ab", "[ab"));
        assert!(!glob("[ab", "a"));
        // usb bcdDevice ranges as depmod writes them.
        let p = "usb:v05ACp12A8d0[0-2]*dc*dsc*dp*ic*isc*ip*in*";
        assert!(glob(p, "usb:v05ACp12A8d0150dc00dsc00dp00ic08isc06ip50in00"));
        assert!(!glob(p, "usb:v05ACp12A8d0350dc00dsc00dp00ic08isc06ip50in00"));
    }

    const DEP: &str = "\
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko: kernel/drivers/ptp/ptp.ko kernel/drivers/pps/pps_core.ko
kernel/drivers/ptp/ptp.ko: kernel/drivers/pps/pps_core.ko
kernel/drivers/pps/pps_core.ko:
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-bufio.ko:
kernel/drivers/md/dm-mod.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/lib/libcrc32c.ko: kernel/crypto/crc32c_generic.ko
kernel/fs/squashfs/squashfs.ko.xz:
";
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e
alias scsi:t-0x00* sd_mod
alias scsi:t-0x0e* sd_mod
alias fs-squashfs squashfs
alias devname:mapper/control dm_mod
alias char-major-10-236 dm_mod
alias crypto-crc32c crc32c_generic
alias crypto-crc32c crc32c-intel
alias acpi*:PNP0A03:* e1000e
";
    const SOFTDEP: &str = "softdep libcrc32c pre: crc32c_intel post: missing_one\nsoftdep crc32c_intel post: libcrc32c\n";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/drivers/block/loop.ko\n";
    const BUILTIN_ALIAS: &str = "alias fs-ext4 ext4\nalias block-major-7-* loop\n";

    /// A modules dir with the fixtures above.
    pub(crate) fn fixture_dir(alias: bool) -> crate::node::gpt::tests::Scratch {
        let d = tempdir("kmod");
        std::fs::write(d.join("modules.dep"), DEP).unwrap();
        if alias {
            std::fs::write(d.join("modules.alias"), ALIAS).unwrap();
        }
        std::fs::write(d.join("modules.softdep"), SOFTDEP).unwrap();
        std::fs::write(d.join("modules.builtin"), BUILTIN).unwrap();
        std::fs::write(d.join("modules.builtin.alias"), BUILTIN_ALIAS).unwrap();
        d
    }

    pub(crate) type OnInsert = Arc<dyn Fn(&str) + Send + Sync>;

    /// A kernel that records inserts (by module name) and fails some.
    #[derive(Clone, Default)]
    pub(crate) struct Fake {
        pub inserted: Arc<Mutex<Vec<String>>>,
        pub failing: Vec<(String, i32)>,
        pub preloaded: Vec<String>,
        /// Called with each inserted module (a bus driver adds devices).
        pub on_insert: Option<OnInsert>,
    }

    impl Kernel for Fake {
        fn is_loaded(&self, name: &str) -> bool {
            self.preloaded.iter().any(|p| p == name) || self.inserted.lock().unwrap().iter().any(|p| p == name)
        }

        fn insert(&mut self, path: &Path) -> io::Result<()> {
            assert!(path.is_absolute(), "{path:?}");
            let name = name_of_path(&path.to_string_lossy());
            if let Some((_, errno)) = self.failing.iter().find(|(n, _)| *n == name) {
                return Err(io::Error::from_raw_os_error(*errno));
            }
            self.inserted.lock().unwrap().push(name.clone());
            if let Some(f) = &self.on_insert {
                f(&name);
            }
            Ok(())
        }
    }

    pub(crate) fn loader(dir: &Path, fake: Fake) -> (Loader, Arc<Mutex<Vec<String>>>) {
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let w = warnings.clone();
        (Loader::new(Index::load(dir), Box::new(fake), Box::new(move |m: &str| w.lock().unwrap().push(m.to_string()))), warnings)
    }

    #[test]
    fn parses_the_index_files() {
        let d = fixture_dir(true);
        let ix = Index::load(&d);
        assert_eq!(ix.path("dm-verity"), Some("kernel/drivers/md/dm-verity.ko"));
        assert_eq!(ix.path("crc32c_intel"), Some("kernel/arch/x86/crypto/crc32c-intel.ko"));
        assert_eq!(ix.path("squashfs"), Some("kernel/fs/squashfs/squashfs.ko.xz"));
        assert_eq!(ix.modules["sd_mod"].deps, ["scsi_mod", "scsi_common"]);
        assert_eq!(ix.softdep("libcrc32c"), Some(&Softdep { pre: vec!["crc32c_intel".into()], post: vec!["missing_one".into()] }));
        assert!(ix.is_builtin("ext4") && ix.is_builtin("loop") && !ix.is_builtin("squashfs"));
        assert!(ix.has_aliases());
        assert_eq!(ix.dir(), &*d);

        let empty = Index::load(&d.join("nowhere"));
        assert!(!empty.has_aliases());
        assert!(empty.resolve("e1000e").is_empty());
    }

    #[test]
    fn resolves_names_and_aliases() {
        let d = fixture_dir(true);
        let ix = Index::load(&d);
        assert_eq!(ix.resolve("dm-verity"), ["dm_verity"]);
        assert_eq!(ix.resolve("dm_mod"), ["dm_mod"]);
        assert_eq!(ix.resolve("fs-squashfs"), ["squashfs"]);
        assert_eq!(ix.resolve("fs_squashfs"), ["squashfs"]);
        assert_eq!(ix.resolve("devname:mapper/control"), ["dm_mod"]);
        assert_eq!(ix.resolve("char-major-10-236"), ["dm_mod"]);
        // Every module an alias names, in file order, names normalised.
        assert_eq!(ix.resolve("crypto-crc32c"), ["crc32c_generic", "crc32c_intel"]);
        assert_eq!(ix.resolve("pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00"), ["e1000e"]);
        assert_eq!(ix.resolve("scsi:t-0x00"), ["sd_mod"]);
        assert_eq!(ix.resolve("acpi:PNP0A03:"), ["e1000e"]);
        // Built-ins by name and by built-in alias.
        assert_eq!(ix.resolve("ext4"), ["ext4"]);
        assert_eq!(ix.resolve("fs-ext4"), ["ext4"]);
        assert_eq!(ix.resolve("block-major-7-0"), ["loop"]);
        assert!(ix.resolve("nls_cp437").is_empty());
        assert!(ix.resolve("pci:v00001AF4d00001000sv*").is_empty());
        assert!(ix.builtin_alias_matches("fs-squashfs").is_empty());
    }

    #[test]
    fn many_aliases_match_quickly() {
        let mut text = String::new();
        for i in 0..4000 {
            text.push_str(&format!("alias pci:v0000{:04X}d0000{:04X}sv*sd*bc*sc*i* m{i}\n", 0x8000 + i % 200, i));
        }
        text.push_str("alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage\n");
        let a = Aliases::parse(&text);
        let t0 = std::time::Instant::now();
        for i in 0..300 {
            let m = a.matches(&format!("pci:v0000{:04X}d0000{:04X}sv00001AF4sd00001100bc01sc00i00", 0x8000 + i % 200, i));
            assert_eq!(m, [format!("m{i}")]);
        }
        assert_eq!(a.matches("usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00"), ["usb_storage"]);
        // Debug build, slow CI: still far below a boot's budget.
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn loads_dependencies_first_then_the_module() {
        let d = fixture_dir(true);
        let fake = Fake::default();
        let (mut l, warnings) = loader(&d, fake.clone());
        assert_eq!(l.load("e1000e"), Ok(vec!["pps_core".to_string(), "ptp".into(), "e1000e".into()]));
        assert_eq!(l.load("sd_mod").unwrap(), ["scsi_common", "scsi_mod", "sd_mod"]);
        // Already in: nothing to do.
        assert_eq!(l.load("e1000e"), Ok(vec![]));
        assert_eq!(l.load("dm-verity").unwrap(), ["dm_mod", "dm_bufio", "dm_verity"]);
        assert_eq!(*fake.inserted.lock().unwrap(), ["pps_core", "ptp", "e1000e", "scsi_common", "scsi_mod", "sd_mod", "dm_mod", "dm_bufio", "dm_verity"]);
        assert!(warnings.lock().unwrap().is_empty());
    }

    #[test]
    fn softdeps_come_before_and_after() {
        let d = fixture_dir(true);
        let fake = Fake::default();
        let (mut l, warnings) = loader(&d, fake.clone());
        // libcrc32c: pre crc32c_intel, whose post is libcrc32c again (a
        // cycle), then its dependency, itself, and a post that is absent.
        assert_eq!(l.load("libcrc32c").unwrap(), ["crc32c_intel", "crc32c_generic", "libcrc32c"]);
        assert!(warnings.lock().unwrap().is_empty(), "{:?}", warnings.lock().unwrap());
    }

    #[test]
    fn builtin_and_loaded_modules_are_skipped() {
        let d = fixture_dir(true);
        let fake = Fake { preloaded: vec!["scsi_mod".into()], ..Fake::default() };
        let (mut l, _) = loader(&d, fake.clone());
        assert_eq!(l.load("ext4"), Ok(vec![]));
        assert_eq!(l.probe("fs-ext4"), Ok(vec![]));
        assert_eq!(l.load("sd_mod").unwrap(), ["scsi_common", "sd_mod"]);
        assert_eq!(l.load("nls_cp437"), Err(LoadError::NotFound("nls_cp437".into())));
        // In the kernel though the index does not say so: fine.
        let (mut l2, _) = loader(&d, Fake { preloaded: vec!["overlay".into()], ..Fake::default() });
        assert_eq!(l2.probe("overlay"), Ok(vec![]));
        assert_eq!(l.probe("fs-vfat"), Err(LoadError::NotFound("fs_vfat".into())));
        assert_eq!(*fake.inserted.lock().unwrap(), ["scsi_common", "sd_mod"]);
    }

    #[test]
    fn a_failure_is_reported_once_and_fails_its_dependents() {
        let d = fixture_dir(true);
        let fake = Fake { failing: vec![("pps_core".into(), libc::ENOEXEC), ("squashfs".into(), libc::EOPNOTSUPP)], ..Fake::default() };
        let (mut l, warnings) = loader(&d, fake.clone());
        assert_eq!(l.load("e1000e"), Err(LoadError::Failed("e1000e".into())));
        assert_eq!(l.load("ptp"), Err(LoadError::Failed("ptp".into())));
        assert_eq!(l.probe("fs-squashfs"), Err(LoadError::Failed("squashfs".into())));
        assert_eq!(l.probe("fs-squashfs"), Err(LoadError::Failed("squashfs".into())));
        assert!(fake.inserted.lock().unwrap().is_empty());
        let w = warnings.lock().unwrap();
        assert_eq!(
            *w,
            [
                "module pps_core (kernel/drivers/pps/pps_core.ko): Exec format error: built for another kernel",
                "module e1000e (kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko): not loaded, it needs pps_core, which failed",
                "module ptp (kernel/drivers/ptp/ptp.ko): not loaded, it needs pps_core, which failed",
                "module squashfs (kernel/fs/squashfs/squashfs.ko.xz): Operation not supported: this kernel cannot load compressed modules (CONFIG_MODULE_DECOMPRESS); the image needs it uncompressed",
            ]
        );
    }

    #[test]
    fn failure_lines() {
        let f = |errno| describe_failure("e1000e", "kernel/e1000e.ko", &io::Error::from_raw_os_error(errno), true);
        assert_eq!(f(libc::EINVAL), "module e1000e (kernel/e1000e.ko): Invalid argument");
        assert!(f(libc::EKEYREJECTED).ends_with(": module signature rejected (Secure Boot lockdown?)"));
        assert!(f(libc::EPERM).ends_with(": module signature rejected (Secure Boot lockdown?)"));
        assert!(f(libc::ENOEXEC).ends_with(": built for another kernel"));
        assert!(!f(libc::ENOEXEC).contains("os error"));
        assert!(f(libc::ENOENT).ends_with("(a crypto algorithm or firmware; see dmesg)"));
        let gone = describe_failure("e1000e", "kernel/e1000e.ko", &io::Error::from_raw_os_error(libc::ENOENT), false);
        assert!(gone.ends_with(": the file is not in the image"), "{gone}");
    }

    #[test]
    fn modprobe_arguments() {
        let p = |a: &[&str]| parse_modprobe(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(p(&["-q", "--", "fs-squashfs"]), Ok(ModprobeArgs { quiet: true, verbose: false, names: vec!["fs-squashfs".into()] }));
        assert_eq!(p(&["-qb", "-a", "overlay", "veth"]).unwrap().names, ["overlay", "veth"]);
        assert!(p(&["-qb"]).unwrap_err().contains("no module"));
        assert!(p(&["-r", "overlay"]).unwrap_err().contains("-r"));
        assert!(p(&["--remove", "overlay"]).unwrap_err().contains("--remove"));
        assert!(p(&["dummy", "numdummies=2"]).unwrap_err().contains("parameters"));
        // After `--`, a dash starts a name.
        assert_eq!(p(&["--", "-odd"]).unwrap().names, ["-odd"]);
        assert!(invoked_as_modprobe("/sbin/modprobe") && invoked_as_modprobe("modprobe"));
        assert!(!invoked_as_modprobe("/sbin/kiln-init"));
    }

    #[test]
    fn modprobe_exit_codes() {
        let d = fixture_dir(true);
        let (mut l, _) = loader(&d, Fake::default());
        let mut said = Vec::new();
        let args = |q: bool, names: &[&str]| ModprobeArgs { quiet: q, verbose: false, names: names.iter().map(|s| s.to_string()).collect() };
        assert_eq!(modprobe(&mut l, &args(true, &["fs-squashfs", "ext4"]), &mut |m| said.push(m.to_string())), 0);
        assert_eq!(modprobe(&mut l, &args(true, &["fs-btrfs"]), &mut |m| said.push(m.to_string())), 1);
        assert!(said.is_empty(), "-q is quiet about missing modules: {said:?}");
        assert_eq!(modprobe(&mut l, &args(false, &["fs-btrfs", "dm-mod"]), &mut |m| said.push(m.to_string())), 1);
        assert_eq!(said, [format!("module fs-btrfs not found in {}", d.display())]);
    }
}
