//! The dashboard's history, kept in the hub so that a page opened later sees it: per-second
//! counts (verdicts by status, fd events, lost events by cause) and each subject's fd count,
//! over the last [`WINDOW_S`] seconds of wall-clock time.
//!
//! A subject is what one line of the fd-count plot follows: a VM (`run`, `monitor`) or a
//! watched process (`watch`). Only seconds with something in them are stored, each series is
//! cut at the window, and a subject with nothing left in the window goes: memory is bounded by
//! the window and the number of live subjects, and an idle hub keeps nothing new.
//!
//! The dashboard applies live events by the same rules, [`Rate::add`] and [`Steps::set`]
//! (each event carries the second it was counted in), so what it draws is what a reload shows.

use std::collections::{BTreeMap, VecDeque};

use serde::{Serialize, Serializer, ser::SerializeSeq};

use crate::verify::Status;

/// How much history is kept: ten minutes, at one second.
pub const WINDOW_S: u64 = 600;

/// Whether second `t` is still in the window that ends at second `now`.
fn in_window(t: u64, now: u64) -> bool {
    t + WINDOW_S > now
}

/// Counts per second, oldest first, `N` of them per second; seconds without counts are absent.
/// JSON: `[[t, [n0, n1, ...]], ...]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rate<const N: usize>(VecDeque<(u64, [u64; N])>);

impl<const N: usize> Rate<N> {
    /// Adds `n` to count `i` of second `t`. A clock that steps back adds to the latest second,
    /// so the series stays in order.
    pub fn add(&mut self, t: u64, i: usize, n: u64) {
        match self.0.back_mut() {
            Some((last, counts)) if *last >= t => counts[i] += n,
            _ => {
                let mut counts = [0; N];
                counts[i] = n;
                self.0.push_back((t, counts));
            }
        }
    }

    fn prune(&mut self, now: u64) {
        while self.0.front().is_some_and(|(t, _)| !in_window(*t, now)) {
            self.0.pop_front();
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The sums over the seconds kept.
    pub fn sums(&self) -> [u64; N] {
        let mut s = [0; N];
        for (_, counts) in &self.0 {
            for (a, b) in s.iter_mut().zip(counts) {
                *a += b;
            }
        }
        s
    }
}

impl<const N: usize> Serialize for Rate<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (t, counts) in &self.0 {
            seq.serialize_element(&(t, &counts[..]))?;
        }
        seq.end()
    }
}

/// A count over time as the seconds it changed at, oldest first, with the last change before
/// the window kept (where the line starts). JSON: `[[t, n], ...]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Steps(VecDeque<(u64, u64)>);

impl Steps {
    /// The count is `n` from second `t` on. Within one second the last value wins; a value
    /// equal to the one before is no change.
    pub fn set(&mut self, t: u64, n: u64) {
        let len = self.0.len();
        match self.0.back_mut() {
            Some((_, last)) if *last == n => {}
            Some((last_t, last)) if *last_t >= t => {
                *last = n;
                if len >= 2 && self.0[len - 2].1 == n {
                    self.0.pop_back();
                }
            }
            _ => self.0.push_back((t, n)),
        }
    }

    fn prune(&mut self, now: u64) {
        while self.0.len() >= 2 && !in_window(self.0[1].0, now) {
            self.0.pop_front();
        }
    }

    /// The count now (none before the first change).
    pub fn last(&self) -> Option<u64> {
        self.0.back().map(|(_, n)| *n)
    }
}

/// One subject's history.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Subject {
    /// fds held.
    pub fds: Steps,
    /// fd events per second.
    pub events: Rate<1>,
    /// Verdicts per second, by status in [`Status::ALL`]'s order.
    pub verdicts: Rate<4>,
}

impl Subject {
    fn prune(&mut self, now: u64) {
        self.fds.prune(now);
        self.events.prune(now);
        self.verdicts.prune(now);
    }

    /// Nothing left to draw: no count in the window, and no fd held since before it.
    fn is_stale(&self, now: u64) -> bool {
        self.events.is_empty()
            && self.verdicts.is_empty()
            && self.fds.0.len() <= 1
            && self
                .fds
                .0
                .front()
                .is_none_or(|(t, n)| *n == 0 && !in_window(*t, now))
    }
}

