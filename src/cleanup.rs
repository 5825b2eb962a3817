//! Paths to remove if the process is interrupted (Ctrl-C, SIGTERM): temporary
//! output files and the calibration activation store. Normal success and failure
//! paths clean up through `Drop`; a signal skips destructors, so the CLI's signal
//! handler calls [`remove_all`] before exiting.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Registers a file or directory to remove on interruption.
pub fn register(path: &Path) {
    if let Ok(mut pending) = PENDING.lock() {
        pending.push(path.to_path_buf());
    }
}

/// Forgets a path (it was committed, or already removed).
pub fn unregister(path: &Path) {
    if let Ok(mut pending) = PENDING.lock() {
        pending.retain(|p| p != path);
    }
}

/// Removes every registered path; called from the interrupt handler.
pub fn remove_all() {
    // try_lock: the handler must not wait on a lock held by the thread it interrupts.
    if let Ok(mut pending) = PENDING.try_lock() {
        for path in pending.drain(..) {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}
