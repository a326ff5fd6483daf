//! Streams a file into content-defined chunks (FastCDC v2020) with a blake3 hash
//! per chunk and a blake3 hash of the whole file, in constant memory.
//!
//! Large inputs run as a three-stage pipeline: the calling thread reads and finds
//! cut points, one helper thread hashes the chunks and another hashes the whole
//! stream. On a two-core machine this keeps both cores busy; a single thread doing
//! all three passes in turn reaches only about half of raw FastCDC speed, the
//! pipeline about 80% (2.5 against 3.2 GiB/s; see `benches/chunking.rs`).
//!
//! A new version of a file whose previous chunk list is known
//! ([`chunk_reader_reusing`]) skips most of the cutting: where the old chunks
//! still follow each other, their boundaries are checked by hashing instead of
//! found by rolling the gear hash over every byte, and the cut points come out
//! exactly as a fresh cut would put them (see [`Reuse`]).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use fastcdc::v2020::FastCDC;

macro_rules! hash_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The hash as lowercase hex.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }

            /// Builds the hash from a 32-byte slice, if it has that length.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                Some(Self(bytes.try_into().ok()?))
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }

        impl FromStr for $name {
            type Err = blake3::HexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok(blake3::Hash::from_hex(s)?.into())
            }
        }
    };
}

hash_type!(
    /// The blake3 hash of one chunk's bytes.
    ChunkHash
);
hash_type!(
    /// The blake3 hash of a whole file's bytes (what `b3sum` prints).
    FileHash
);

/// FastCDC size limits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// No chunk is shorter than this, except the last one of a file.
    pub min: u32,
    /// The size the cut-point mask aims for.
    pub avg: u32,
    /// No chunk is longer than this.
    pub max: u32,
}

/// The chunk sizes ferry uses.
///
/// Chosen with `cargo bench --bench chunking -- params`: 16/64/256 KiB (mean
/// chunk about 78 KiB with normalisation level 1) runs as fast as the larger
/// settings (2.55 GiB/s), while 64/256/1024 KiB makes a one-byte insert resend
/// about seven times as much data (839 KiB against 124 KiB) and 4/16/64 KiB is
/// about 9% slower and makes a million-file index four times larger in chunk
/// rows. 64 KiB is also the order of Syncthing's
/// smallest block and of QUIC's stream window, so one chunk fits one round trip.
pub const DEFAULT_PARAMS: ChunkParams = ChunkParams {
    min: 16 * 1024,
    avg: 64 * 1024,
    max: 256 * 1024,
};

/// One chunk of a file: where it is and what it hashes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Byte offset of the chunk in the file.
    pub offset: u64,
    /// Length in bytes (at most [`ChunkParams::max`]).
    pub len: u32,
    /// blake3 of the chunk's bytes.
    pub hash: ChunkHash,
}

/// What chunking a whole stream produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// Total bytes read.
    pub size: u64,
    /// blake3 of all bytes.
    pub hash: FileHash,
    /// The chunks, in order, covering every byte exactly once.
    pub chunks: Vec<ChunkInfo>,
}

/// Bytes read per pipeline block. Memory in flight stays under
/// `(QUEUE_DEPTH * 2 + 3) * (BLOCK + 2 * max)`, about 10.5 MiB with the
/// defaults (9 MiB without an old list, which needs no room for a second
/// chunk), whatever the file size. On a 2-core EPYC with 1 MiB of L2 per core, 1 MiB
/// blocks made `pipeline/chunk_reader` about 10% faster than 2 MiB blocks (about
/// 3% when reading a cached file), and 512 KiB or smaller ones were slower.
const BLOCK: usize = 1024 * 1024;
const QUEUE_DEPTH: usize = 2;

/// Chunks and hashes everything `reader` yields, with `params`.
///
/// Inputs that fit in one block are handled on the calling thread; longer ones
/// use the pipeline described in the module doc.
pub fn chunk_reader<R: Read>(reader: R, params: ChunkParams) -> io::Result<FileDigest> {
    chunk_reader_with_block(reader, params, BLOCK, &[]).map(|(d, _)| d)
}

