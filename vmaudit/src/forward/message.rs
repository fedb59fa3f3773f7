//! One journal line as one RFC 5424 syslog message: APP-NAME `vmaudit`, MSGID the line's
//! `type`, a severity by what the line says, its key facts as one STRUCTURED-DATA element,
//! and the line itself as MSG.
//!
//! The header and the element are written by `fasyslog` (it escapes `"`, `\` and `]` in a
//! value and checks SD names as RFC 5424 says); MSG is the JSON line as it is (MSG-ANY, no
//! BOM: a receiver keeps its bytes).

use fasyslog::{Facility, SDElement, Severity, format::SyslogContext};
use serde_json::Value;

use crate::audit::journal::LineKind;
use vmaudit_core::audit::parse::parse_text;

/// The SD-ID of vmaudit's element. 32473 is the private enterprise number RFC 5612 reserves
/// for documentation.
pub const SD_ID: &str = "vmaudit@32473";
/// The APP-NAME of every message.
pub const APP_NAME: &str = "vmaudit";

/// Formats lines for one sender (its host name, pid and facility).
#[derive(Clone, Debug)]
pub struct Formatter {
    ctx: SyslogContext,
}

impl Formatter {
    pub fn new(facility: Facility) -> Self {
        let mut ctx = SyslogContext::new();
        ctx.facility(facility).appname(APP_NAME);
        Self { ctx }
    }

    /// The message for one journal line (without framing). A line that is not a JSON object
    /// is sent as it is, at warning, with no MSGID and no structured data.
    pub fn format(&self, line: &str) -> String {
        let parsed = serde_json::from_str::<Value>(line)
            .ok()
            .filter(Value::is_object);
        let (severity, msgid, elements) = match &parsed {
            Some(v) => (severity(v), msgid(v), vec![element(v)]),
            None => (Severity::WARNING, None, Vec::new()),
        };
        self.ctx
            .format_rfc5424(severity, msgid, elements, Some(line))
            .to_string()
    }
}

/// What a journal line is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Verdict,
    /// An audit record (`VIRT_RESOURCE`, `VIRT_CONTROL`, ...): it has a `type_id`.
    Record,
    /// A run's totals (`monitor-summary`).
    Summary,
    Other,
}

fn kind(v: &Value) -> Kind {
    match LineKind::of(v) {
        LineKind::Verdict => Kind::Verdict,
        LineKind::Record if v.get("type_id").is_some() => Kind::Record,
        LineKind::Run if v.get("totals").is_some() => Kind::Summary,
        _ => Kind::Other,
    }
}

/// err for a violation, warning for what could not be confirmed, info for a confirmed
/// verdict or a record that succeeded, notice for a failed record and anything else.
pub fn severity(v: &Value) -> Severity {
    let count = |status: &str| v["totals"][status].as_u64().unwrap_or(0);
    match kind(v) {
        Kind::Verdict => match v["status"].as_str() {
            Some("violated") => Severity::ERROR,
            Some("confirmed") => Severity::INFORMATIONAL,
            _ => Severity::WARNING,
        },
        Kind::Record if v["result"] == "failed" => Severity::NOTICE,
        Kind::Record => Severity::INFORMATIONAL,
        Kind::Summary if count("violated") > 0 => Severity::ERROR,
        Kind::Summary if count("unconfirmed") + count("unknown") > 0 => Severity::WARNING,
        Kind::Summary | Kind::Other => Severity::NOTICE,
    }
}

/// The line's `type` when it is a valid MSGID (1 to 32 printable ASCII characters).
pub fn msgid(v: &Value) -> Option<&str> {
    v["type"]
        .as_str()
        .filter(|t| (1..=32).contains(&t.len()) && t.bytes().all(|b| (33..=126).contains(&b)))
}

/// The key facts, in this order, each only when the line has it:
/// - a verdict: `status`, `kind` and `claim_id` (its claim's), `vm` and `uuid` (from the
///   claim's record text), `mac`, and `pid` and `fd` of its first evidence;
/// - a record: `vm`, `uuid`, `result`, `resrc`, `op`, `reason`, `mac`, `fd`, `emulator_fd`,
///   `vm_pid`, `claim_id`, as in the journal;
/// - a summary: its totals `confirmed`, `violated`, `unconfirmed`, `unknown`.
pub fn facts(v: &Value) -> Vec<(&'static str, String)> {
    let text = |x: &Value| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let pick = |base: &Value, names: &[&'static str]| -> Vec<(&'static str, String)> {
        names
            .iter()
            .filter_map(|n| text(&base[*n]).map(|t| (*n, t)))
            .collect()
    };
    match kind(v) {
        Kind::Verdict => {
            let claim = &v["claim"];
            let first = &v["evidence"][0];
            let mut out = pick(v, &["status"]);
            out.extend(text(&claim["kind"]).map(|t| ("kind", t)));
            out.extend(text(&claim["id"]).map(|t| ("claim_id", t)));
            out.extend(vm_of(claim["text"].as_str().unwrap_or_default()));
            out.extend(text(&claim["mac"]).map(|t| ("mac", t)));
            out.extend(pick(first, &["pid", "fd"]));
            out
        }
        Kind::Record => pick(
            v,
            &[
                "vm",
                "uuid",
                "result",
                "resrc",
                "op",
                "reason",
                "mac",
                "fd",
                "emulator_fd",
                "vm_pid",
                "claim_id",
            ],
        ),
        Kind::Summary => pick(
            &v["totals"],
            &["confirmed", "violated", "unconfirmed", "unknown"],
        ),
        Kind::Other => Vec::new(),
    }
}

