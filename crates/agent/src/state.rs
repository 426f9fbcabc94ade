//! The state folder: one JSON file, `state.json`, rewritten atomically (temporary file, then
//! rename; mode 0600) whenever something an operator would ask about changes. The running
//! agent owns it; `beckon agent status` only reads it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::timefmt::unix_now;

/// The file name inside the state folder.
pub const STATE_FILE: &str = "state.json";

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or renaming failed.
    #[error("agent state {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not the JSON the agent writes.
    #[error(
        "agent state {path} is damaged ({source}); stop the agent, delete the file and start it again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// The last wake-up accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastWakeUp {
    /// Wake-up id.
    pub id: String,
    /// Why it was sent.
    pub reason: String,
    /// When it arrived, Unix seconds.
    pub received_at: i64,
}

/// The outcome of the last action run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    /// The wake-up ids the run answered (several when wake-ups merged).
    pub wakeup_ids: Vec<String>,
    /// `ok`, `failed`, `timeout` or `error`.
    pub status: String,
    /// Exit code of the command, when one ran and exited.
    pub exit_code: Option<i32>,
    /// How long the actions took, milliseconds.
    pub duration_ms: u64,
    /// When the run finished, Unix seconds.
    pub finished_at: i64,
    /// What went wrong, in plain words.
    pub detail: Option<String>,
}

/// The last error, in plain words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// What failed and what to do.
    pub message: String,
    /// When, Unix seconds.
    pub at: i64,
}

/// Everything in `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentState {
    /// Process id of the agent that wrote the file.
    pub pid: Option<u32>,
    /// The agent's id.
    pub agent_id: Option<String>,
    /// Whether the push connection is up.
    pub connected: bool,
    /// The path in use, or last used (`direct:8883`, `proxy:443-websocket`, ...).
    pub path: Option<String>,
    /// The last path that reached CONNACK success; the ladder starts there.
    pub last_working_path: Option<String>,
    /// Since when connected (or disconnected), Unix seconds.
    pub since: Option<i64>,
    /// The last accepted wake-up.
    pub last_wakeup: Option<LastWakeUp>,
    /// The last action run.
    pub last_result: Option<LastResult>,
    /// The last error.
    pub last_error: Option<LastError>,
    /// Why the last established connection ended.
    pub last_disconnect: Option<LastError>,
    /// Ids of accepted wake-ups, kept until they expire (a restart opens no replay window).
    pub replay_guard: beckon_identity::wakeup::ReplayGuard,
    /// When the file was written, Unix seconds.
    pub updated_at: i64,
}

impl AgentState {
    /// Reads `state.json` from a state folder; `Ok(None)` when the agent never wrote one.
    pub fn read(state_dir: &Path) -> Result<Option<Self>, StateError> {
        let path = state_dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Writes `state.json` atomically with mode 0600.
    pub fn write(&self, state_dir: &Path) -> Result<(), StateError> {
        let path = state_dir.join(STATE_FILE);
        let tmp = state_dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| StateError::Io { path: p, source }
        };
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut file = crate::platform::private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }
}

/// The running agent's copy of its state, written to disk on every change.
pub struct StateStore {
    dir: PathBuf,
    state: Mutex<AgentState>,
}

impl StateStore {
    /// Opens (creating the folder 0700 if needed) and loads the previous state, keeping the
    /// last working path and the replay guard; connection fields start over.
    pub fn open(dir: &Path, agent_id: &str) -> Result<Self, StateError> {
        if !dir.exists() {
            crate::platform::create_dir(dir, 0o700).map_err(|source| StateError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut state = match AgentState::read(dir) {
            Ok(state) => state.unwrap_or_default(),
            Err(StateError::Corrupt { path, source }) => {
                tracing::warn!(path = %path.display(), error = %source, "agent state damaged; starting afresh");
                AgentState::default()
            }
            Err(e) => return Err(e),
        };
        state.pid = Some(std::process::id());
        state.agent_id = Some(agent_id.to_owned());
        state.connected = false;
        state.since = Some(unix_now());
        let store = Self {
            dir: dir.to_owned(),
            state: Mutex::new(state),
        };
        store.update(|_| ())?;
        Ok(store)
    }

    /// The state folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> AgentState {
        self.lock().clone()
    }

    /// Changes the state and writes it to disk; returns what `change` returned.
    pub fn update<T>(&self, change: impl FnOnce(&mut AgentState) -> T) -> Result<T, StateError> {
        let mut state = self.lock();
        let out = change(&mut state);
        state.updated_at = unix_now();
        state.write(&self.dir)?;
        Ok(out)
    }

    /// Like [`StateStore::update`], but a failed write is only logged: the agent keeps
    /// working when its disk is full, and says so.
    pub fn update_logged<T>(&self, change: impl FnOnce(&mut AgentState) -> T) -> T {
        let mut state = self.lock();
        let out = change(&mut state);
        state.updated_at = unix_now();
        if let Err(e) = state.write(&self.dir) {
            tracing::error!(error = %e, "cannot save agent state");
        }
        out
    }

    /// Records an error in plain words.
    pub fn record_error(&self, message: impl Into<String>) {
        let message = message.into();
        self.update_logged(|s| {
            s.last_error = Some(LastError {
                message,
                at: unix_now(),
            });
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0190d6e0-0000-7000-8000-000000000001";

    #[test]
    fn written_atomically_with_mode_0600_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path(), "a1").expect("open");
        store
            .update(|s| {
                s.connected = true;
                s.path = Some("direct:8883".into());
                s.replay_guard
                    .admit(ID, unix_now() + 60, unix_now())
                    .expect("new id");
            })
            .expect("update");
        let path = dir.path().join(STATE_FILE);
        assert!(path.is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let read = AgentState::read(dir.path()).expect("read").expect("exists");
        assert!(read.connected);
        assert!(
            read.replay_guard
                .clone()
                .admit(ID, unix_now() + 60, unix_now())
                .is_err()
        );
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        // Reopening keeps the replay guard but not the connection.
        drop(store);
        let store = StateStore::open(dir.path(), "a1").expect("reopen");
        let mut s = store.snapshot();
        assert!(!s.connected);
        assert!(
            s.replay_guard
                .admit(ID, unix_now() + 60, unix_now())
                .is_err(),
            "the replay guard survives a restart"
        );
    }

    #[test]
    fn damaged_file_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").expect("write");
        let err = AgentState::read(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