/// [`chunk_reader`] for a new version of a file whose chunk list, as ferry
/// cut it with the same `params`, was `previous`: the result is the same, but
/// stretches where the old chunks still follow each other cost a hash instead of
/// a cut. A list that does not fit (not contiguous from offset 0, chunks outside
/// the size limits) is ignored.
pub fn chunk_reader_reusing<R: Read>(
    reader: R,
    params: ChunkParams,
    previous: &[ChunkInfo],
) -> io::Result<(FileDigest, ReuseStats)> {
    chunk_reader_with_block(reader, params, BLOCK, previous)
}

/// How much of a previous chunk list [`chunk_reader_reusing`] could reuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseStats {
    /// Chunks taken from the previous list without cutting.
    pub reused: u64,
    /// Chunks found by cutting.
    pub cut: u64,
}

/// Chunks an in-memory buffer on the calling thread.
pub fn chunk_bytes(data: &[u8], params: ChunkParams) -> FileDigest {
    let cuts = cut_points(data, params, true).0;
    let mut chunks = Vec::with_capacity(cuts.len());
    let mut offset = 0usize;
    for len in cuts {
        let len = len as usize;
        chunks.push(ChunkInfo {
            offset: offset as u64,
            len: len as u32,
            hash: blake3::hash(&data[offset..offset + len]).into(),
        });
        offset += len;
    }
    FileDigest {
        size: data.len() as u64,
        hash: blake3::hash(data).into(),
        chunks,
    }
}

/// Finds the chunk lengths in `data`. Unless `eof`, stops before the first chunk
/// that could still grow with more data (fewer than `max` bytes left), so cut
/// points never depend on where a read happened to end. Returns the lengths and
/// the number of bytes they cover.
fn cut_points(data: &[u8], params: ChunkParams, eof: bool) -> (Vec<u32>, usize) {
    let cdc = FastCDC::new(
        data,
        params.min as usize,
        params.avg as usize,
        params.max as usize,
    );
    let mut lens = Vec::with_capacity(data.len() / params.avg as usize + 1);
    let mut pos = 0;
    while pos < data.len() {
        let remaining = data.len() - pos;
        if !eof && remaining < params.max as usize {
            break;
        }
        let (_, end) = cdc.cut(pos, remaining);
        lens.push((end - pos) as u32);
        pos = end;
    }
    (lens, pos)
}

/// Reads until `buf` holds `cap` bytes or the reader is exhausted; returns
/// whether it was exhausted.
fn fill<R: Read>(reader: &mut R, buf: &mut Vec<u8>, cap: usize) -> io::Result<bool> {
    let want = cap.saturating_sub(buf.len());
    let got = reader.by_ref().take(want as u64).read_to_end(buf)?;
    Ok(got < want)
}

struct Block {
    data: Vec<u8>,
    lens: Vec<u32>,
    /// Hashes already computed by the cutting stage, by chunk (empty: none).
    known: Vec<Option<ChunkHash>>,
}

