//! Sealing and opening throughput for ferry's 64 KiB mean chunk, to set beside
//! `benches/chunking.rs`: `vault/seal` and `vault/open` are one chunk each on one
//! thread (open includes the blake3 re-hash that ties the plaintext to its id),
//! `vault/blake3` is the plain hash of the same chunk for scale, and
//! `vault/record_*` is one typical record (a 1 MiB file's 16 chunks listed).
//!
//! Run with `cargo bench --bench vault`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry::chunking::{ChunkHash, FileHash};
use ferry::device::ShortId;
use ferry::folder::FolderId;
use ferry::relpath::RelPath;
use ferry::vault::{
    FolderSecret, RecordKind, VaultRecord, open_chunk, open_record, seal_chunk, seal_record,
};
use ferry::version_vector::VersionVector;

const LEN: usize = 64 * 1024;

/// Deterministic incompressible bytes (xorshift64), as in `benches/chunking.rs`.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn benches(c: &mut Criterion) {
    let keys = FolderSecret::from_bytes([9; 32]).keys();
    let folder = FolderId::new("bench").expect("a valid folder id");
    let data = pseudo_random(LEN, 0x00fe_1234_5678_9abc);
    let hash = ChunkHash::from(blake3::hash(&data));
    let sealed = seal_chunk(&keys, &folder, &hash, &data).expect("64 KiB fits");
    eprintln!(
        "vault: a {LEN}-byte chunk seals to {} bytes ({:+.2}%)",
        sealed.bytes.len(),
        (sealed.bytes.len() as f64 / LEN as f64 - 1.0) * 100.0
    );

    let mut g = c.benchmark_group("vault");
    g.throughput(Throughput::Bytes(LEN as u64))
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("blake3", |b| {
        b.iter(|| black_box(blake3::hash(black_box(&data))))
    });
    g.bench_function("seal", |b| {
        b.iter(|| black_box(seal_chunk(&keys, &folder, &hash, black_box(&data))))
    });
    g.bench_function("open", |b| {
        b.iter(|| {
            black_box(open_chunk(
                &keys,
                &folder,
                &sealed.id,
                black_box(&sealed.bytes),
            ))
        })
    });

    let record = VaultRecord {
        path: RelPath::new("projects/ferry/notes/2026-01-01.md").expect("a valid path"),
        kind: RecordKind::File,
        size: 1 << 20,
        mtime_ns: 1_767_225_600_000_000_000,
        permissions: 0o644,
        hash: Some(FileHash([1; 32])),
        symlink_target: None,
        deleted: false,
        version: VersionVector::new()
            .with(ShortId(1), 12)
            .with(ShortId(2), 3),
        modified_by: ShortId(1),
        chunks: (0..16u8).map(|i| (ChunkHash([i; 32]), 65_536)).collect(),
        revision: 12,
        superseded_at_ns: None,
    };
    let sealed_record = seal_record(&keys, &folder, &record).expect("a small record");
    g.throughput(Throughput::Elements(1));
    g.bench_function("record_seal", |b| {
        b.iter(|| black_box(seal_record(&keys, &folder, black_box(&record))))
    });
    g.bench_function("record_open", |b| {
        b.iter(|| {
            black_box(open_record(
                &keys,
                &folder,
                &sealed_record.id,
                0,
                black_box(&sealed_record.bytes),
            ))
        })
    });
    g.finish();
}

criterion_group!(vault, benches);
criterion_main!(vault);
