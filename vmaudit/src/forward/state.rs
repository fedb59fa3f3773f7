//! `--state FILE`: how far each journal was forwarded (the file, by inode, and the byte after
//! the last line sent), so that a restart resumes there. Written to `FILE.tmp`, fsync'd, then
//! renamed over FILE: a crash leaves the old state or the new one, never half of one.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use crate::follow::Position;

#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// By the journal's absolute path.
    journals: BTreeMap<PathBuf, Position>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state file {} is not one vmaudit forward wrote", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl State {
    /// The state in `path`, or an empty one when there is no such file yet.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| StateError::Parse {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_string(self).expect("positions always serialise");
        let written = File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        written.map_err(|source| StateError::Write {
            path: path.to_owned(),
            source,
        })
    }

    pub fn get(&self, journal: &Path) -> Option<Position> {
        self.journals.get(journal).copied()
    }

    pub fn set(&mut self, journal: &Path, at: Position) {
        self.journals.insert(journal.to_owned(), at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_saved_and_loaded_and_a_missing_file_is_empty() {
        let dir = std::env::temp_dir().join(format!("vmaudit-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("forward.state");
        assert_eq!(State::load(&file).unwrap(), State::default());
        let mut s = State::default();
        let at = Position {
            ino: 12,
            offset: 345,
        };
        s.set(Path::new("/var/log/vmaudit/web1.jsonl"), at);
        s.save(&file).unwrap();
        let back = State::load(&file).unwrap();
        assert_eq!(back.get(Path::new("/var/log/vmaudit/web1.jsonl")), Some(at));
        std::fs::write(&file, "{\"x\":1}").unwrap();
        assert!(matches!(State::load(&file), Err(StateError::Parse { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
