//! Where verdicts go once judged: the journal (one write and one fsync per batch) and, if
//! asked, stdout, on a thread of their own so that an fsync never delays a judgement. The first
//! failure stops the writing and is what [`Publisher::finish`] returns: a verdict is never
//! dropped without saying so.

use std::{io::Write as _, thread::JoinHandle};

use vmaudit_core::{audit::JournalEntry, verdict::Verdict};

use crate::audit::{Journal, JournalError};

/// Why verdicts could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("writing verdicts to stdout")]
    Stdout(#[source] std::io::Error),
    #[error("starting the verdict writer")]
    Start(#[source] std::io::Error),
    #[error("the verdict writer panicked")]
    Panicked,
}

/// One journal line the verifier writes: a verdict, or (`monitor`) the record it judged.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // batched in a Vec; boxing would add an allocation per line
pub enum Line {
    Verdict(Verdict),
    Record(JournalEntry),
}

/// Writes batches of lines, in order.
pub trait Publish: Send {
    fn publish(&mut self, batch: &[Line]) -> Result<(), PublishError>;
}

/// The journal (if any), then stdout (if asked, verdicts only): a JSON line each. With
/// `reopen`, the journal is opened again by its path before the next batch once the flag is
/// set (SIGHUP, after logrotate moved it).
pub struct Lines {
    pub journal: Option<Journal>,
    pub echo: bool,
    pub reopen: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Lines {
    fn reopen_if_asked(&mut self) -> Result<(), PublishError> {
        let asked = self
            .reopen
            .as_ref()
            .is_some_and(|f| f.swap(false, std::sync::atomic::Ordering::Relaxed));
        if let (true, Some(j)) = (asked, self.journal.as_mut()) {
            let path = j.path().to_owned();
            *j = Journal::open(&path)?;
            log::warn!("journal {} reopened", path.display());
        }
        Ok(())
    }
}

impl Publish for Lines {
    fn publish(&mut self, batch: &[Line]) -> Result<(), PublishError> {
        self.reopen_if_asked()?;
        if let Some(j) = self.journal.as_mut() {
            j.append_all(batch)?;
        }
        if self.echo {
            let mut out = std::io::stdout().lock();
            for v in batch.iter().filter_map(|l| match l {
                Line::Verdict(v) => Some(v),
                Line::Record(_) => None,
            }) {
                serde_json::to_writer(&mut out, v).map_err(|e| PublishError::Stdout(e.into()))?;
                out.write_all(b"\n").map_err(PublishError::Stdout)?;
            }
            out.flush().map_err(PublishError::Stdout)?;
        }
        Ok(())
    }
}

/// The writing thread.
pub struct Publisher {
    tx: Option<std::sync::mpsc::Sender<Vec<Line>>>,
    thread: Option<JoinHandle<Result<(), PublishError>>>,
}

impl Publisher {
    pub fn start(mut p: Box<dyn Publish>) -> Result<Self, PublishError> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Line>>();
        let thread = std::thread::Builder::new()
            .name("vmaudit-verdicts".into())
            .spawn(move || {
                for batch in rx {
                    p.publish(&batch)?;
                }
                Ok(())
            })
            .map_err(PublishError::Start)?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a batch. After a failure the writer is gone; [`Publisher::finish`] says why.
    pub fn send(&self, batch: Vec<Line>) {
        if let Some(tx) = &self.tx
            && tx.send(batch).is_err()
        {
            log::error!("verdicts are no longer written (the cause follows at the end)");
        }
    }

    /// Waits until every queued verdict is written; the first failure, if any.
    pub fn finish(mut self) -> Result<(), PublishError> {
        self.close()
    }

    fn close(&mut self) -> Result<(), PublishError> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(PublishError::Panicked),
            None => Ok(()),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("writing verdicts: {e}");
        }
    }
}
