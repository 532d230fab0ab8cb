//! Asking the operator before a disruptive step.

use std::io::{BufRead, IsTerminal, Write};

use crate::Failure;

/// Asks before a disruptive step; refuses without a terminal (a script must say --force).
pub fn confirm(question: &str, force: bool) -> Result<(), Failure> {
    if force {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "refusing to go on without confirmation ({question}): standard input is not a terminal; pass --force to confirm"
        )));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::Refused(format!("cannot read the answer: {e}")))?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        Err(Failure::Refused("not confirmed; nothing done".into()))
    }
}
