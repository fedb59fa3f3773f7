//! The Prometheus metrics of `--serve` (prometheus-client, OpenMetrics text at `/metrics`).
//!
//! Every name starts with `vmaudit_`; docs/metrics.md lists them. Counters only go up for the
//! life of the vmaudit process (a restart starts them at 0 again, which Prometheus' `rate`
//! and `increase` handle).

use std::sync::atomic::AtomicU64;

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
pub struct PidLabel {
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
    /// `watch`: fds each watched process holds now.
    pub process_fds: Family<PidLabel, Gauge>,
    pub decisions: Family<ResultLabel, Counter>,
    /// `monitor`: records read from the audit source.
    pub audit_records: Counter,
    /// `monitor`: audit records lost, by cause.
    pub audit_lost: Family<CauseLabel, Counter>,
    /// `monitor`: the stamp of the last record read (heartbeats included), Unix seconds.
    pub audit_last_record: Gauge<f64, AtomicU64>,
    /// `monitor`: whether the kernel's auditing is on (1) or off (0), and its backlog limit.
    pub audit_enabled: Gauge,
    pub audit_backlog_limit: Gauge,
    /// `monitor`: records whose sender is no manager (not claims).
    pub not_from_manager: Counter,
}

impl Metrics {
    /// Every metric of a hub; with `audit_source` (`monitor`) the audit stream's too, which
    /// no other command has (a gauge of its last record at 0 would look like a silent stream).
    pub fn new(audit_source: bool) -> Self {
        let mut registry = Registry::with_prefix("vmaudit");
        let m = Self {
            claims: Family::default(),
            verdicts: Family::default(),
            fd_events: Family::default(),
            lost_events: Family::default(),
            vm_fds: Family::default(),
            process_fds: Family::default(),
            decisions: Family::default(),
            audit_records: Counter::default(),
            audit_lost: Family::default(),
            audit_last_record: Gauge::default(),
            audit_enabled: Gauge::default(),
            audit_backlog_limit: Gauge::default(),
            not_from_manager: Counter::default(),
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
            "process_fds",
            "fds each watched process holds now (watch)",
            m.process_fds.clone(),
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
        if audit_source {
            m.register_audit(&mut registry);
        }
        Self { registry, ..m }
    }

    fn register_audit(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "audit_records",
            "Audit records the monitor read from its source",
            m.audit_records.clone(),
        );
        registry.register(
            "audit_lost",
            "Audit records lost before the monitor read them, by cause (enobufs, kernel, serial_gap, too_long; queue_wait counts backpressure)",
            m.audit_lost.clone(),
        );
        registry.register(
            "audit_last_record_timestamp_seconds",
            "The kernel stamp of the last audit record the monitor read (its own heartbeats included)",
            m.audit_last_record.clone(),
        );
        registry.register(
            "audit_enabled",
            "Whether the kernel's auditing is on (1) or off (0), as the monitor last read it",
            m.audit_enabled.clone(),
        );
        registry.register(
            "audit_backlog_limit",
            "The kernel's audit backlog limit, as the monitor last read it",
            m.audit_backlog_limit.clone(),
        );
        registry.register(
            "records_not_from_manager",
            "Audit records whose sender is no manager: never claims",
            m.not_from_manager.clone(),
        );
        for cause in ["enobufs", "kernel", "serial_gap", "too_long", "queue_wait"] {
            m.audit_lost.get_or_create_owned(&CauseLabel {
                cause: cause.to_owned(),
            });
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
