//! Files that may change under a running server (certificates and keys that
//! cert-manager rewrites, the token file), re-read on a poll.
//!
//! A poll of the files' content, rather than file-system events: Kubernetes
//! updates a mounted Secret by swapping a symlink to a new directory, which
//! inotify on the file's path does not report, while reading a few small
//! files every couple of seconds costs nothing measurable. The promise is
//! "new connections use the new certificate within a minute"; a change is
//! seen within [`POLL_INTERVAL`].

use std::{path::Path, time::Duration};

use tokio_util::sync::CancellationToken;

/// How often watched files are read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The content of a set of files as last loaded, to tell when any changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot(Vec<Option<Vec<u8>>>);

impl Snapshot {
    /// Reads every file; one that cannot be read counts as `None`, so that
    /// a file that disappears and comes back is seen as a change.
    pub fn read(paths: &[&Path]) -> Self {
        Self(paths.iter().map(|p| std::fs::read(p).ok()).collect())
    }
}

/// A file's content, or why it could not be read, naming the path (never
/// the content: it may be a key or a token).
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Calls `check` every [`POLL_INTERVAL`] until `stop`.
pub async fn poll(stop: CancellationToken, mut check: impl FnMut() + Send) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is now: the files were just loaded
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => check(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_changes_with_content_and_with_a_missing_file() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("f");
        std::fs::write(&path, "one").expect("written");
        let first = Snapshot::read(&[&path]);
        assert_eq!(first, Snapshot::read(&[&path]));
        std::fs::write(&path, "two").expect("written");
        let second = Snapshot::read(&[&path]);
        assert_ne!(first, second);
        std::fs::remove_file(&path).expect("removed");
        assert_ne!(second, Snapshot::read(&[&path]));
    }
}
