//! `pgherd-watchdog`: the fencing watchdog `pgherd-agent` starts beside itself (rule 3 of
//! docs/architecture.md). It takes its instructions from the agent on stdin; see the library for
//! them.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {
            pgherd_watchdog::run();
            ExitCode::SUCCESS
        }
        Some("--version" | "-V") => {
            println!("pgherd-watchdog {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(_) => {
            eprintln!(
                "pgherd-watchdog takes no arguments: pgherd-agent starts it next to itself and tells it what to guard on its stdin"
            );
            ExitCode::from(2)
        }
    }
}
