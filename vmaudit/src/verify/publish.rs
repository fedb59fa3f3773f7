//! Where verdicts go once judged: the journal (one write and one fsync per batch) and, if
//! asked, stdout, on a thread of their own so that an fsync never delays a judgement. The first
//! failure stops the writing and is what [`Publisher::finish`] returns: a verdict is never
//! dropped without saying so.

use std::{io::Write as _, thread::JoinHandle};

use vmaudit_core::verdict::Verdict;

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

/// Writes batches of verdicts, in order.
pub trait Publish: Send {
    fn publish(&mut self, batch: &[Verdict]) -> Result<(), PublishError>;
}

/// The journal (if any), then stdout (if asked): a JSON line per verdict each.
pub struct Lines {
    pub journal: Option<Journal>,
    pub echo: bool,
}

impl Publish for Lines {
    fn publish(&mut self, batch: &[Verdict]) -> Result<(), PublishError> {
        if let Some(j) = self.journal.as_mut() {
            j.append_all(batch)?;
        }
        if self.echo {
            let mut out = std::io::stdout().lock();
            for v in batch {
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
    tx: Option<std::sync::mpsc::Sender<Vec<Verdict>>>,
    thread: Option<JoinHandle<Result<(), PublishError>>>,
}

impl Publisher {
    pub fn start(mut p: Box<dyn Publish>) -> Result<Self, PublishError> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Verdict>>();
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
    pub fn send(&self, batch: Vec<Verdict>) {
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
