//! How far the agent's long operations have got (a recovery, a restore in
//! place): the worker counts bytes, `status` lists what runs, and the CLI
//! that asked for the operation draws it as a bar while it waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One running operation's counters.
#[derive(Debug)]
pub struct Progress {
    kind: &'static str,
    folder: String,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// A counter not listed anywhere (for callers that show no progress).
    pub fn unlisted() -> Self {
        Self {
            kind: "",
            folder: String::new(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    /// `n` more bytes are done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// The operation will handle `n` bytes in all.
    pub fn set_total(&self, n: u64) {
        self.total.store(n, Ordering::Relaxed);
    }
}

/// What `status` says of a running operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperationStatus {
    /// `recover` or `restore`.
    pub kind: String,
    /// The folder it works on.
    pub folder: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (0 while not yet known).
    pub total: u64,
}

/// The operations running now.
#[derive(Debug, Default)]
pub struct Operations(Mutex<Vec<Arc<Progress>>>);

/// A listed operation; dropping it takes it off the list.
#[derive(Debug)]
pub struct Running<'a> {
    list: &'a Operations,
    progress: Arc<Progress>,
}

impl std::ops::Deref for Running<'_> {
    type Target = Progress;
    fn deref(&self) -> &Progress {
        &self.progress
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut ops = self.list.0.lock().unwrap_or_else(|p| p.into_inner());
        ops.retain(|p| !Arc::ptr_eq(p, &self.progress));
    }
}

impl Running<'_> {
    /// The counters, for a worker on another thread.
    pub fn shared(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}

impl Operations {
    /// Lists a new operation until the returned guard is dropped.
    pub fn start(&self, kind: &'static str, folder: &str) -> Running<'_> {
        let progress = Arc::new(Progress {
            kind,
            folder: folder.to_owned(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
        });
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(progress.clone());
        Running {
            list: self,
            progress,
        }
    }

    /// Every operation running, oldest first.
    pub fn list(&self) -> Vec<OperationStatus> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| OperationStatus {
                kind: p.kind.to_owned(),
                folder: p.folder.clone(),
                done: p.done.load(Ordering::Relaxed),
                total: p.total.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_is_listed_with_its_counts_until_dropped() {
        let ops = Operations::default();
        {
            let r = ops.start("recover", "docs");
            r.set_total(100);
            r.add(40);
            let _other = ops.start("restore", "pics");
            let list = ops.list();
            assert_eq!(list.len(), 2);
            assert_eq!(
                list[0],
                OperationStatus {
                    kind: "recover".into(),
                    folder: "docs".into(),
                    done: 40,
                    total: 100
                }
            );
        }
        assert!(ops.list().is_empty());
    }
}
