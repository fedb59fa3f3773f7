//! The Prometheus metrics of `--serve` (prometheus-client, OpenMetrics text at `/metrics`).
//!
//! Every name starts with `vmaudit_`; the README lists them. Counters only go up for the
//! life of the vmaudit process (a restart starts them at 0 again, which Prometheus' `rate`
//! and `increase` handle).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::verify::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub status: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub vm: String,
    pub pid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The metric families, registered in `registry`.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub claims: Family<KindLabel, Counter>,
    pub verdicts: Family<VerdictLabels, Counter>,
    pub fd_events: Family<OpLabel, Counter>,
    pub lost_events: Family<CauseLabel, Counter>,
    pub vm_fds: Family<VmLabels, Gauge>,
    pub decisions: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vmaudit");
        let m = Self {
            claims: Family::default(),
            verdicts: Family::default(),
            fd_events: Family::default(),
            lost_events: Family::default(),
            vm_fds: Family::default(),
            decisions: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "claims",
            "Claims (audit records) the verifier took up, by kind",
            m.claims.clone(),
        );
        registry.register(
            "verdicts",
            "Verdicts on claims, by status and claim kind",
            m.verdicts.clone(),
        );
        registry.register(
            "fd_events",
            "fds gained, lost or changed in watched processes, by operation",
            m.fd_events.clone(),
        );
        registry.register(
            "lost_events",
            "Kernel events the tracker could not deliver, by cause",
            m.lost_events.clone(),
        );
        registry.register(
            "vm_fds",
            "fds each VM's emulator holds now",
            m.vm_fds.clone(),
        );
        registry.register(
            "cgroup_decisions",
            "Device accesses decided by VM cgroups' device programs",
            m.decisions.clone(),
        );
        // Series that exist from the start, at 0, so that a query (or an alert on their
        // increase) finds them before the first event.
        for kind in vmaudit_core::claim::KINDS {
            if *kind != "unclaimed" {
                m.claims.get_or_create_owned(&KindLabel {
                    kind: (*kind).to_owned(),
                });
            }
            for status in Status::ALL {
                m.verdicts.get_or_create_owned(&VerdictLabels {
                    status: status.as_str().to_owned(),
                    kind: (*kind).to_owned(),
                });
            }
        }
        for cause in vmaudit_common::LossCause::ALL {
            m.lost_events.get_or_create_owned(&CauseLabel {
                cause: cause.name().to_owned(),
            });
        }
        for result in ["allowed", "denied"] {
            m.decisions.get_or_create_owned(&ResultLabel {
                result: result.to_owned(),
            });
        }
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
