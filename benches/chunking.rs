//! Chunking throughput on 64 MiB of pseudo-random in-memory data.
//!
//! `raw/*` are the two passes the pipeline is built from, each alone on one
//! thread; `pipeline/*` are ferry's entry points (`chunk_reader_reusing`: a
//! rescan of the data with 100 bytes inserted mid-way, given the old list); `params/*` compares chunk size
//! settings and also prints, once per setting, the mean chunk size and how many
//! bytes a one-byte insert in the middle makes new (what a peer must re-fetch).
//!
//! Run with `cargo bench --bench chunking` (add `-- params` for just the sizes).

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Once;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use fastcdc::v2020::FastCDC;
use ferry::chunking::{
    ChunkHash, ChunkParams, DEFAULT_PARAMS, chunk_bytes, chunk_reader, chunk_reader_reusing,
};

const LEN: usize = 64 * 1024 * 1024;
const KIB: u32 = 1024;

/// Deterministic incompressible bytes (xorshift64), so runs are comparable.
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

fn configure<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(LEN as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    g
}

fn raw(c: &mut Criterion, data: &[u8]) {
    let mut g = configure(c, "raw");
    g.bench_function("blake3", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new();
            h.update(black_box(data));
            black_box(h.finalize())
        })
    });
    g.bench_function("fastcdc", |b| {
        b.iter(|| {
            let cdc = FastCDC::new(black_box(data), 16384, 65536, 262144);
            black_box(cdc.map(|chunk| chunk.length).sum::<usize>())
        })
    });
    g.finish();
}

fn pipeline(c: &mut Criterion, data: &[u8]) {
    let mut g = configure(c, "pipeline");
    g.bench_function("chunk_reader", |b| {
        b.iter(|| black_box(chunk_reader(black_box(data), DEFAULT_PARAMS).expect("in-memory read")))
    });
    g.bench_function("chunk_bytes", |b| {
        b.iter(|| black_box(chunk_bytes(black_box(data), DEFAULT_PARAMS)))
    });
    // A rescan after 100 bytes were inserted in the middle, with the list of
    // the version before (what the scanner does for a changed large file).
    let old = chunk_bytes(data, DEFAULT_PARAMS).chunks;
    let mid = data.len() / 2;
    let mut edited = Vec::with_capacity(data.len() + 100);
    edited.extend_from_slice(&data[..mid]);
    edited.extend_from_slice(&[0x5a; 100]);
    edited.extend_from_slice(&data[mid..]);
    g.bench_function("chunk_reader_reusing", |b| {
        b.iter(|| {
            black_box(
                chunk_reader_reusing(black_box(&edited[..]), DEFAULT_PARAMS, &old)
                    .expect("in-memory read"),
            )
        })
    });
    g.finish();
}

/// Prints the mean chunk size and the bytes in chunks that are new after one
/// byte is inserted in the middle of `data`.
fn report_edit_cost(name: &str, data: &[u8], params: ChunkParams) {
    let before = chunk_bytes(data, params);
    let mid = data.len() / 2;
    let mut edited = Vec::with_capacity(data.len() + 1);
    edited.extend_from_slice(&data[..mid]);
    edited.push(0x5a);
    edited.extend_from_slice(&data[mid..]);
    let after = chunk_bytes(&edited, params);

    let old: HashSet<ChunkHash> = before.chunks.iter().map(|c| c.hash).collect();
    let new: Vec<_> = after
        .chunks
        .iter()
        .filter(|c| !old.contains(&c.hash))
        .collect();
    let resent: u64 = new.iter().map(|c| u64::from(c.len)).sum();
    eprintln!(
        "params/{name}: {} chunks, mean {:.1} KiB; 1-byte insert at the middle: {} new chunks, {:.1} KiB to re-send",
        before.chunks.len(),
        data.len() as f64 / before.chunks.len() as f64 / 1024.0,
        new.len(),
        resent as f64 / 1024.0,
    );
}

fn params(c: &mut Criterion, data: &[u8]) {
    let settings = [
        (
            "4-16-64KiB",
            ChunkParams {
                min: 4 * KIB,
                avg: 16 * KIB,
                max: 64 * KIB,
            },
        ),
        (
            "16-64-256KiB",
            ChunkParams {
                min: 16 * KIB,
                avg: 64 * KIB,
                max: 256 * KIB,
            },
        ),
        (
            "64-256-1024KiB",
            ChunkParams {
                min: 64 * KIB,
                avg: 256 * KIB,
                max: 1024 * KIB,
            },
        ),
    ];
    let mut g = configure(c, "params");
    for (name, p) in settings {
        // Inside the closure so that a filter that skips this setting skips the
        // report too; criterion calls the closure more than once.
        let reported = Once::new();
        g.bench_function(name, |b| {
            reported.call_once(|| report_edit_cost(name, data, p));
            b.iter(|| black_box(chunk_reader(black_box(data), p).expect("in-memory read")))
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let data = pseudo_random(LEN, 0x00fe_1234_5678_9abc);
    raw(c, &data);
    pipeline(c, &data);
    params(c, &data);
}

criterion_group!(chunking, benches);
criterion_main!(chunking);
