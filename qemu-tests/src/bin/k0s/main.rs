//! The stand-in payload: a kiln TEST FIXTURE installed as /usr/bin/k0s in
//! test images. It is not k0s. It accepts the k0s command line, checks the
//! k0s host contract (docs: shared/design/K0S-CONTRACT.md) from inside the
//! booted node, prints one greppable line per item, and stays up like a node
//! until SIGTERM or SIGINT.

mod checks;
mod cli;
mod cluster;
mod containers;
mod node;
mod out;
mod payloads;
mod token;

use cli::Command;

fn main() {
    // args_os: std::env::args panics on an argument that is not UTF-8.
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let k0s_token = std::env::var_os("K0S_TOKEN").map(|t| t.to_string_lossy().into_owned());
    let code = match cli::parse(&argv, k0s_token.as_deref()) {
        Ok(Command::Version) => {
            out::raw(&format!("{}\n", cli::VERSION_LINE));
            0
        }
        Ok(Command::Help(sub)) => {
            out::raw(&cli::help(sub));
            0
        }
        Ok(Command::Run(opts)) => node::run(&argv, &opts),
        Err(e) => {
            out::err(&format!("Error: {e}"));
            out::err(&format!("stand-in: argv {}", cli::quote_argv(&argv)));
            1
        }
    };
    std::process::exit(code)
}
