//! `vmaudit search`: records and verdicts of journals and audit.log files, by filter; and the
//! two questions `fds` and `released`.

use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
};

use super::{output_failed, print_json, print_text};
use vmaudit::{
    exit, paths,
    search::{
        Event, answer,
        filter::{self, Filter, FilterError},
        load, render,
    },
    verify::Status,
};

#[derive(Debug, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Without JOURNAL or --audit-log, every journal in /var/log/vmaudit is read.\n\
                  Exit 0 when something matched, 19 when nothing did, 2 for a bad filter, 11 \
                  for an input that cannot be read."
)]
pub struct Args {
    #[command(subcommand)]
    question: Option<Question>,
    #[command(flatten)]
    filters: Filters,
    #[command(flatten)]
    inputs: Inputs,
}

#[derive(Debug, clap::Subcommand)]
enum Question {
    /// Which fds the emulator holds for a MAC: its latest start or attach (searching back from
    /// the end, or from --until), the fds the kernel showed the emulator holding, and whether a
    /// detach, a release or the VM's stop came after.
    Fds(QuestionArgs),
    /// Which fds the emulator released at the latest detach of a MAC (back from the end, or
    /// from --until): the kernel's closes, or plainly that it saw none.
    Released(QuestionArgs),
}

#[derive(Debug, clap::Args)]
struct QuestionArgs {
    /// The interface's MAC.
    #[arg(long)]
    mac: String,
    /// Search backwards from this moment (RFC 3339 or Unix seconds) instead of the end.
    #[arg(long, visible_alias = "at", value_name = "TIME")]
    until: Option<String>,
    /// Only this VM (by name).
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only this VM (by uuid).
    #[arg(long)]
    uuid: Option<String>,
    #[command(flatten)]
    inputs: Inputs,
}

#[derive(Debug, clap::Args)]
struct Filters {
    /// Records about this MAC (52:54:00:12:34:56; any case).
    #[arg(long)]
    mac: Option<String>,
    /// Records of the VM with this name.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Records of the VM with this uuid.
    #[arg(long)]
    uuid: Option<String>,
    /// Records of the run whose emulator had this pid (vm-pid), or with kernel evidence from it.
    #[arg(long)]
    pid: Option<u32>,
    /// A device: a path (/dev/net/tun, /dev/tap12) or MAJ:MIN, decimal (10:200) or libvirt's
    /// hex (0A:C8), in the record or the kernel's evidence.
    #[arg(long, value_name = "PATH|MAJ:MIN")]
    device: Option<String>,
    /// From this moment on (RFC 3339, e.g. 2024-06-10T06:13:20Z, or Unix seconds).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Up to this moment (RFC 3339 or Unix seconds).
    #[arg(long, visible_alias = "at", value_name = "TIME")]
    until: Option<String>,
    /// Records with a verdict of this status.
    #[arg(long, value_enum)]
    status: Option<StatusArg>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StatusArg {
    Confirmed,
    Violated,
    Unconfirmed,
    Unknown,
}

impl From<StatusArg> for Status {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Confirmed => Status::Confirmed,
            StatusArg::Violated => Status::Violated,
            StatusArg::Unconfirmed => Status::Unconfirmed,
            StatusArg::Unknown => Status::Unknown,
        }
    }
}

#[derive(Debug, clap::Args)]
struct Inputs {
    /// Journals written by `vmaudit run` (records and verdicts).
    #[arg(value_name = "JOURNAL")]
    journals: Vec<PathBuf>,
    /// An audit.log (auditd's format; libvirt's or vmaudit's VIRT_* records). Repeatable.
    #[arg(long = "audit-log", value_name = "FILE")]
    audit_logs: Vec<PathBuf>,
    /// JSON lines instead of a table (the default when stdout is not a terminal).
    #[arg(long)]
    json: bool,
}

fn opt<T>(
    v: &Option<String>,
    parse: impl Fn(&str) -> Result<T, FilterError>,
) -> Result<Option<T>, FilterError> {
    v.as_deref().map(parse).transpose()
}