fn chunk_reader_with_block<R: Read>(
    mut reader: R,
    params: ChunkParams,
    block: usize,
    previous: &[ChunkInfo],
) -> io::Result<(FileDigest, ReuseStats)> {
    let mut reuse = Reuse::new(previous, params);
    // A chunk waiting for its successor is carried over whole, so reuse keeps
    // room for two chunks plus the next chunk's window (see `Reuse::cut_block`).
    let carry = if reuse.is_some() { 2 } else { 1 };
    let cap = block + carry * params.max as usize;
    let mut buf = Vec::with_capacity(cap);
    if fill(&mut reader, &mut buf, cap)? {
        let digest = chunk_bytes(&buf, params);
        let stats = ReuseStats {
            reused: 0,
            cut: digest.chunks.len() as u64,
        };
        return Ok((digest, stats));
    }

    std::thread::scope(|scope| {
        let (chunk_tx, chunk_rx) = sync_channel::<Arc<Block>>(QUEUE_DEPTH);
        let (file_tx, file_rx) = sync_channel::<Arc<Block>>(QUEUE_DEPTH);
        let chunk_worker = std::thread::Builder::new()
            .name("ferry-chunk-hash".into())
            .spawn_scoped(scope, move || hash_chunks(chunk_rx))?;
        let file_worker = std::thread::Builder::new()
            .name("ferry-file-hash".into())
            .spawn_scoped(scope, move || hash_stream(file_rx))?;

        let produced = produce(
            &mut reader,
            params,
            cap,
            buf,
            reuse.as_mut(),
            &chunk_tx,
            &file_tx,
        );
        drop((chunk_tx, file_tx));
        let chunks = chunk_worker.join().expect("chunk hasher panicked");
        let (size, hash) = file_worker.join().expect("file hasher panicked");
        let stats = produced?;
        Ok((FileDigest { size, hash, chunks }, stats))
    })
}

/// The reading and cutting stage: hands each finished block to both hashers.
fn produce<R: Read>(
    reader: &mut R,
    params: ChunkParams,
    cap: usize,
    mut buf: Vec<u8>,
    mut reuse: Option<&mut Reuse<'_>>,
    chunk_tx: &SyncSender<Arc<Block>>,
    file_tx: &SyncSender<Arc<Block>>,
) -> io::Result<ReuseStats> {
    let mut eof = false;
    let mut stats = ReuseStats::default();
    loop {
        let (lens, known, used) = match reuse.as_deref_mut() {
            Some(r) => r.cut_block(&buf, eof),
            None => {
                let (lens, used) = cut_points(&buf, params, eof);
                (lens, Vec::new(), used)
            }
        };
        if reuse.is_none() {
            stats.cut += lens.len() as u64;
        }
        let mut next = Vec::with_capacity(cap);
        next.extend_from_slice(&buf[used..]);
        buf.truncate(used);
        let block = Arc::new(Block {
            data: buf,
            lens,
            known,
        });
        // A send fails only when a hasher has gone, which the join reports.
        if chunk_tx.send(block.clone()).is_err() || file_tx.send(block).is_err() || eof {
            return Ok(reuse.map_or(stats, |r| r.stats));
        }
        buf = next;
        eof = fill(reader, &mut buf, cap)?;
    }
}

fn hash_chunks(rx: Receiver<Arc<Block>>) -> Vec<ChunkInfo> {
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    for block in rx {
        let mut pos = 0usize;
        for (i, &len) in block.lens.iter().enumerate() {
            let hash = match block.known.get(i) {
                Some(Some(h)) => *h,
                _ => blake3::hash(&block.data[pos..pos + len as usize]).into(),
            };
            chunks.push(ChunkInfo { offset, len, hash });
            pos += len as usize;
            offset += len as u64;
        }
    }
    chunks
}