/// `vm` and `uuid` from a record's text (a verdict names its claim by the record's text).
fn vm_of(text: &str) -> Vec<(&'static str, String)> {
    let Ok(fields) = parse_text(text) else {
        return Vec::new();
    };
    ["vm", "uuid"]
        .into_iter()
        .filter_map(|name| {
            let (_, value) = fields.iter().find(|(n, _)| n == name)?;
            Some((name, value.text()?.to_owned()))
        })
        .collect()
}

fn element(v: &Value) -> SDElement {
    let mut e = SDElement::new(SD_ID).expect("SD_ID is a valid SD-ID");
    for (name, value) in facts(v) {
        e.add_param(name, value)
            .expect("fact names are valid PARAM-NAMEs");
    }
    e
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(line: &Value) -> String {
        Formatter::new(Facility::DAEMON).format(&line.to_string())
    }

    /// The fields of a message: PRI, VERSION, TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID,
    /// and the rest (STRUCTURED-DATA and MSG).
    fn header(m: &str) -> Vec<&str> {
        m.splitn(7, ' ').collect()
    }

    #[test]
    fn a_violated_verdict_is_err_with_its_facts_and_the_line_as_msg() {
        let line = json!({
            "type": "verdict", "ts": "2026-11-28T18:01:05.773Z", "ts_ns": 1,
            "claim": {"id": 7, "kind": "net-start", "record_ts_ns": 1,
                      "text": "virt=kvm resrc=net reason=start vm=\"web]1\" uuid=5b0c2a7e-9a55-4d5e-8f0a-2f7e1c3d4b6a old-net=? new-net=52:54:00:12:34:56",
                      "mac": "52:54:00:12:34:56"},
            "status": "violated", "reason": "released \"fd\" 37 \\ no detach",
            "evidence": [{"pid": 5754, "fd": 37, "what": "close"}],
        });
        let m = message(&line);
        let h = header(&m);
        // daemon (3) * 8 + err (3)
        assert_eq!(h[0], "<27>1");
        assert_eq!(h[3], APP_NAME);
        assert_eq!(h[4], std::process::id().to_string());
        assert_eq!(h[5], "verdict");
        let sd = "[vmaudit@32473 status=\"violated\" kind=\"net-start\" claim_id=\"7\" \
                  vm=\"web\\]1\" uuid=\"5b0c2a7e-9a55-4d5e-8f0a-2f7e1c3d4b6a\" \
                  mac=\"52:54:00:12:34:56\" pid=\"5754\" fd=\"37\"]";
        let rest = h[6];
        assert!(rest.starts_with(sd), "{m}");
        let msg = &rest[sd.len() + 1..];
        assert_eq!(serde_json::from_str::<Value>(msg).unwrap(), line);
    }

    #[test]
    fn severity_follows_the_status() {
        let verdict = |status| json!({"type": "verdict", "status": status});
        assert_eq!(severity(&verdict("violated")), Severity::ERROR);
        assert_eq!(severity(&verdict("unconfirmed")), Severity::WARNING);
        assert_eq!(severity(&verdict("unknown")), Severity::WARNING);
        assert_eq!(severity(&verdict("confirmed")), Severity::INFORMATIONAL);
        let record = |result| json!({"type": "VIRT_RESOURCE", "type_id": 2501, "result": result});
        assert_eq!(severity(&record("success")), Severity::INFORMATIONAL);
        assert_eq!(severity(&record("failed")), Severity::NOTICE);
        let summary = |v: u64, u: u64| json!({"type": "monitor-summary", "totals": {"confirmed": 3, "violated": v, "unconfirmed": 0, "unknown": u}});
        assert_eq!(severity(&summary(1, 0)), Severity::ERROR);
        assert_eq!(severity(&summary(0, 2)), Severity::WARNING);
        assert_eq!(severity(&summary(0, 0)), Severity::NOTICE);
    }

    #[test]
    fn a_record_carries_its_journal_fields() {
        let line = json!({
            "ts": "2026-11-28T18:01:05.763Z", "ts_ns": 1, "type": "VIRT_RESOURCE",
            "type_id": 2501, "result": "success", "text": "...", "kernel": "not-requested",
            "virt": "kvm", "vm": "web1", "uuid": "u", "resrc": "net", "reason": "open",
            "mac": "m", "path": "/dev/net/tun", "fd": 12, "claim_id": 3,
        });
        assert_eq!(
            facts(&line),
            [
                ("vm", "web1"),
                ("uuid", "u"),
                ("result", "success"),
                ("resrc", "net"),
                ("reason", "open"),
                ("mac", "m"),
                ("fd", "12"),
                ("claim_id", "3"),
            ]
            .map(|(n, v)| (n, v.to_owned()))
        );
        assert_eq!(header(&message(&line))[5], "VIRT_RESOURCE");
    }

    #[test]
    fn a_line_that_is_not_json_is_sent_as_it_is() {
        let m = Formatter::new(Facility::DAEMON).format("not json ]");
        let h = header(&m);
        assert_eq!(h[0], "<28>1", "daemon, warning");
        assert_eq!(h[5], "-");
        assert_eq!(h[6], "- not json ]");
    }
}
