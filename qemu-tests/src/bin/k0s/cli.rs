//! The k0s command line, parsed the way cobra and pflag parse it, so that a
//! command line kiln-init builds for real k0s is accepted or refused here
//! exactly as k0s would.

use std::fmt;

pub const VERSION_LINE: &str = "v0.0.0-stand-in (kiln test fixture, not k0s)";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/k0s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Controller,
    Worker,
}

impl Sub {
    fn name(self) -> &'static str {
        match self {
            Sub::Controller => "controller",
            Sub::Worker => "worker",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Version,
    Help(Option<Sub>),
    Run(Box<RunOpts>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Controller,
    ControllerWorker,
    Single,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::ControllerWorker => "controller+worker",
            Role::Single => "single",
            Role::Worker => "worker",
        }
    }
}

/// Where the join token comes from. k0s takes exactly one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(String),
    Argument(String),
    Env(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOpts {
    pub sub: Sub,
    pub config: Option<String>,
    pub data_dir: Option<String>,
    pub single: bool,
    pub enable_worker: bool,
    pub no_taints: bool,
    pub token: Option<TokenSource>,
    pub labels: Vec<String>,
    pub taints: Vec<String>,
    pub kubelet_extra_args: Option<String>,
    pub disable_components: Vec<String>,
    pub ignore_pre_flight_checks: bool,
    pub verbose: bool,
    pub debug: bool,
    pub kubelet_root_dir: Option<String>,
    pub init_only: bool,
    pub feature_gates: Vec<String>,
}

impl RunOpts {
    fn new(sub: Sub) -> Self {
        RunOpts {
            sub,
            config: None,
            data_dir: None,
            single: false,
            enable_worker: false,
            no_taints: false,
            token: None,
            labels: Vec::new(),
            taints: Vec::new(),
            kubelet_extra_args: None,
            disable_components: Vec::new(),
            ignore_pre_flight_checks: false,
            verbose: false,
            debug: false,
            kubelet_root_dir: None,
            init_only: false,
            feature_gates: Vec::new(),
        }
    }

    pub fn role(&self) -> Role {
        match self.sub {
            Sub::Worker => Role::Worker,
            Sub::Controller if self.single => Role::Single,
            Sub::Controller if self.enable_worker => Role::ControllerWorker,
            Sub::Controller => Role::Controller,
        }
    }

    pub fn data_dir(&self) -> &str {
        self.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR)
    }
}

/// A usage error. Displayed after `Error: `, as cobra does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Str,
    /// Repeatable; each value may itself be comma-separated.
    List,
}

const C: u8 = 1;
const W: u8 = 2;

struct Spec {
    long: &'static str,
    short: Option<char>,
    kind: Kind,
    subs: u8,
    help: &'static str,
}

const fn spec(
    long: &'static str,
    short: Option<char>,
    kind: Kind,
    subs: u8,
    help: &'static str,
) -> Spec {
    Spec {
        long,
        short,
        kind,
        subs,
        help,
    }
}

static FLAGS: &[Spec] = &[
    spec(
        "config",
        None,
        Kind::Str,
        C,
        "controller config file (ClusterConfig)",
    ),
    spec(
        "data-dir",
        None,
        Kind::Str,
        C | W,
        "data directory (default /var/lib/k0s)",
    ),
    spec(
        "single",
        None,
        Kind::Bool,
        C,
        "single-node cluster (kine, no konnectivity)",
    ),
    spec("enable-worker", None, Kind::Bool, C, "also run the kubelet"),
    spec(
        "no-taints",
        None,
        Kind::Bool,
        C,
        "do not taint a controller that runs a worker",
    ),
    spec(
        "token-file",
        None,
        Kind::Str,
        C | W,
        "file holding the join token",
    ),
    spec("labels", None, Kind::List, C | W, "node labels, k=v,..."),
    spec(
        "taints",
        None,
        Kind::List,
        C | W,
        "node taints, k=v:Effect,...",
    ),
    spec(
        "kubelet-extra-args",
        None,
        Kind::Str,
        C | W,
        "extra kubelet arguments",
    ),
    spec(
        "disable-components",
        None,
        Kind::List,
        C,
        "components not to run, a,b,...",
    ),
    spec(
        "ignore-pre-flight-checks",
        None,
        Kind::Bool,
        C,
        "do not stop on failed pre-flight checks",
    ),
    spec("verbose", Some('v'), Kind::Bool, C | W, "verbose logging"),
    spec("debug", Some('d'), Kind::Bool, C | W, "debug logging"),
    spec(
        "kubelet-root-dir",
        None,
        Kind::Str,
        C | W,
        "kubelet root directory (k0s 1.31+)",
    ),
    spec(
        "init-only",
        None,
        Kind::Bool,
        C,
        "initialise and exit (k0s 1.33+)",
    ),
    spec(
        "feature-gates",
        None,
        Kind::List,
        C,
        "feature gates (k0s 1.34+)",
    ),
    spec("help", Some('h'), Kind::Bool, C | W, "print this help"),
];

