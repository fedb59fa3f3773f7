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
    let name = args.journal.display();
    if let Some(b) = &r.chain.first_break {
        eprintln!(
            "vmaudit: journal {name}: the hash chain is broken ({} break(s)); the first: {}",
            r.chain.breaks, b.message
        );
    }
    if r.chain.torn > 0 {
        eprintln!("vmaudit: journal {name}: a torn last line (a write cut short) is skipped");
    }
    let printed = if args.json || !std::io::stdout().is_terminal() {
        super::print_json(&r)
    } else {
        super::print_text(&r.render())
    };
    match printed {
        Ok(()) => r.exit_code(),
        Err(e) => super::output_failed(&e),
    }
}
