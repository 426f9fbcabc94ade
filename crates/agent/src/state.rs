//! The state folder: one JSON file, `state.json`, rewritten atomically (temporary file, then
//! rename; mode 0600) whenever something an operator would ask about changes. The running
//! agent owns it; `beckon agent status` only reads it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// Another machine uses this agent's identity: the agent stopped fighting it for the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityConflict {
    /// Takeovers counted within the window when the agent paused.
    pub takeovers: u32,
    /// The window, seconds.
    pub window_secs: u64,
    /// When the agent paused, Unix seconds.
    pub paused_at: i64,
    /// When it connects again, Unix seconds.
    pub paused_until: i64,
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
    /// The proxy the last connection attempt used and where it came from
    /// (`http://proxy:3128 (system proxy: WinHTTP default proxy)`, `none (...)`).
    pub proxy: Option<String>,
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
    /// Set while the agent believes another machine uses its identity.
    pub identity_conflict: Option<IdentityConflict>,
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

/// The running agent's copy of its state. Every change is made in memory at once and then
/// written to disk on tokio's blocking pool, so an fsync never stalls the (single-threaded)
/// runtime; the caller awaits the write, so whatever it sends after the change (an ack, an
/// event) goes out only once the change is on disk.
pub struct StateStore {
    memory: Mutex<Versioned>,
    disk: Arc<Disk>,
}

/// The state in memory and how many changes it has seen.
struct Versioned {
    state: AgentState,
    version: u64,
}

/// The state folder's writer. Its lock is held for a whole write, so writes never
/// interleave, and it remembers which version is on disk, so an older state that reaches
/// the blocking pool late never replaces a newer one.
struct Disk {
    dir: PathBuf,
    written: Mutex<u64>,
}

impl Disk {
    /// Writes `state`, the `version`th change, unless that version or a later one is on disk
    /// already (a later version includes every earlier change).
    fn write(&self, state: &AgentState, version: u64) -> Result<(), StateError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if *written >= version {
            return Ok(());
        }
        state.write(&self.dir)?;
        *written = version;
        Ok(())
    }
}

