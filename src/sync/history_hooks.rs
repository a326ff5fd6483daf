//! What the history needs of the engine: to hear when local records change
//! (pulls set versions aside, scans record versions to capture).

use super::Engine;

impl Engine {
    /// A receiver that changes after every local index commit (scan or pull).
    pub fn watch_local_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local_changes.subscribe()
    }
}
