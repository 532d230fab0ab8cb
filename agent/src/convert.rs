//! `pgherd-agent convert-patroni FILE`: prints the pgherd member file made from a Patroni
//! configuration on stdout, and on stderr one line per setting it could not carry,
//! `<path in the Patroni file>: <why>`. The conversion itself is `pgherd_config::patroni`.
//!
//! Exit status: 0 when the file was converted (the output passes `check-config`), whether or
//! not settings were reported: they are warnings an operator reads once, and a migration
//! script must not stop on them; 1 when it is a Patroni configuration but cannot make a
//! valid member file (no etcd, a missing password, ...), with nothing on stdout; 2 when
//! the file cannot be read, is not YAML, or is not a Patroni configuration.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use pgherd_config::patroni::{self, ConvertError, Options};

/// Exit status of a Patroni file that cannot make a valid member file.
const EXIT_UNCONVERTIBLE: u8 = 1;
/// Exit status of a file that is unreadable, not YAML, or not a Patroni configuration.
const EXIT_NOT_PATRONI: u8 = 2;

/// Runs the subcommand on `file`.
pub fn run(file: &Path, api_port: Option<u16>) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read it: {e}", file.display());
            return ExitCode::from(EXIT_NOT_PATRONI);
        }
    };
    match patroni::convert(&text, &Options { api_port }) {
        Ok(c) => {
            for r in &c.reports {
                eprintln!("{r}");
            }
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(c.yaml.as_bytes()).and_then(|()| out.flush()) {
                eprintln!("cannot write the converted configuration: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(ConvertError::NotPatroni(why)) => {
            eprintln!("{}: {why}", file.display());
            ExitCode::from(EXIT_NOT_PATRONI)
        }
        Err(ConvertError::Unconvertible { problems, reports }) => {
            for r in &reports {
                eprintln!("{r}");
            }
            for p in &problems {
                eprintln!("{p}");
            }
            eprintln!(
                "{}: cannot be converted into a valid pgherd member file ({} problem(s) above); nothing was written",
                file.display(),
                problems.len()
            );
            ExitCode::from(EXIT_UNCONVERTIBLE)
        }
    }
}