impl Filters {
    fn parse(&self) -> Result<Filter, FilterError> {
        let f = Filter {
            mac: opt(&self.mac, filter::parse_mac)?,
            vm: self.vm.clone(),
            uuid: opt(&self.uuid, filter::parse_uuid)?,
            pid: self.pid,
            device: opt(&self.device, filter::parse_device)?,
            since: opt(&self.since, |s| filter::parse_time("--since", s))?,
            until: opt(&self.until, |s| filter::parse_time("--until", s))?,
            status: self.status.map(Status::from),
        };
        f.check()?;
        Ok(f)
    }
}

impl QuestionArgs {
    fn parse(&self) -> Result<Filter, FilterError> {
        Ok(Filter {
            mac: Some(filter::parse_mac(&self.mac)?),
            vm: self.vm.clone(),
            uuid: opt(&self.uuid, filter::parse_uuid)?,
            until: opt(&self.until, |s| filter::parse_time("--until", s))?,
            ..Filter::default()
        })
    }
}

/// The journals to read when none is named: every `*.jsonl` in the journal directory.
fn default_journals(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    found.sort();
    found
}

fn load(inputs: &Inputs) -> Result<Vec<Event>, u8> {
    let mut journals = inputs.journals.clone();
    if journals.is_empty() && inputs.audit_logs.is_empty() {
        journals = default_journals(Path::new(paths::JOURNAL_DIR));
        if journals.is_empty() {
            vmaudit::failure!(
                "nothing to search: name a JOURNAL or --audit-log FILE (no journal in {})",
                paths::JOURNAL_DIR
            );
            return Err(exit::USAGE);
        }
    }
    match load::all(&journals, &inputs.audit_logs) {
        Ok(l) => {
            for n in &l.notes {
                log::warn!("{n}");
            }
            Ok(l.events)
        }
        Err(e) => Err(super::fail(&e, exit::JOURNAL)),
    }
}

fn usage(e: &FilterError) -> u8 {
    vmaudit::failure!("{e}");
    exit::USAGE
}

pub fn run(args: Args) -> u8 {
    match args.question {
        None => list(&args.filters, &args.inputs),
        Some(Question::Fds(q)) => ask(&q, "start or attach", answer::fds, render::fds),
        Some(Question::Released(q)) => ask(&q, "detach", answer::released, render::released),
    }
}

/// One of the two questions: the filter, the inputs, the answer (or exit 19 naming what was
/// not found), printed for a person or as JSON.
fn ask<A: serde::Serialize>(
    q: &QuestionArgs,
    what: &str,
    answer: fn(&[Event], &Filter) -> Option<A>,
    render: fn(&A) -> String,
) -> u8 {
    let f = match q.parse() {
        Ok(f) => f,
        Err(e) => return usage(&e),
    };
    let events = match load(&q.inputs) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let Some(a) = answer(&events, &f) else {
        vmaudit::notice!("no {what} of {} {}", q.mac, scope(&f, q.until.as_deref()));
        return exit::NO_MATCH;
    };
    if q.inputs.json || !std::io::stdout().is_terminal() {
        if let Err(e) = print_json(&a) {
            return output_failed(&e);
        }
    } else if let Err(e) = print_text(&render(&a)) {
        return output_failed(&e);
    }
    exit::OK
}

fn scope(f: &Filter, at: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(vm) = &f.vm {
        s.push_str(&format!("in VM {vm} "));
    }
    if let Some(u) = &f.uuid {
        s.push_str(&format!("in VM {u} "));
    }
    match at {
        Some(at) => s.push_str(&format!("up to {at}")),
        None => s.push_str("in the inputs"),
    }
    s
}

fn list(filters: &Filters, inputs: &Inputs) -> u8 {
    let f = match filters.parse() {
        Ok(f) => f,
        Err(e) => return usage(&e),
    };
    let events = match load(inputs) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let found: Vec<&Event> = events.iter().filter(|e| f.matches(e)).collect();
    if found.is_empty() {
        vmaudit::notice!("no record matched (of {} read)", events.len());
        return exit::NO_MATCH;
    }
    if inputs.json || !std::io::stdout().is_terminal() {
        for e in &found {
            if let Err(e) = print_json(e) {
                return output_failed(&e);
            }
        }
    } else if let Err(e) = print_text(&render::events(&found)) {
        return output_failed(&e);
    }
    exit::OK
}