fn bit(sub: Sub) -> u8 {
    match sub {
        Sub::Controller => C,
        Sub::Worker => W,
    }
}

fn find_long(sub: Sub, name: &str) -> Option<&'static Spec> {
    FLAGS
        .iter()
        .find(|s| s.long == name && s.subs & bit(sub) != 0)
}

fn find_short(sub: Sub, c: char) -> Option<&'static Spec> {
    FLAGS
        .iter()
        .find(|s| s.short == Some(c) && s.subs & bit(sub) != 0)
}

/// Go's strconv.ParseBool, which pflag uses.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn flag_display(s: &Spec) -> String {
    match s.short {
        Some(c) => format!("-{c}, --{}", s.long),
        None => format!("--{}", s.long),
    }
}

/// Collected flag values before they are checked as a whole.
struct Parsed {
    opts: RunOpts,
    token_file: Option<String>,
    help: bool,
}

fn apply(p: &mut Parsed, s: &Spec, value: Option<&str>) -> Result<(), UsageError> {
    if s.kind == Kind::Bool {
        let b = match value {
            None => true,
            Some(v) => match parse_bool(v) {
                Some(b) => b,
                None => {
                    return usage(format!(
                        "invalid argument {v:?} for {:?} flag: strconv.ParseBool: parsing {v:?}: invalid syntax",
                        flag_display(s)
                    ))
                }
            },
        };
        let o = &mut p.opts;
        match s.long {
            "single" => o.single = b,
            "enable-worker" => o.enable_worker = b,
            "no-taints" => o.no_taints = b,
            "ignore-pre-flight-checks" => o.ignore_pre_flight_checks = b,
            "verbose" => o.verbose = b,
            "debug" => o.debug = b,
            "init-only" => o.init_only = b,
            "help" => p.help = b,
            _ => {}
        }
        return Ok(());
    }
    let v = value.unwrap_or_default().to_string();
    if s.long == "labels" {
        // pflag's StringToString refuses an item without '='.
        for item in v.split(',').filter(|_| !v.is_empty()) {
            if !item.contains('=') {
                return usage(format!(
                    "invalid argument {v:?} for \"--labels\" flag: {item} must be formatted as key=value"
                ));
            }
        }
    }
    let o = &mut p.opts;
    match s.long {
        "config" => o.config = Some(v),
        "data-dir" => o.data_dir = Some(v),
        "token-file" => p.token_file = Some(v),
        "kubelet-extra-args" => o.kubelet_extra_args = Some(v),
        "kubelet-root-dir" => o.kubelet_root_dir = Some(v),
        "labels" => o.labels.push(v),
        "taints" => o.taints.push(v),
        "disable-components" => o.disable_components.push(v),
        "feature-gates" => o.feature_gates.push(v),
        _ => {}
    }
    Ok(())
}

