//! `vmaudit generate`: man pages and shell completions made from the command line's own
//! definition, for the package (`cargo xtask dist`). Hidden from `--help`: operators get the
//! results installed, not the command.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use clap_mangen::{
    Man,
    roff::{Roff, bold, roman},
};
use vmaudit::exit;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Write vmaudit.1 and one page per subcommand (vmaudit-run.1, vmaudit-search-fds.1, ...)
    /// into DIR.
    Man { dir: PathBuf },
    /// Write SHELL's completion script into DIR, named as clap_complete names it (vmaudit.bash,
    /// _vmaudit, vmaudit.fish).
    Completions {
        shell: clap_complete::Shell,
        dir: PathBuf,
    },
}

/// How the shipped systemd units treat each exit code: (unit, codes after which the unit is not
/// restarted, codes that count as a clean stop). `vmaudit-monitor.service` and
/// `vmaudit-run@.service` in vmaudit/packaging/systemd say the same (a test below checks).
pub const SERVICE_CONTRACT: &[(&str, &[u8], &[u8])] = &[
    (
        "vmaudit-monitor.service",
        &[
            exit::USAGE,
            exit::NO_SUCH_PROCESS,
            exit::PRIVILEGES,
            exit::KERNEL_FEATURE,
            exit::JOURNAL,
            exit::SERVE,
        ],
        &[exit::VIOLATED],
    ),
    (
        "vmaudit-run@.service",
        &[
            exit::USAGE,
            exit::PRIVILEGES,
            exit::KERNEL_FEATURE,
            exit::VIOLATED,
            exit::SPEC,
            exit::JOURNAL,
            exit::DEVICE,
            exit::CGROUP,
            exit::SERVE,
        ],
        &[],
    ),
];

pub fn run(args: Args) -> u8 {
    let result = match args.what {
        What::Man { dir } => man_pages(&dir),
        What::Completions { shell, dir } => completions(shell, &dir),
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => super::fail(&e, exit::INTERNAL),
    }
}

fn completions(shell: clap_complete::Shell, dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut cmd = visible(super::Cli::command());
    let path = clap_complete::generate_to(shell, &mut cmd, "vmaudit", dir)?;
    vmaudit::notice!("wrote {}", path.display());
    Ok(())
}

/// `cmd` without its hidden subcommands, which clap_complete would otherwise offer.
fn visible(cmd: clap::Command) -> clap::Command {
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut shown = clap::Command::new("vmaudit")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(subcommands)
        .subcommand_required(cmd.is_subcommand_required_set());
    if let Some(about) = cmd.get_about() {
        shown = shown.about(about.clone());
    }
    shown
}

/// The top page (with the exit status and the units' contract), then one per visible
/// subcommand, nested ones included.
fn man_pages(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut cmd = super::Cli::command().disable_help_subcommand(true);
    cmd.build();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        sub_pages(sub.clone(), dir)?;
    }
    let path = dir.join("vmaudit.1");
    let mut out = fs::File::create(&path)?;
    top_page(&Man::new(cmd), &mut out)?;
    out.flush()?;
    vmaudit::notice!("wrote {}", path.display());
    Ok(())
}

fn sub_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        sub_pages(sub.clone(), dir)?;
    }
    let path = Man::new(cmd).generate_to(dir)?;
    vmaudit::notice!("wrote {}", path.display());
    Ok(())
}

/// clap_mangen's sections, with EXIT STATUS and SYSTEMD in place of the `--help` epilogue.
fn top_page(man: &Man, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    exit_status(out)?;
    systemd_section(out)?;
    man.render_version_section(out)
}

fn exit_status(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut roff = Roff::default();
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in exit::TABLE {
        roff.control("TP", [] as [&str; 0]);
        roff.text([bold(code.to_string())]);
        roff.text([roman(*meaning)]);
    }
    roff.to_writer(out)
}

fn systemd_section(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let codes = |list: &[u8]| {
        list.iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut roff = Roff::default();
    roff.control("SH", ["SYSTEMD"]);
    roff.text([roman(
        "The package installs two units. vmaudit-monitor.service runs vmaudit monitor for the \
         host's libvirt (it starts with libvirtd or virtqemud, and stops and restarts with them), \
         journaling to /var/log/vmaudit/monitor.jsonl, with metrics on 127.0.0.1:9464 \
         (VMAUDIT_MONITOR_ARGS in /etc/default/vmaudit changes that). vmaudit-run@NAME.service \
         runs vmaudit run /etc/vmaudit/NAME.toml. Both restart after a crash or an internal \
         error, and never after an exit code that says the configuration or the host is wrong, \
         where a restart cannot help:",
    )]);
    for (unit, no_restart, clean) in SERVICE_CONTRACT {
        roff.control("TP", [] as [&str; 0]);
        roff.text([bold(*unit)]);
        let mut text = format!("not restarted after exit {}", codes(no_restart));
        if !clean.is_empty() {
            text.push_str(&format!(
                "; exit {} on a requested stop is a clean stop (the violations are already in \
                 the journal, the metrics and the system log)",
                codes(clean)
            ));
        }
        if no_restart.contains(&exit::VIOLATED) {
            text.push_str(
                "; exit 7 (a claim was violated) leaves the unit failed and the VM down, for an \
                 operator to look at",
            );
        }
        roff.text([roman(text)]);
    }
    roff.to_writer(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `KEY=` line of a unit file, as numbers.
    fn codes(unit: &str, key: &str) -> Vec<u8> {
        let mut found: Vec<u8> = unit
            .lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .flat_map(|v| v.split_whitespace().map(|c| c.parse().expect("a number")))
            .collect();
        found.sort_unstable();
        found
    }

    #[test]
    fn the_units_keep_the_contract_the_man_page_states() {
        let units = [
            include_str!("../../packaging/systemd/vmaudit-monitor.service"),
            include_str!("../../packaging/systemd/vmaudit-run@.service"),
        ];
        for ((name, no_restart, clean), unit) in SERVICE_CONTRACT.iter().zip(units) {
            let sorted = |l: &[u8]| {
                let mut v = l.to_vec();
                v.sort_unstable();
                v
            };
            assert_eq!(
                codes(unit, "RestartPreventExitStatus"),
                sorted(no_restart),
                "{name}"
            );
            assert_eq!(codes(unit, "SuccessExitStatus"), sorted(clean), "{name}");
            for code in no_restart.iter().chain(*clean) {
                assert!(exit::TABLE.iter().any(|(c, _)| c == code), "{code}");
            }
        }
    }

    #[test]
    fn completions_offer_no_hidden_subcommand() {
        let dir = std::env::temp_dir().join(format!("vmaudit-completions-{}", std::process::id()));
        completions(clap_complete::Shell::Bash, &dir).unwrap();
        let script = fs::read_to_string(dir.join("vmaudit.bash")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let top = script
            .lines()
            .find(|l| l.contains("opts=\"") && l.contains(" run "))
            .expect("the top-level words");
        assert!(
            top.contains(" monitor ") && !top.contains("generate"),
            "{top}"
        );
    }

    #[test]
    fn the_generate_command_stays_out_of_help() {
        let cmd = super::super::Cli::command();
        let generate = cmd
            .get_subcommands()
            .find(|s| s.get_name() == "generate")
            .expect("generate");
        assert!(generate.is_hide_set());
    }
}
