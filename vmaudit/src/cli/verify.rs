//! `vmaudit verify JOURNAL`: the claims of a journal, their verdicts, and the totals.

use std::{io::IsTerminal as _, path::PathBuf};

use vmaudit::verify::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A journal written by `vmaudit run`.
    journal: PathBuf,
    /// JSON instead of a table (the default when stdout is not a terminal).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> u8 {
    let r = match report::build(&args.journal) {
        Ok(r) => r,
        Err(e) => return super::fail(&e, e.exit_code()),
    };
    if args.json || !std::io::stdout().is_terminal() {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        print!("{}", r.render());
    }
    r.exit_code()
}