/// Lost events per second, by cause (host-wide). JSON: `[[t, {cause: n}], ...]`.
pub type Lost = VecDeque<(u64, BTreeMap<&'static str, u64>)>;

/// The hub's history.
#[derive(Debug, Default)]
pub struct History {
    verdicts: Rate<4>,
    fd_events: Rate<1>,
    lost: Lost,
    subjects: BTreeMap<String, Subject>,
    /// The second of the last pruning: everything is pruned at most once a second.
    pruned_at: u64,
}

/// The index of `status` in [`Status::ALL`].
fn status_index(status: Status) -> usize {
    Status::ALL.iter().position(|s| *s == status).unwrap_or(0)
}

impl History {
    fn subject(&mut self, key: &str) -> &mut Subject {
        if !self.subjects.contains_key(key) {
            self.subjects.insert(key.to_owned(), Subject::default());
        }
        self.subjects.get_mut(key).expect("just inserted")
    }

    /// One fd event at second `t`; `subject`, when it is one's, holds `fds` fds after it.
    pub fn fd_event(&mut self, t: u64, subject: Option<(&str, u64)>) {
        self.prune(t);
        self.fd_events.add(t, 0, 1);
        if let Some((key, fds)) = subject {
            let s = self.subject(key);
            s.events.add(t, 0, 1);
            s.fds.set(t, fds);
        }
    }

    /// `subject` holds `fds` fds from second `t` on.
    pub fn fds(&mut self, t: u64, subject: &str, fds: u64) {
        self.prune(t);
        self.subject(subject).fds.set(t, fds);
    }

    /// One verdict at second `t`, about `subject` when it is known.
    pub fn verdict(&mut self, t: u64, status: Status, subject: Option<&str>) {
        self.prune(t);
        let i = status_index(status);
        self.verdicts.add(t, i, 1);
        if let Some(key) = subject {
            self.subject(key).verdicts.add(t, i, 1);
        }
    }

    /// Events lost on the host, found at second `t`.
    pub fn lost(&mut self, t: u64, causes: &BTreeMap<&'static str, u64>) {
        if causes.is_empty() {
            return;
        }
        self.prune(t);
        match self.lost.back_mut() {
            Some((last, counts)) if *last >= t => {
                for (c, n) in causes {
                    *counts.entry(c).or_default() += n;
                }
            }
            _ => self.lost.push_back((t, causes.clone())),
        }
    }

    /// Cuts every series at the window ending at `now`, once per second at most.
    pub fn prune(&mut self, now: u64) {
        if now == self.pruned_at {
            return;
        }
        self.pruned_at = now;
        self.verdicts.prune(now);
        self.fd_events.prune(now);
        while self.lost.front().is_some_and(|(t, _)| !in_window(*t, now)) {
            self.lost.pop_front();
        }
        self.subjects.retain(|_, s| {
            s.prune(now);
            !s.is_stale(now)
        });
    }

    /// The JSON view, as of Unix time `now_ns`.
    pub fn view(&self, now_ns: u64) -> HistoryView<'_> {
        HistoryView {
            window_s: WINDOW_S,
            now: now_ns as f64 / 1e9,
            statuses: Status::ALL.map(Status::as_str),
            causes: vmaudit_common::LossCause::ALL.map(|c| c.name()),
            verdicts: &self.verdicts,
            fd_events: &self.fd_events,
            lost: &self.lost,
            subjects: &self.subjects,
        }
    }
}

/// `history` in `/api/state`.
#[derive(Serialize)]
pub struct HistoryView<'a> {
    window_s: u64,
    /// The hub's clock (Unix seconds) when the snapshot was taken: the page's clock is set by it.
    now: f64,
    /// The order of the counts in `verdicts`.
    statuses: [&'static str; 4],
    /// The loss causes the tracker knows (others may appear, such as a gap found by a check).
    causes: [&'static str; vmaudit_common::LossCause::ALL.len()],
    verdicts: &'a Rate<4>,
    fd_events: &'a Rate<1>,
    lost: &'a Lost,
    subjects: &'a BTreeMap<String, Subject>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_count_per_second_and_keep_the_window() {
        let mut r = Rate::<2>::default();
        r.add(100, 0, 1);
        r.add(100, 1, 2);
        r.add(101, 0, 1);
        // A clock that stepped back: counted in the latest second.
        r.add(99, 0, 5);
        assert_eq!(r.0, [(100, [1, 2]), (101, [6, 0])]);
        assert_eq!(r.sums(), [7, 2]);
        r.prune(100 + WINDOW_S - 1);
        assert_eq!(r.0.len(), 2, "second 100 is the window's first");
        r.prune(100 + WINDOW_S);
        assert_eq!(r.0, [(101, [6, 0])]);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            "[[101,[6,0]]]",
            "the JSON the page reads"
        );
    }

    #[test]
    fn steps_keep_changes_only_and_the_last_before_the_window() {
        let mut s = Steps::default();
        s.set(10, 3);
        s.set(11, 3);
        s.set(12, 4);
        assert_eq!(s.0, [(10, 3), (12, 4)]);
        // Back to 3 within second 12: as if it never changed.
        s.set(12, 3);
        assert_eq!(s.0, [(10, 3)]);
        s.set(12, 5);
        s.set(13, 0);
        assert_eq!(s.0, [(10, 3), (12, 5), (13, 0)]);
        // The window starts after 12: the line starts from the change at 12.
        s.prune(13 + WINDOW_S - 1);
        assert_eq!(s.0, [(12, 5), (13, 0)]);
        assert_eq!(s.last(), Some(0));
    }

    #[test]
    fn subjects_go_once_nothing_of_theirs_is_in_the_window() {
        let mut h = History::default();
        h.fd_event(1000, Some(("vm-a", 4)));
        h.fd_event(1000, Some(("vm-b", 2)));
        h.fd_event(1000, None);
        h.verdict(1001, Status::Violated, Some("vm-a"));
        h.lost(1002, &BTreeMap::from([("ring_full", 7)]));
        h.lost(1002, &BTreeMap::from([("ring_full", 1), ("user_read", 2)]));
        assert_eq!(h.fd_events.sums(), [3]);
        assert_eq!(h.verdicts.sums(), [0, 1, 0, 0]);
        assert_eq!(
            h.lost,
            [(1002, BTreeMap::from([("ring_full", 8), ("user_read", 2)]))]
        );
        // vm-b stops: 0 fds.
        h.fds(1003, "vm-b", 0);
        h.prune(1003 + WINDOW_S);
        // vm-a still holds 4 fds: kept, its line flat; vm-b holds none since before the window.
        assert_eq!(h.subjects.keys().collect::<Vec<_>>(), ["vm-a"]);
        assert_eq!(h.subjects["vm-a"].fds.last(), Some(4));
        assert!(h.fd_events.is_empty() && h.verdicts.is_empty() && h.lost.is_empty());
        let json: serde_json::Value = serde_json::to_value(h.view(2_000_000_000_000)).unwrap();
        assert_eq!(json["statuses"][1], "violated");
        assert_eq!(
            json["subjects"]["vm-a"]["fds"],
            serde_json::json!([[1000, 4]])
        );
        assert_eq!(json["now"], 2000.0);
    }
}
