//! The `vmaudit` command line: a thin adapter over the library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