/// Parses the whole argv (argv[0] included). `k0s_token` is the K0S_TOKEN
/// environment variable, a token source for workers.
pub fn parse(argv: &[String], k0s_token: Option<&str>) -> Result<Command, UsageError> {
    let args = argv.get(1..).unwrap_or_default();
    let Some(first) = args.first() else {
        return Ok(Command::Help(None));
    };
    let rest = &args[1..];
    let sub = match first.as_str() {
        "version" => {
            return match rest.first().map(String::as_str) {
                None => Ok(Command::Version),
                Some("-h" | "--help") => Ok(Command::Help(None)),
                Some(a) if a.starts_with('-') && a.len() > 1 => usage(unknown_flag(a)),
                Some(_) => usage(format!("accepts 0 arg(s), received {}", rest.len())),
            }
        }
        "help" => {
            return match rest.first().map(String::as_str) {
                None => Ok(Command::Help(None)),
                Some("controller") => Ok(Command::Help(Some(Sub::Controller))),
                Some("worker") => Ok(Command::Help(Some(Sub::Worker))),
                Some(other) => usage(format!("unknown help topic {other:?}")),
            }
        }
        "-h" | "--help" => return Ok(Command::Help(None)),
        "controller" => Sub::Controller,
        "worker" => Sub::Worker,
        a if a.starts_with('-') && a.len() > 1 => return usage(unknown_flag(a)),
        other => return usage(format!("unknown command {other:?} for \"k0s\"")),
    };
    parse_sub(sub, rest, k0s_token)
}

/// pflag's message for a flag it does not know.
fn unknown_flag(arg: &str) -> String {
    if let Some(long) = arg.strip_prefix("--") {
        let name = long.split_once('=').map_or(long, |(n, _)| n);
        format!("unknown flag: --{name}")
    } else {
        let c = arg.chars().nth(1).unwrap_or('-');
        format!("unknown shorthand flag: '{c}' in {arg}")
    }
}

fn parse_sub(sub: Sub, args: &[String], k0s_token: Option<&str>) -> Result<Command, UsageError> {
    let mut p = Parsed {
        opts: RunOpts::new(sub),
        token_file: None,
        help: false,
    };
    let mut positionals: Vec<String> = Vec::new();
    let mut i = 0;
    let mut only_positionals = false;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if only_positionals || arg == "-" || !arg.starts_with('-') {
            positionals.push(arg.clone());
            continue;
        }
        if arg == "--" {
            only_positionals = true;
            continue;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            if name.is_empty() || name.starts_with('-') {
                return usage(format!("bad flag syntax: {arg}"));
            }
            let Some(s) = find_long(sub, name) else {
                return usage(format!("unknown flag: --{name}"));
            };
            let value = match (s.kind, inline) {
                (Kind::Bool, v) => v,
                (_, Some(v)) => Some(v),
                (_, None) => match args.get(i) {
                    Some(next) => {
                        i += 1;
                        Some(next.as_str())
                    }
                    None => return usage(format!("flag needs an argument: --{name}")),
                },
            };
            apply(&mut p, s, value)?;
        } else {
            // A group of shorthands, like -vd or -v=false.
            let group = &arg[1..];
            for (at, c) in group.char_indices() {
                let Some(s) = find_short(sub, c) else {
                    return usage(format!("unknown shorthand flag: '{c}' in {arg}"));
                };
                let after = &group[at + c.len_utf8()..];
                if s.kind == Kind::Bool {
                    if let Some(v) = after.strip_prefix('=') {
                        apply(&mut p, s, Some(v))?;
                        break;
                    }
                    apply(&mut p, s, None)?;
                    continue;
                }
                let value = if let Some(v) = after.strip_prefix('=') {
                    v
                } else if !after.is_empty() {
                    after
                } else if let Some(next) = args.get(i) {
                    i += 1;
                    next.as_str()
                } else {
                    return usage(format!("flag needs an argument: '{c}' in {arg}"));
                };
                apply(&mut p, s, Some(value))?;
                break;
            }
        }
    }
    if p.help {
        return Ok(Command::Help(Some(sub)));
    }
    if positionals.len() > 1 {
        return usage(format!(
            "accepts at most 1 arg(s), received {}",
            positionals.len()
        ));
    }
    let mut sources: Vec<TokenSource> = Vec::new();
    if let Some(f) = p.token_file.take() {
        sources.push(TokenSource::File(f));
    }
    if let Some(t) = positionals.pop() {
        sources.push(TokenSource::Argument(t));
    }
    // K0S_TOKEN is a worker token source since k0s 1.35.
    if sub == Sub::Worker {
        if let Some(t) = k0s_token.filter(|t| !t.is_empty()) {
            sources.push(TokenSource::Env(t.to_string()));
        }
    }
    if sources.len() > 1 {
        let mut names: Vec<&str> = sources
            .iter()
            .map(|s| match s {
                TokenSource::File(_) => "--token-file",
                TokenSource::Argument(_) => "the join-token argument",
                TokenSource::Env(_) => "K0S_TOKEN",
            })
            .collect();
        let last = names.pop().unwrap_or_default();
        return usage(format!(
            "you can only pass one token, but got {} and {last}",
            names.join(", ")
        ));
    }
    p.opts.token = sources.pop();
    Ok(Command::Run(Box::new(p.opts)))
}