/// Cuts a new version of a file, reusing the chunk list of the version before.
///
/// FastCDC decides a cut from the chunk's own bytes and the one byte after it
/// (the gear hash is tested at a position after adding that position's byte),
/// and from how much input is left, capped at `max`. So an old chunk whose
/// bytes appear again at the current position, with at least `max` bytes
/// left here and there (it was not cut short by the old file's end), and
/// followed by the same byte, ends where a fresh cut would end it. Equal
/// blake3 hashes stand for equal bytes; the byte after is vouched for by the
/// next old chunk matching right after it, and otherwise checked by a real cut
/// from the chunk's start (a chunk of `max` bytes needs no byte after: the cut
/// was forced). After a miss, cutting goes on as usual; the chunks it cuts are
/// looked up among the old ones to pick the thread up again, each for the
/// first `PROBE_EVERY` chunks after a miss and then every `PROBE_EVERY`th, so a
/// wholly rewritten file costs about what a plain cut does.
///
/// The result equals a plain cut whenever `previous` was one (ferry's own
/// scans, or a peer's list that a pull stored). A list with made-up boundaries
/// can make them survive in the new list, which costs dedup, never
/// correctness: every chunk still covers the bytes its hash says.
struct Reuse<'a> {
    params: ChunkParams,
    old: &'a [ChunkInfo],
    /// Old chunks `..cut_whole` were cut with at least `max` bytes left.
    cut_whole: usize,
    /// An old chunk's first index, by hash, among those.
    by_hash: HashMap<ChunkHash, usize>,
    /// The old chunk that may start at the current position.
    expect: Option<usize>,
    /// An old chunk that matched at the current position, and its hash,
    /// waiting for the byte after it to be vouched for.
    pending: Option<(usize, ChunkHash)>,
    /// Chunks cut since the last one taken from the old list.
    misses: u32,
    stats: ReuseStats,
}

/// See [`Reuse`].
const PROBE_EVERY: u32 = 16;

impl<'a> Reuse<'a> {
    fn new(old: &'a [ChunkInfo], params: ChunkParams) -> Option<Self> {
        let mut offset = 0u64;
        for (i, c) in old.iter().enumerate() {
            // Only a file's last chunk may be shorter than `min`.
            let short = c.len < params.min && (i + 1 < old.len() || c.len == 0);
            if c.offset != offset || short || c.len > params.max {
                return None;
            }
            offset += c.len as u64;
        }
        let cut_whole = old
            .iter()
            .take_while(|c| c.offset + params.max as u64 <= offset)
            .count();
        if cut_whole == 0 {
            return None;
        }
        let mut by_hash = HashMap::with_capacity(cut_whole);
        for (i, c) in old[..cut_whole].iter().enumerate() {
            by_hash.entry(c.hash).or_insert(i);
        }
        Some(Self {
            params,
            old,
            cut_whole,
            by_hash,
            expect: Some(0),
            pending: None,
            misses: 0,
            stats: ReuseStats::default(),
        })
    }

    /// Whether old chunk `i` may be taken at `pos` of `data` (which reaches the
    /// end of the input, or at least `max` bytes past `pos`): its hash if so.
    fn matches(&self, i: usize, data: &[u8], pos: usize) -> Option<ChunkHash> {
        if i >= self.cut_whole || data.len() - pos < self.params.max as usize {
            return None;
        }
        let c = &self.old[i];
        let hash = ChunkHash::from(blake3::hash(&data[pos..pos + c.len as usize]));
        (hash == c.hash).then_some(hash)
    }

    /// [`cut_points`] for one buffer, plus the hashes of the chunks taken from
    /// the old list. The state carries over to the buffer starting at `used`.
    fn cut_block(&mut self, data: &[u8], eof: bool) -> (Vec<u32>, Vec<Option<ChunkHash>>, usize) {
        let p = self.params;
        let max = p.max as usize;
        let cdc = FastCDC::new(data, p.min as usize, p.avg as usize, max);
        let mut lens = Vec::with_capacity(data.len() / p.avg as usize + 1);
        let mut known = Vec::with_capacity(lens.capacity());
        let mut pos = 0;
        while pos < data.len() {
            let remaining = data.len() - pos;
            if !eof && remaining < max {
                break;
            }
            if let Some((i, hash)) = self.pending {
                let len = self.old[i].len as usize;
                let next = pos + len;
                let vouched = if len == max {
                    Some(None)
                } else if !eof && data.len() - next < max {
                    // The successor cannot be judged yet: carry this chunk over.
                    break;
                } else {
                    self.matches(i + 1, data, next).map(|h| Some((i + 1, h)))
                };
                let end = match vouched {
                    Some(successor) => {
                        self.pending = successor;
                        self.expect = (len == max).then_some(i + 1);
                        next
                    }
                    None => {
                        self.pending = None;
                        self.expect = None;
                        cdc.cut(pos, remaining).1
                    }
                };
                if end == next {
                    lens.push(len as u32);
                    known.push(Some(hash));
                    self.stats.reused += 1;
                    self.misses = 0;
                    pos = next;
                    continue;
                }
                self.take_cut(data, pos, end, &mut lens, &mut known);
                pos = end;
                continue;
            }
            if let Some(i) = self.expect.take()
                && let Some(hash) = self.matches(i, data, pos)
            {
                self.pending = Some((i, hash));
                continue;
            }
            let end = cdc.cut(pos, remaining).1;
            self.take_cut(data, pos, end, &mut lens, &mut known);
            pos = end;
        }
        (lens, known, pos)
    }

