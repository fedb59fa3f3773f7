//! Events the kernel could not deliver: per process, the window in which they were lost. A
//! verdict whose window overlaps a loss of one of its processes is `unknown`.

use crate::verdict::Evidence;

/// Events lost for `pid` (0: for every process) between `from_ns` and `to_ns` (kernel
/// CLOCK_MONOTONIC): after the last check that found none, up to the check that found them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    pub pid: u32,
    pub from_ns: u64,
    pub to_ns: u64,
    pub lost: u64,
}

impl Loss {
    fn touches(&self, pids: &[u32], from: u64, to: u64) -> bool {
        (self.pid == 0 || pids.contains(&self.pid)) && self.from_ns <= to && self.to_ns >= from
    }

    /// The loss as evidence.
    pub fn evidence(&self) -> Evidence {
        Evidence::new(self.pid, "lost")
            .at(self.to_ns)
            .detail(format!(
                "{} kernel event(s) lost between {} and {} ns",
                self.lost, self.from_ns, self.to_ns
            ))
    }
}

/// Every loss seen, merged per process where windows touch.
#[derive(Clone, Debug, Default)]
pub struct Losses(Vec<Loss>);

impl Losses {
    pub fn add(&mut self, loss: Loss) {
        let loss = Loss {
            lost: loss.lost.max(1),
            ..loss
        };
        match self
            .0
            .iter_mut()
            .find(|l| l.pid == loss.pid && l.from_ns <= loss.to_ns && l.to_ns >= loss.from_ns)
        {
            Some(l) => {
                l.from_ns = l.from_ns.min(loss.from_ns);
                l.to_ns = l.to_ns.max(loss.to_ns);
                l.lost += loss.lost;
            }
            None => self.0.push(loss),
        }
    }

    /// The losses of any of `pids` that overlap `[from, to]`.
    pub fn within(&self, pids: &[u32], from: u64, to: u64) -> Vec<Loss> {
        self.0
            .iter()
            .filter(|l| l.touches(pids, from, to))
            .copied()
            .collect()
    }

    /// Forgets losses that ended before `before` (no open window reaches back that far).
    pub fn prune(&mut self, before: u64) {
        self.0.retain(|l| l.to_ns >= before);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_per_process_and_host_wide() {
        let mut l = Losses::default();
        l.add(Loss {
            pid: 7,
            from_ns: 100,
            to_ns: 200,
            lost: 3,
        });
        assert_eq!(l.within(&[7], 150, 300).len(), 1);
        assert_eq!(l.within(&[7], 201, 300).len(), 0, "after the window");
        assert_eq!(l.within(&[7], 0, 99).len(), 0, "before the window");
        assert_eq!(l.within(&[8], 0, 1000).len(), 0, "another process");
        l.add(Loss {
            pid: 7,
            from_ns: 190,
            to_ns: 260,
            lost: 1,
        });
        let merged = l.within(&[7], 250, 250);
        assert_eq!((merged[0].from_ns, merged[0].lost), (100, 4));
        l.add(Loss {
            pid: 0,
            from_ns: 500,
            to_ns: 600,
            lost: 0,
        });
        assert_eq!(l.within(&[9], 550, 551)[0].lost, 1, "host-wide, counted");
        l.prune(300);
        assert_eq!(l.within(&[7], 0, 400).len(), 0, "pruned");
        assert_eq!(l.within(&[7], 0, 1000).len(), 1, "the host-wide one stays");
    }
}
