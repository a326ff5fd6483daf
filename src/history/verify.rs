//! Checking the whole history: every chunk in the store read back against its
//! hash, every stored version's chunks present, every pending version's file
//! there and matching its chunks.

use serde::Serialize;

use super::Result;
use super::ingest::check_pending;
use super::store::{ChunkStore, VerifyReport};
use crate::chunking::ChunkHash;
use crate::index::Index;

/// A problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What it concerns: a pack, a chunk or a version.
    pub what: String,
    /// What is wrong.
    pub problem: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HistoryCheck {
    /// Packs read.
    pub packs: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Chunk bytes read back intact.
    pub bytes: u64,
    /// Pending version files checked.
    pub pending: u64,
    /// Versions that cannot be restored intact.
    pub versions_affected: u64,
    /// Everything wrong, one entry per damaged chunk, missing chunk or bad
    /// pending file.
    pub damage: Vec<Finding>,
}

impl HistoryCheck {
    /// Whether nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Checks the store and the pending versions.
pub fn verify(index: &Index, store: &ChunkStore) -> Result<HistoryCheck> {
    let VerifyReport {
        packs,
        chunks,
        bytes,
        damaged,
        unstored: _,
    } = store.verify(index)?;
    let mut check = HistoryCheck {
        packs,
        chunks,
        bytes,
        ..HistoryCheck::default()
    };
    let mut bad: Vec<ChunkHash> = Vec::new();
    for d in damaged {
        check.damage.push(Finding {
            what: format!("chunk {} in pack {}", d.hash, d.pack),
            problem: d.damage.to_string(),
        });
        bad.push(d.hash);
    }
    // Versions marked stored whose chunks the store lacks (pending versions'
    // chunks are not expected there yet).
    for (hash, versions) in index.history_missing_chunks()? {
        check.damage.push(Finding {
            what: format!("chunk {hash}"),
            problem: format!("missing from the store ({versions} versions need it)"),
        });
        bad.push(hash);
    }
    check.versions_affected = index.history_versions_using(&bad)?;
    for p in index.history_pending(usize::MAX >> 1)? {
        check.pending += 1;
        if let Some(problem) = check_pending(index, &p)? {
            check.versions_affected += 1;
            check.damage.push(Finding {
                what: format!(
                    "version {} ({}), set aside in {}",
                    p.id,
                    p.path,
                    p.root.display()
                ),
                problem,
            });
        }
    }
    Ok(check)
}