/// Quotes one argument for the argv line: only when it has whitespace or is
/// empty, and with `$'…'` when it has control characters, so that the
/// line stays one line and can be pasted back into a shell.
pub fn quote_arg(arg: &str) -> String {
    if arg.chars().any(char::is_control) {
        let mut s = String::from("$'");
        for c in arg.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '\'' => s.push_str("\\'"),
                '\n' => s.push_str("\\n"),
                '\t' => s.push_str("\\t"),
                '\r' => s.push_str("\\r"),
                c if c.is_control() => {
                    for b in c.to_string().bytes() {
                        s.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => s.push(c),
            }
        }
        s.push('\'');
        s
    } else if arg.is_empty() || arg.chars().any(char::is_whitespace) {
        format!("'{}'", arg.replace('\'', "'\\''"))
    } else {
        arg.to_string()
    }
}

pub fn quote_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| quote_arg(a))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn help(sub: Option<Sub>) -> String {
    let mut h = String::from(
        "k0s stand-in: a kiln test fixture, not k0s.\n\
         \n\
         kiln test images install this binary as /usr/bin/k0s. It accepts the k0s\n\
         command line, checks the k0s host contract from inside the node (one\n\
         `stand-in: check <name> ok|FAIL <why>` line per item), then stays up\n\
         until SIGTERM or SIGINT. Boot real k0s by giving the profile a k0s binary.\n\
         \n\
         Usage:\n  k0s version\n  k0s controller [flags] [join-token]\n  k0s worker [flags] [join-token]\n",
    );
    let subs: Vec<Sub> = match sub {
        Some(s) => vec![s],
        None => vec![Sub::Controller, Sub::Worker],
    };
    for s in subs {
        h.push_str(&format!("\nFlags of `k0s {}`:\n", s.name()));
        for f in FLAGS.iter().filter(|f| f.subs & bit(s) != 0) {
            let mut name = flag_display(f);
            if f.kind != Kind::Bool {
                name.push_str(" value");
            }
            h.push_str(&format!("  {name:<34} {}\n", f.help));
        }
    }
    h.push_str(
        "\nEnvironment:\n  \
         K0S_TOKEN                  worker join token (use only one token source)\n  \
         KILN_STANDIN_EXIT_AFTER=N  exit with code 1 after N seconds (restart tests)\n",
    );
    h
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        std::iter::once("k0s")
            .chain(s.iter().copied())
            .map(String::from)
            .collect()
    }

    fn run(s: &[&str]) -> RunOpts {
        match parse(&argv(s), None) {
            Ok(Command::Run(o)) => *o,
            other => panic!("{s:?} gave {other:?}"),
        }
    }

    fn err(s: &[&str]) -> String {
        match parse(&argv(s), None) {
            Err(e) => e.0,
            other => panic!("{s:?} gave {other:?}"),
        }
    }

    #[test]
    fn version_and_help() {
        assert_eq!(parse(&argv(&["version"]), None), Ok(Command::Version));
        assert_eq!(parse(&argv(&[]), None), Ok(Command::Help(None)));
        assert_eq!(parse(&argv(&["--help"]), None), Ok(Command::Help(None)));
        assert_eq!(
            parse(&argv(&["worker", "-h"]), None),
            Ok(Command::Help(Some(Sub::Worker)))
        );
        assert_eq!(
            parse(&argv(&["help", "controller"]), None),
            Ok(Command::Help(Some(Sub::Controller)))
        );
        assert!(VERSION_LINE.contains("not k0s"));
        assert!(help(None).contains("not k0s"));
        assert!(help(Some(Sub::Worker)).contains("--token-file"));
        assert!(!help(Some(Sub::Worker)).contains("--config"));
    }

    #[test]
    fn unknown_command_and_flags() {
        assert_eq!(err(&["start"]), "unknown command \"start\" for \"k0s\"");
        assert_eq!(err(&["--x"]), "unknown flag: --x");
        assert_eq!(err(&["controller", "--x"]), "unknown flag: --x");
        assert_eq!(err(&["controller", "--x=1"]), "unknown flag: --x");
        assert_eq!(
            err(&["controller", "-x"]),
            "unknown shorthand flag: 'x' in -x"
        );
        assert_eq!(
            err(&["controller", "-vx"]),
            "unknown shorthand flag: 'x' in -vx"
        );
        assert_eq!(err(&["worker", "--config", "f"]), "unknown flag: --config");
        assert_eq!(err(&["worker", "--single"]), "unknown flag: --single");
        assert_eq!(err(&["version", "--json"]), "unknown flag: --json");
        assert_eq!(err(&["controller", "--=x"]), "bad flag syntax: --=x");
    }

    #[test]
    fn string_flags_both_forms() {
        let o = run(&[
            "controller",
            "--config",
            "/etc/k0s/k0s.yaml",
            "--data-dir=/d",
        ]);
        assert_eq!(o.config.as_deref(), Some("/etc/k0s/k0s.yaml"));
        assert_eq!(o.data_dir(), "/d");
        assert_eq!(run(&["controller"]).data_dir(), "/var/lib/k0s");
        // pflag takes the next argument as the value, even if it looks like a flag.
        let o = run(&[
            "controller",
            "--kubelet-extra-args",
            "--max-pods=50 --node-ip=1.2.3.4",
        ]);
        assert_eq!(
            o.kubelet_extra_args.as_deref(),
            Some("--max-pods=50 --node-ip=1.2.3.4")
        );
        let o = run(&["controller", "--config="]);
        assert_eq!(o.config.as_deref(), Some(""));
        assert_eq!(
            err(&["controller", "--config"]),
            "flag needs an argument: --config"
        );
    }

    #[test]
    fn bool_flags() {
        let o = run(&[
            "controller",
            "--single",
            "--enable-worker=true",
            "--no-taints=false",
            "-vd",
        ]);
        assert!(o.single && o.enable_worker && !o.no_taints && o.verbose && o.debug);
        let o = run(&["controller", "-v=false", "--debug=1", "--init-only=T"]);
        assert!(!o.verbose && o.debug && o.init_only);
        assert!(err(&["controller", "--single=yes"])
            .starts_with("invalid argument \"yes\" for \"--single\" flag"));
        // A bool flag never takes the next argument as its value.
        let o = run(&["controller", "--single", "false"]);
        assert!(o.single);
        assert_eq!(o.token, Some(TokenSource::Argument("false".into())));
    }

    #[test]
    fn lists_accumulate_and_labels_are_checked() {
        let o = run(&[
            "worker",
            "--labels",
            "a=b,c=d",
            "--labels=e=",
            "--taints",
            "k=v:NoSchedule",
            "--token-file",
            "/t",
        ]);
        assert_eq!(o.labels, vec!["a=b,c=d", "e="]);
        assert_eq!(o.taints, vec!["k=v:NoSchedule"]);
        assert_eq!(
            err(&["worker", "--labels", "a=b,c"]),
            "invalid argument \"a=b,c\" for \"--labels\" flag: c must be formatted as key=value"
        );
        let o = run(&[
            "controller",
            "--disable-components",
            "autopilot,update-prober",
            "--feature-gates=X=true",
        ]);
        assert_eq!(o.disable_components, vec!["autopilot,update-prober"]);
        assert_eq!(o.feature_gates, vec!["X=true"]);
    }

    #[test]
    fn roles() {
        assert_eq!(run(&["controller"]).role(), Role::Controller);
        assert_eq!(
            run(&["controller", "--enable-worker"]).role(),
            Role::ControllerWorker
        );
        assert_eq!(run(&["controller", "--single"]).role(), Role::Single);
        assert_eq!(
            run(&["controller", "--single", "--enable-worker"]).role(),
            Role::Single
        );
        assert_eq!(run(&["worker", "tok"]).role(), Role::Worker);
        assert_eq!(Role::ControllerWorker.as_str(), "controller+worker");
    }

    #[test]
    fn exactly_one_token_source() {
        assert_eq!(
            run(&["worker", "--token-file", "/t"]).token,
            Some(TokenSource::File("/t".into()))
        );
        assert_eq!(
            run(&["worker", "abc"]).token,
            Some(TokenSource::Argument("abc".into()))
        );
        assert_eq!(run(&["worker"]).token, None);
        let env = parse(&argv(&["worker"]), Some("xyz"));
        match env {
            Ok(Command::Run(o)) => assert_eq!(o.token, Some(TokenSource::Env("xyz".into()))),
            other => panic!("{other:?}"),
        }
        // An empty K0S_TOKEN is no token.
        assert!(matches!(
            parse(&argv(&["worker", "--token-file=/t"]), Some("")),
            Ok(Command::Run(_))
        ));
        assert!(err(&["worker", "--token-file", "/t", "abc"])
            .starts_with("you can only pass one token"));
        assert!(parse(&argv(&["worker", "abc"]), Some("xyz")).is_err());
        assert!(parse(&argv(&["worker", "--token-file=/t"]), Some("xyz")).is_err());
        // K0S_TOKEN is a worker thing only.
        assert!(matches!(
            parse(&argv(&["controller", "abc"]), Some("xyz")),
            Ok(Command::Run(_))
        ));
        assert!(err(&["controller", "--token-file", "/t", "abc"])
            .starts_with("you can only pass one token"));
        assert_eq!(
            err(&["worker", "a", "b"]),
            "accepts at most 1 arg(s), received 2"
        );
        // After --, everything is positional.
        assert_eq!(
            run(&["worker", "--", "--x"]).token,
            Some(TokenSource::Argument("--x".into()))
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_arg("--single"), "--single");
        assert_eq!(quote_arg("a b"), "'a b'");
        assert_eq!(quote_arg(""), "''");
        assert_eq!(quote_arg("it's a"), "'it'\\''s a'");
        assert_eq!(quote_arg("a\nb"), "$'a\\nb'");
        assert_eq!(quote_arg("x\u{1}"), "$'x\\x01'");
        assert_eq!(
            quote_argv(&argv(&[
                "controller",
                "--kubelet-extra-args",
                "--a=1 --b=2"
            ])),
            "k0s controller --kubelet-extra-args '--a=1 --b=2'"
        );
    }

    /// Small deterministic generator, so the fuzz tests need no crate.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        pub fn string(&mut self, pieces: &[&str]) -> String {
            let n = self.below(4);
            let mut s = String::new();
            for _ in 0..n {
                if self.below(4) == 0 {
                    let c = char::from_u32((self.next() % 0x11_0000) as u32).unwrap_or('é');
                    s.push(c);
                } else {
                    s.push_str(pieces[self.below(pieces.len())]);
                }
            }
            s
        }
    }

    #[test]
    fn arbitrary_args_never_panic() {
        let pieces = [
            "controller",
            "worker",
            "version",
            "help",
            "-",
            "--",
            "-v",
            "-d",
            "-h",
            "-vd",
            "=",
            ",",
            "--single",
            "--config",
            "--token-file",
            "--labels",
            "true",
            "x",
            " ",
            "-vx",
            "--data-dir=",
            "-v=",
            "é",
            "\n",
            "k=v",
            "--enable-worker=",
            "--help",
        ];
        let mut rng = Rng::new(0x5eed);
        for _ in 0..20_000 {
            let n = rng.below(7);
            let mut a = vec!["k0s".to_string()];
            for _ in 0..n {
                a.push(rng.string(&pieces));
            }
            let env = if rng.below(3) == 0 { Some("tok") } else { None };
            let _ = parse(&a, env);
            let _ = quote_argv(&a);
        }
        let _ = parse(&[], None);
    }
}
