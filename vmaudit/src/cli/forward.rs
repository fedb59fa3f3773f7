//! `vmaudit forward JOURNAL... --to ADDR`: the journals' lines as RFC 5424 syslog messages.

use std::path::PathBuf;

use vmaudit::{
    exit,
    forward::{ForwardOptions, forward, target::Target},
};

use super::watch::shutdown_signal;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Each message: APP-NAME vmaudit, MSGID the line's type, severity err \
    for a violated verdict, warning for an unconfirmed or unknown one, info for a confirmed \
    verdict or a successful record, notice otherwise; the element [vmaudit@32473 ...] with the \
    line's key facts; the JSON line as MSG."
)]
pub struct Args {
    /// Journals written by `vmaudit run` or `vmaudit monitor`, followed by name across
    /// rotation and truncation.
    #[arg(required = true, value_name = "JOURNAL")]
    journals: Vec<PathBuf>,
    /// The receiver: udp://HOST:PORT, tcp://HOST:PORT (octet-counting framing, RFC 6587), or
    /// unix:///PATH (a datagram socket whose reader parses RFC 5424).
    #[arg(long, value_name = "ADDR")]
    to: String,
    /// Read each journal from its start (the default is its end), unless --state knows where
    /// it was forwarded up to.
    #[arg(long)]
    from_start: bool,
    /// Keep here how far each journal was forwarded; a restart with the same file resumes
    /// there (in the rotated file when the journal was rotated meanwhile).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// The syslog facility (kern, user, daemon, auth, authpriv, local0 ... local7, ...).
    #[arg(long, default_value = "daemon", value_parser = parse_facility)]
    facility: fasyslog::Facility,
}

fn parse_facility(s: &str) -> Result<fasyslog::Facility, String> {
    fasyslog::Facility::try_from(s).map_err(|()| format!("{s:?} is no syslog facility name"))
}

pub fn run(args: Args) -> u8 {
    let target = match Target::parse(&args.to) {
        Ok(t) => t,
        Err(e) => return super::fail(&e, exit::FORWARD),
    };
    let opts = ForwardOptions {
        journals: args.journals,
        from_start: args.from_start,
        target: target.clone(),
        facility: args.facility,
        state: args.state,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(&e, exit::INTERNAL),
    };
    let names: Vec<String> = opts
        .journals
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let result = rt.block_on(async {
        // Registered inside the runtime, before the journals are read.
        let shutdown = shutdown_signal();
        forward(opts, shutdown, || {
            vmaudit::notice!("forwarding {} to {target}", names.join(", "));
        })
        .await
    });
    match result {
        Ok(o) => {
            vmaudit::notice!(
                "forward: {} lines sent to {target}, {} not sent, {} too long, {} read and not sent at the stop",
                o.sent,
                o.not_sent,
                o.too_long,
                o.unsent_at_stop
            );
            exit::OK
        }
        Err(e) => super::fail(&e, e.exit_code()),
    }
}