    /// Records a chunk found by cutting, looking it up among the old ones
    /// while the thread is lost.
    fn take_cut(
        &mut self,
        data: &[u8],
        pos: usize,
        end: usize,
        lens: &mut Vec<u32>,
        known: &mut Vec<Option<ChunkHash>>,
    ) {
        lens.push((end - pos) as u32);
        self.stats.cut += 1;
        let probe = self.misses < PROBE_EVERY || self.misses.is_multiple_of(PROBE_EVERY);
        self.misses = self.misses.saturating_add(1);
        if !probe {
            known.push(None);
            return;
        }
        let hash = ChunkHash::from(blake3::hash(&data[pos..end]));
        if let Some(&j) = self.by_hash.get(&hash) {
            self.expect = Some(j + 1);
        }
        known.push(Some(hash));
    }
}

fn hash_stream(rx: Receiver<Arc<Block>>) -> (u64, FileHash) {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    for block in rx {
        hasher.update(&block.data);
        size += block.data.len() as u64;
    }
    (size, hasher.finalize().into())
}

/// A run of consecutive chunks of a file, as the wire protocol and the remote
/// index carry chunk lists (see `protocol`).
///
/// A group ends after a chunk whose hash has its low seven bits zero (on
/// average every 128 chunks), or after [`GROUP_MAX_CHUNKS`]. The boundaries
/// depend only on chunk contents, so an edit changes the one or two groups
/// around it and every other group keeps its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkGroup {
    /// blake3 over the entries (chunk hash, then size as u32 little-endian).
    pub hash: [u8; 32],
    /// How many chunks.
    pub chunks: u32,
    /// How many bytes.
    pub size: u64,
}

/// Most chunks in one group (matches `protocol::MAX_GROUP_CHUNKS`).
pub const GROUP_MAX_CHUNKS: usize = 1024;

fn ends_group(h: &ChunkHash) -> bool {
    h.0[0] & 0x7f == 0
}

