//! Version vectors: per file, how many changes each device has made to it, which
//! decides whether one version supersedes another or the two are in conflict.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use crate::device::ShortId;

/// Most entries a decoded vector may have; one per device that ever edited the
/// file, so real vectors stay tiny. Bounds what untrusted bytes can allocate.
pub const MAX_ENTRIES: usize = 1024;

const ENTRY_LEN: usize = 16;

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Both describe the same history.
    Equal,
    /// The left one has seen everything the right one has, and more.
    Newer,
    /// The right one has seen everything the left one has, and more.
    Older,
    /// Each has changes the other has not seen: a conflict.
    Concurrent,
}

/// A version vector: device short id → change counter (absent means 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector(BTreeMap<ShortId, u64>);

/// Why bytes could not be decoded as a version vector.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length is not a whole number of entries.
    #[error("version vector of {0} bytes is not a multiple of 16")]
    Length(usize),
    /// More entries than [`MAX_ENTRIES`].
    #[error("version vector has {0} entries, more than the limit of {MAX_ENTRIES}")]
    TooLong(usize),
    /// Entries must be sorted by device and unique, so each vector has one encoding.
    #[error("version vector entries are not in strictly ascending device order")]
    Unsorted,
    /// A zero counter is never stored.
    #[error("version vector has a zero counter")]
    ZeroCounter,
}

impl VersionVector {
    /// The empty vector (no device has changed the file).
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `device` (0 when absent).
    pub fn get(&self, device: ShortId) -> u64 {
        self.0.get(&device).copied().unwrap_or(0)
    }

    /// Records one more change by `device`, returning the new vector.
    pub fn bumped(mut self, device: ShortId) -> Self {
        *self.0.entry(device).or_insert(0) += 1;
        self
    }

    /// The same vector with `device`'s counter set to `counter` (0 removes it).
    pub fn with(mut self, device: ShortId, counter: u64) -> Self {
        if counter == 0 {
            self.0.remove(&device);
        } else {
            self.0.insert(device, counter);
        }
        self
    }

    /// The entries, in device order.
    pub fn iter(&self) -> impl Iterator<Item = (ShortId, u64)> + '_ {
        self.0.iter().map(|(d, c)| (*d, *c))
    }

    /// Whether no device has any change recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The element-wise maximum: a version that has seen both histories.
    pub fn merged(mut self, other: &VersionVector) -> Self {
        for (d, c) in other.iter() {
            let e = self.0.entry(d).or_insert(0);
            *e = (*e).max(c);
        }
        self
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &VersionVector) -> Relation {
        let mut ord = Ordering::Equal;
        let devices = self.0.keys().chain(other.0.keys());
        for d in devices {
            let step = self.get(*d).cmp(&other.get(*d));
            ord = match (ord, step) {
                (o, Ordering::Equal) => o,
                (Ordering::Equal, s) => s,
                (o, s) if o == s => o,
                _ => return Relation::Concurrent,
            };
        }
        match ord {
            Ordering::Equal => Relation::Equal,
            Ordering::Greater => Relation::Newer,
            Ordering::Less => Relation::Older,
        }
    }

    /// The stored form: 16 bytes an entry (device, counter; both big-endian),
    /// sorted by device. Documented with the schema in `index::schema`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * ENTRY_LEN);
        for (d, c) in self.iter() {
            out.extend_from_slice(&d.0.to_be_bytes());
            out.extend_from_slice(&c.to_be_bytes());
        }
        out
    }

    /// Decodes [`VersionVector::encode`]'s form, refusing anything malformed.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if !bytes.len().is_multiple_of(ENTRY_LEN) {
            return Err(DecodeError::Length(bytes.len()));
        }
        let n = bytes.len() / ENTRY_LEN;
        if n > MAX_ENTRIES {
            return Err(DecodeError::TooLong(n));
        }
        let mut map = BTreeMap::new();
        let mut last: Option<u64> = None;
        for entry in bytes.chunks_exact(ENTRY_LEN) {
            let d = u64::from_be_bytes(entry[..8].try_into().expect("8 bytes"));
            let c = u64::from_be_bytes(entry[8..].try_into().expect("8 bytes"));
            if last.is_some_and(|l| l >= d) {
                return Err(DecodeError::Unsorted);
            }
            if c == 0 {
                return Err(DecodeError::ZeroCounter);
            }
            last = Some(d);
            map.insert(ShortId(d), c);
        }
        Ok(Self(map))
    }
}

impl fmt::Display for VersionVector {
    /// `{device:counter, …}` with 16-hex-digit device short ids.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (d, c)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}:{c}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::btree_map(0u64..5, 1u64..4, 0..5)
            .prop_map(|m| VersionVector(m.into_iter().map(|(d, c)| (ShortId(d), c)).collect()))
    }

    #[test]
    fn a_local_bump_makes_a_newer_version() {
        let a = VersionVector::new().bumped(ShortId(1));
        let b = a.clone().bumped(ShortId(1));
        assert_eq!(b.compare(&a), Relation::Newer);
        assert_eq!(a.compare(&b), Relation::Older);
        let c = a.clone().bumped(ShortId(2));
        assert_eq!(b.compare(&c), Relation::Concurrent);
        assert_eq!(b.to_string(), "{0000000000000001:2}");
    }

    #[test]
    fn malformed_bytes_are_refused() {
        assert_eq!(
            VersionVector::decode(&[0; 15]),
            Err(DecodeError::Length(15))
        );
        let mut two = VersionVector::new()
            .bumped(ShortId(2))
            .bumped(ShortId(1))
            .encode();
        two.rotate_left(16);
        assert_eq!(VersionVector::decode(&two), Err(DecodeError::Unsorted));
        assert_eq!(
            VersionVector::decode(&[0; 16]),
            Err(DecodeError::ZeroCounter)
        );
        assert_eq!(
            VersionVector::decode(&vec![0; 16 * (MAX_ENTRIES + 1)]),
            Err(DecodeError::TooLong(MAX_ENTRIES + 1))
        );
    }

    proptest! {
        #[test]
        fn encoding_round_trips(a in vv()) {
            prop_assert_eq!(VersionVector::decode(&a.encode()).unwrap(), a);
        }

        #[test]
        fn compare_is_antisymmetric(a in vv(), b in vv()) {
            let expected = match a.compare(&b) {
                Relation::Newer => Relation::Older,
                Relation::Older => Relation::Newer,
                r => r,
            };
            prop_assert_eq!(b.compare(&a), expected);
            prop_assert_eq!(a.compare(&b) == Relation::Equal, a == b);
        }

        #[test]
        fn merge_is_an_upper_bound_and_commutes(a in vv(), b in vv()) {
            let m = a.clone().merged(&b);
            prop_assert_eq!(&m, &b.clone().merged(&a));
            prop_assert!(matches!(m.compare(&a), Relation::Newer | Relation::Equal));
            prop_assert!(matches!(m.compare(&b), Relation::Newer | Relation::Equal));
            prop_assert_eq!(m.clone().merged(&m), m);
        }

        #[test]
        fn a_bump_after_merge_supersedes_both(a in vv(), b in vv(), d in 0u64..5) {
            let m = a.clone().merged(&b).bumped(ShortId(d));
            prop_assert_eq!(m.compare(&a), Relation::Newer);
            prop_assert_eq!(m.compare(&b), Relation::Newer);
        }
    }
}