impl StateStore {
    /// Opens (creating the folder 0700 if needed) and loads the previous state, keeping the
    /// last working path and the replay guard; connection fields start over. Nothing is
    /// written until the first update.
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
        // A new process counts takeovers afresh (the pause lives in the process).
        state.identity_conflict = None;
        Ok(Self {
            memory: Mutex::new(Versioned { state, version: 0 }),
            disk: Arc::new(Disk {
                dir: dir.to_owned(),
                written: Mutex::new(0),
            }),
        })
    }

    /// The state folder.
    pub fn dir(&self) -> &Path {
        &self.disk.dir
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> AgentState {
        self.lock().state.clone()
    }

    /// Changes the state and writes it to disk; returns what `change` returned once the
    /// change is on disk. When the write fails the change stays in memory (and reaches the
    /// disk with the next write that succeeds).
    pub async fn update<T>(
        &self,
        change: impl FnOnce(&mut AgentState) -> T,
    ) -> Result<T, StateError> {
        let (out, written) = self.change_and_write(change).await;
        written.map(|()| out)
    }

    /// Like [`StateStore::update`], but a failed write is only logged: the agent keeps
    /// working when its disk is full, and says so.
    pub async fn update_logged<T>(&self, change: impl FnOnce(&mut AgentState) -> T) -> T {
        let (out, written) = self.change_and_write(change).await;
        if let Err(e) = written {
            tracing::error!(
                error = %e,
                "cannot save the agent state; the agent keeps running with it in memory, and `beckon agent status` shows older data until a later save succeeds"
            );
        }
        out
    }

    /// Records an error in plain words.
    pub async fn record_error(&self, message: impl Into<String>) {
        let message = message.into();
        self.update_logged(|s| {
            s.last_error = Some(LastError {
                message,
                at: unix_now(),
            });
        })
        .await;
    }

    async fn change_and_write<T>(
        &self,
        change: impl FnOnce(&mut AgentState) -> T,
    ) -> (T, Result<(), StateError>) {
        let (out, state, version) = {
            let mut memory = self.lock();
            let out = change(&mut memory.state);
            memory.state.updated_at = unix_now();
            memory.version += 1;
            (out, memory.state.clone(), memory.version)
        };
        let disk = Arc::clone(&self.disk);
        let written = match tokio::task::spawn_blocking(move || disk.write(&state, version)).await {
            Ok(written) => written,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StateError::Io {
                path: self.disk.dir.join(STATE_FILE),
                source: std::io::Error::other(format!("the write did not run: {e}")),
            }),
        };
        (out, written)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Versioned> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::sync::atomic::{AtomicBool, Ordering};

    const ID: &str = "0190d6e0-0000-7000-8000-000000000001";

    #[tokio::test]
    async fn written_atomically_with_mode_0600_and_read_back() {
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
            .await
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

    /// The agent's runtime has one thread: while a write waits for the disk, that thread
    /// must stay free for the connection. Here the write blocks (its temporary file is a
    /// FIFO nobody reads) until another task on the runtime has run. (FIFOs are Unix's.)
    #[cfg(unix)]
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_waiting_for_the_disk_leaves_the_runtime_free_and_keeps_the_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path(), "a1").expect("open");
        let tmp = dir
            .path()
            .join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let made = std::process::Command::new("mkfifo")
            .arg(&tmp)
            .status()
            .expect("mkfifo");
        assert!(made.success(), "mkfifo {}", tmp.display());
        let runtime_ran = Arc::new(AtomicBool::new(false));
        let reader = std::thread::spawn({
            let runtime_ran = Arc::clone(&runtime_ran);
            let tmp = tmp.clone();
            move || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while !runtime_ran.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let ran = runtime_ran.load(Ordering::SeqCst);
                (ran, std::fs::read(&tmp).expect("read the FIFO"))
            }
        });
        let other = tokio::spawn({
            let runtime_ran = Arc::clone(&runtime_ran);
            async move { runtime_ran.store(true, Ordering::SeqCst) }
        });
        let written = store.update(|s| s.connected = true).await;
        let (ran_while_writing, bytes) = reader.join().expect("reader");
        other.await.expect("other task");
        assert!(
            ran_while_writing,
            "another task ran while the write waited for the disk"
        );
        let sent: AgentState = serde_json::from_slice(&bytes).expect("the state went out");
        assert!(sent.connected);

        // A FIFO cannot be synced: the write fails, and the change stays in memory...
        let err = written.expect_err("fsync on a FIFO fails");
        assert!(err.to_string().contains(STATE_FILE), "{err}");
        assert!(store.snapshot().connected);
        // ...and reaches the disk with the next write.
        std::fs::remove_file(&tmp).expect("remove the FIFO");
        store
            .update(|s| s.path = Some("8883".into()))
            .await
            .expect("update");
        let read = AgentState::read(dir.path()).expect("read").expect("exists");
        assert!(read.connected);
        assert_eq!(read.path.as_deref(), Some("8883"));
    }

    /// Updates from two tasks reach the blocking pool in any order; the later state wins.
    #[test]
    fn an_older_state_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::open(dir.path(), "a1").expect("open");
        let older = AgentState {
            path: Some("older".into()),
            ..AgentState::default()
        };
        let newer = AgentState {
            path: Some("newer".into()),
            ..AgentState::default()
        };
        store.disk.write(&newer, 2).expect("write the newer state");
        store.disk.write(&older, 1).expect("skip the older state");
        let read = AgentState::read(dir.path()).expect("read").expect("exists");
        assert_eq!(read.path.as_deref(), Some("newer"));
    }

    #[test]
    fn damaged_file_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").expect("write");
        let err = AgentState::read(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
