//! `vmaudit attach-net VM ...` / `vmaudit detach-net VM ...`: ask a running `vmaudit run` over
//! its control socket.

use vmaudit::{
    exit,
    runtime::{
        control::{Request, request},
        spec::Backend,
    },
};

#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The VM's name (as in its spec).
    vm: String,
    /// The new interface's MAC.
    #[arg(long)]
    mac: String,
    /// tap, or macvtap (with --parent).
    #[arg(long, value_enum, default_value_t = Backend::Tap)]
    backend: Backend,
    /// macvtap: the parent link.
    #[arg(long)]
    parent: Option<String>,
    /// The host interface name (default: kernel-numbered).
    #[arg(long)]
    ifname: Option<String>,
    /// Queues (fds).
    #[arg(long, default_value_t = 1)]
    queues: u32,
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The VM's name.
    vm: String,
    /// The interface's MAC.
    #[arg(long)]
    mac: String,
    /// How long the guest has to acknowledge the unplug (5s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = super::duration)]
    timeout: std::time::Duration,
    /// The same in milliseconds (the older spelling).
    #[arg(long, value_name = "MS", hide = true, conflicts_with = "timeout")]
    timeout_ms: Option<u64>,
}

fn send(vm: &str, req: Request) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(&e, exit::INTERNAL),
    };
    match rt.block_on(request(vm, &req)) {
        Ok(r) => {
            let printed = super::print_json(&r);
            if r.ok {
                vmaudit::notice!("{}", r.message);
            } else {
                vmaudit::failure!("{}", r.message);
            }
            match printed {
                Ok(()) if r.ok => exit::OK,
                Err(e) if r.ok => super::output_failed(&e),
                Ok(()) => r.code,
                // The refusal's own code says more than the answer's lost copy.
                Err(e) => {
                    log::warn!("the answer could not be written to stdout: {e}");
                    r.code
                }
            }
        }
        Err(e) => {
            vmaudit::failure!("{e}");
            e.exit_code()
        }
    }
}

pub fn attach(a: AttachArgs) -> u8 {
    send(
        &a.vm,
        Request::AttachNet {
            mac: a.mac,
            backend: a.backend,
            parent: a.parent,
            ifname: a.ifname,
            queues: a.queues,
        },
    )
}

pub fn detach(a: DetachArgs) -> u8 {
    send(
        &a.vm,
        Request::DetachNet {
            mac: a.mac,
            timeout_ms: a
                .timeout_ms
                .unwrap_or(u64::try_from(a.timeout.as_millis()).unwrap_or(u64::MAX)),
        },
    )
}
