//! kiln-init: PID 1 of a kiln node.
//!
//! Stage 1 runs from the initramfs when the cmdline carries `roothash=`: it
//! mounts the verified root and execs its `/sbin/init --stage2`. Stage 2 (or
//! an initramfs-only boot) is `node::run`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--version") {
        println!("kiln-init {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    // The kernel runs /sbin/modprobe (a symlink to kiln-init) for
    // request_module; so may k0s.
    if args.first().is_some_and(|a| kiln_init::node::kmod::invoked_as_modprobe(a)) {
        std::process::exit(kiln_init::node::kmod::modprobe_main(&args[1..]));
    }
    if std::process::id() != 1 {
        eprintln!("kiln-init: must run as PID 1 (the kernel's init); nothing to do here");
        std::process::exit(2);
    }
    let stage2 = args.iter().any(|a| a == kiln_init::node::stage1::STAGE2_ARG);
    // A panic must not kill PID 1 (the kernel would panic in turn): report it
    // and park the node, still reaping and answering power requests.
    let r = std::panic::catch_unwind(|| {
        if !stage2 && kiln_init::node::stage1::wanted() {
            kiln_init::node::stage1::run()
        }
        kiln_init::node::run()
    });
    let why = match r {
        Err(p) => p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default(),
        Ok(never) => never,
    };
    kiln_init::node::console::event("maintenance", &[("reason", &format!("kiln-init panicked: {why}"))]);
    kiln_init::node::park()
}