/// The hash of a group made of `entries` (hash, size).
pub fn group_hash<'a>(entries: impl IntoIterator<Item = (&'a ChunkHash, u32)>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for (hash, size) in entries {
        h.update(&hash.0);
        h.update(&size.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// Splits a chunk list into groups; returns each group's range in `chunks`.
pub fn group_ranges(chunks: &[ChunkInfo]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in chunks.iter().enumerate() {
        if ends_group(&c.hash) || i + 1 - start == GROUP_MAX_CHUNKS {
            out.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < chunks.len() {
        out.push(start..chunks.len());
    }
    out
}

/// A chunk list in groups.
pub fn groups(chunks: &[ChunkInfo]) -> Vec<ChunkGroup> {
    group_ranges(chunks)
        .into_iter()
        .map(|r| {
            let part = &chunks[r];
            ChunkGroup {
                hash: group_hash(part.iter().map(|c| (&c.hash, c.len))),
                chunks: part.len() as u32,
                size: part.iter().map(|c| c.len as u64).sum(),
            }
        })
        .collect()
}

/// Deterministic incompressible test data (xorshift), for unit tests across
/// the crate.
#[cfg(test)]
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Small limits so that short test inputs still make many chunks.
    const SMALL: ChunkParams = ChunkParams {
        min: 256,
        avg: 1024,
        max: 4096,
    };

    fn reassemble(data: &[u8], digest: &FileDigest) -> Vec<u8> {
        let mut out = Vec::new();
        for c in &digest.chunks {
            let bytes = &data[c.offset as usize..c.offset as usize + c.len as usize];
            assert_eq!(ChunkHash::from(blake3::hash(bytes)), c.hash);
            out.extend_from_slice(bytes);
        }
        out
    }

    #[test]
    fn empty_input_has_no_chunks_and_the_empty_hash() {
        let d = chunk_reader(&[][..], DEFAULT_PARAMS).unwrap();
        assert_eq!(d.size, 0);
        assert!(d.chunks.is_empty());
        assert_eq!(d.hash, FileHash::from(blake3::hash(b"")));
    }

    #[test]
    fn pipeline_matches_the_single_threaded_result_on_a_large_input() {
        let data = pseudo_random(9 * 1024 * 1024 + 77, 7);
        let streamed = chunk_reader(&data[..], DEFAULT_PARAMS).unwrap();
        assert_eq!(streamed, chunk_bytes(&data, DEFAULT_PARAMS));
        assert!(streamed.chunks.len() > 50);
        assert_eq!(reassemble(&data, &streamed), data);
    }

    #[test]
    fn read_errors_are_reported_not_swallowed() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(1);
                self.0 -= n;
                Ok(n)
            }
        }
        let err = chunk_reader(Failing(5 * 1024 * 1024), DEFAULT_PARAMS).unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn same_bytes_give_same_chunks_whatever_the_read_sizes(
            len in 0usize..200_000, seed: u64, block in 1usize..20_000,
        ) {
            let data = pseudo_random(len, seed);
            let whole = chunk_bytes(&data, SMALL);
            let streamed = chunk_reader_with_block(&data[..], SMALL, block, &[]).unwrap().0;
            prop_assert_eq!(&whole, &streamed);
            prop_assert_eq!(whole.hash, FileHash::from(blake3::hash(&data)));
            prop_assert_eq!(reassemble(&data, &whole), data);
            for c in &whole.chunks[..whole.chunks.len().saturating_sub(1)] {
                prop_assert!(c.len >= SMALL.min && c.len <= SMALL.max);
            }
        }

        #[test]
        fn an_edit_in_the_middle_changes_only_nearby_chunks(
            seed: u64, at in 0.3f64..0.7, insert in proptest::collection::vec(any::<u8>(), 0..16),
            delete in 0usize..16,
        ) {
            let data = pseudo_random(400_000, seed);
            let pos = (data.len() as f64 * at) as usize;
            let mut edited = data[..pos].to_vec();
            edited.extend_from_slice(&insert);
            edited.extend_from_slice(&data[pos + delete..]);

            let before = chunk_bytes(&data, SMALL);
            let after = chunk_bytes(&edited, SMALL);
            let old: std::collections::HashSet<_> = before.chunks.iter().map(|c| c.hash).collect();
            let new_chunks = after.chunks.iter().filter(|c| !old.contains(&c.hash)).count();
            let new_bytes: u64 = after.chunks.iter().filter(|c| !old.contains(&c.hash)).map(|c| c.len as u64).sum();
            // An edit disturbs the chunk it lands in and a few after it before the
            // cut points resynchronise. How many is a matter of chance (a run of
            // cut points inside the minimum size can shift), so the bound is
            // generous: with fixed-size blocks an insert would change every
            // chunk after it (about 150 here).
            prop_assert!(new_chunks <= 12, "{} new chunks of {}", new_chunks, after.chunks.len());
            prop_assert!(new_bytes <= 8 * SMALL.max as u64, "{} new bytes", new_bytes);
        }
    }

    /// Test data with stretches a rolling hash finds no cut in (zeros, a short
    /// repeated pattern) between random ones, so forced `max` cuts and chunks
    /// with equal hashes occur too.
    fn mixed_data(parts: &[(u8, usize)], seed: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &(kind, len)) in parts.iter().enumerate() {
            match kind % 3 {
                0 => out.extend(pseudo_random(len, seed ^ i as u64)),
                1 => out.extend(std::iter::repeat_n(0u8, len)),
                _ => out.extend((0..len).map(|k| b"ferry"[k % 5])),
            }
        }
        out
    }

    /// One edit: replace `del` bytes at `at` (a fraction of the length) with
    /// `ins` bytes.
    fn edit(data: &[u8], at: f64, del: usize, ins: &[u8]) -> Vec<u8> {
        let pos = ((data.len() as f64 * at) as usize).min(data.len());
        let end = (pos + del).min(data.len());
        let mut out = data[..pos].to_vec();
        out.extend_from_slice(ins);
        out.extend_from_slice(&data[end..]);
        out
    }

    fn reusing(
        data: &[u8],
        params: ChunkParams,
        block: usize,
        old: &[ChunkInfo],
    ) -> (FileDigest, ReuseStats) {
        chunk_reader_with_block(data, params, block, old).unwrap()
    }

    #[test]
    fn an_insert_in_a_large_file_reuses_all_but_a_few_chunks_and_cuts_as_a_fresh_scan() {
        let data = pseudo_random(24 * 1024 * 1024 + 5, 3);
        let old = chunk_bytes(&data, DEFAULT_PARAMS);
        let edited = edit(&data, 0.5, 0, &[9u8; 100]);
        let (digest, stats) =
            chunk_reader_reusing(&edited[..], DEFAULT_PARAMS, &old.chunks).unwrap();
        assert_eq!(digest, chunk_bytes(&edited, DEFAULT_PARAMS));
        assert_eq!(stats.reused + stats.cut, digest.chunks.len() as u64);
        // The chunk with the insert, the one before it (its byte after
        // changed) and a few near the file's end, where no old chunk had `max`
        // bytes after it, are cut.
        assert!(stats.cut <= 10, "{stats:?}");
        assert!(stats.reused >= digest.chunks.len() as u64 - 10, "{stats:?}");
        // Appending keeps everything but the old tail.
        let mut longer = data.clone();
        longer.extend(pseudo_random(3 * 1024 * 1024, 4));
        let (digest, stats) =
            chunk_reader_reusing(&longer[..], DEFAULT_PARAMS, &old.chunks).unwrap();
        assert_eq!(digest, chunk_bytes(&longer, DEFAULT_PARAMS));
        assert!(stats.reused >= old.chunks.len() as u64 - 8, "{stats:?}");
    }

    #[test]
    fn a_list_that_does_not_fit_is_ignored() {
        let data = pseudo_random(3 * 1024 * 1024, 5);
        let fresh = chunk_bytes(&data, DEFAULT_PARAMS);
        let mut gap = fresh.chunks.clone();
        gap.remove(3);
        // Offsets that add up, true hashes, but a chunk no cut makes: one
        // shorter than `min` before the end, one longer than `max`.
        let pieces = |sizes: &[usize]| -> Vec<ChunkInfo> {
            let mut out = Vec::new();
            let mut off = 0usize;
            let mut sizes = sizes.iter().copied().cycle();
            while off < data.len() {
                let len = sizes.next().unwrap().min(data.len() - off);
                out.push(ChunkInfo {
                    offset: off as u64,
                    len: len as u32,
                    hash: blake3::hash(&data[off..off + len]).into(),
                });
                off += len;
            }
            out
        };
        let short = pieces(&[100 * 1024, 1024]);
        let long = pieces(&[300 * 1024]);
        for bad in [gap, short, long, Vec::new()] {
            let (digest, stats) = chunk_reader_reusing(&data[..], DEFAULT_PARAMS, &bad).unwrap();
            assert_eq!(digest, fresh);
            assert_eq!(stats.reused, 0);
        }
    }

    #[test]
    fn made_up_boundaries_in_a_list_still_give_chunks_that_cover_the_file() {
        // Not what any cut would give: fixed 100 KiB pieces with their true hashes.
        let data = pseudo_random(4 * 1024 * 1024, 6);
        let made_up: Vec<ChunkInfo> = data
            .chunks(100 * 1024)
            .scan(0u64, |off, piece| {
                let c = ChunkInfo {
                    offset: *off,
                    len: piece.len() as u32,
                    hash: blake3::hash(piece).into(),
                };
                *off += piece.len() as u64;
                Some(c)
            })
            .collect();
        let (digest, stats) = chunk_reader_reusing(&data[..], DEFAULT_PARAMS, &made_up).unwrap();
        assert!(stats.reused > 0);
        assert_eq!(digest.hash, FileHash::from(blake3::hash(&data)));
        assert_eq!(reassemble(&data, &digest), data);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn reusing_the_old_list_cuts_exactly_as_a_fresh_cut(
            parts in proptest::collection::vec((any::<u8>(), 0usize..40_000), 1..8),
            seed: u64,
            edits in proptest::collection::vec(
                (0f64..=1.0, 0usize..3000, proptest::collection::vec(any::<u8>(), 0..300)), 0..4),
            block in 1usize..40_000,
            unrelated: bool,
        ) {
            let data = mixed_data(&parts, seed);
            let old = if unrelated {
                chunk_bytes(&mixed_data(&parts, seed.wrapping_add(1)), SMALL)
            } else {
                chunk_bytes(&data, SMALL)
            };
            let mut edited = data.clone();
            for (at, del, ins) in &edits {
                edited = edit(&edited, *at, *del, ins);
            }
            let fresh = chunk_bytes(&edited, SMALL);
            let (digest, stats) = reusing(&edited, SMALL, block, &old.chunks);
            prop_assert_eq!(&digest, &fresh);
            prop_assert_eq!(stats.reused + stats.cut, fresh.chunks.len() as u64);
            if edits.is_empty() && !unrelated && data.len() > 2 * (block + 2 * SMALL.max as usize) {
                // Unchanged bytes: every chunk with `max` bytes after it is reused.
                let whole = old.chunks.iter().filter(|c| c.offset + SMALL.max as u64 <= data.len() as u64).count();
                prop_assert!(stats.reused as usize + 1 >= whole, "{:?} of {}", stats, whole);
            }
        }
    }

    #[test]
    fn an_edit_changes_at_most_two_groups() {
        let data = pseudo_random(3_000_000, 11);
        let mut edited = data.clone();
        edited.splice(1_500_000..1_500_000, [7u8; 100]);
        let before = groups(&chunk_bytes(&data, SMALL).chunks);
        let after = groups(&chunk_bytes(&edited, SMALL).chunks);
        assert!(before.len() > 8, "{} groups", before.len());
        let old: std::collections::HashSet<_> = before.iter().map(|g| g.hash).collect();
        let changed = after.iter().filter(|g| !old.contains(&g.hash)).count();
        assert!((1..=2).contains(&changed), "{changed} groups changed");
        assert_eq!(
            after.iter().map(|g| g.size).sum::<u64>(),
            edited.len() as u64
        );
        assert_eq!(
            after.iter().map(|g| g.chunks as usize).sum::<usize>(),
            chunk_bytes(&edited, SMALL).chunks.len()
        );
    }

    #[test]
    fn groups_never_exceed_the_maximum() {
        // All-equal chunks of a hash that never ends a group.
        let h = ChunkHash([1; 32]);
        let chunks: Vec<ChunkInfo> = (0..2500)
            .map(|i| ChunkInfo {
                offset: i * 10,
                len: 10,
                hash: h,
            })
            .collect();
        let g = groups(&chunks);
        assert_eq!(
            g.iter().map(|g| g.chunks).collect::<Vec<_>>(),
            vec![1024, 1024, 452]
        );
    }
}
