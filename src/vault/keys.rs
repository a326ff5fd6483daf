//! A folder's secret, the per-purpose keys derived from it, the keyed ids a holder
//! sees, and the recovery code a person keeps offline.
//!
//! # Key derivation
//!
//! Every key is `blake3::derive_key(CONTEXT, secret)` with its own context, so
//! learning one (say, by a flaw in how ids are used) says nothing about another:
//!
//! | context | key |
//! |---|---|
//! | `ferry 2026 vault chunk-id v1` | keys [`ChunkId`]s |
//! | `ferry 2026 vault chunk-seal v1` | seals chunks (XChaCha20-Poly1305) |
//! | `ferry 2026 vault record-id v1` | keys [`RecordId`]s |
//! | `ferry 2026 vault record-seal v1` | seals records (XChaCha20-Poly1305) |
//! | `ferry 2026 vault key-check v1` | its first 4 bytes, in the clear in every sealed item, tell a wrong key from tampering |
//!
//! # Recovery code, version 1
//!
//! The text is the prefix `ferrykey1` (`ferrykey` and the format version as one
//! digit), then the base32 (RFC 4648 alphabet, lower case, no padding) of the
//! 32-byte secret followed by a 3-byte checksum: the first 3 bytes of blake3 in
//! derive-key mode (context `ferry 2026 vault recovery code v1 checksum`) over
//! the secret. That is 35 bytes, exactly 56 base32 characters, which
//! [`FolderSecret::recovery_code`] writes in 14 dash-separated groups of 4.
//! [`FolderSecret::from_recovery_code`] ignores case, whitespace and `-`, and
//! reads `0` as `o` and `1` as `i` (base32 has neither digit, and a person
//! copying from paper confuses them); the checksum catches a wrong guess.

use std::fmt;

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use data_encoding::BASE32_NOPAD;
use zeroize::{Zeroize, Zeroizing};

use crate::chunking::ChunkHash;
use crate::relpath::RelPath;

const CHUNK_ID_CONTEXT: &str = "ferry 2026 vault chunk-id v1";
const CHUNK_SEAL_CONTEXT: &str = "ferry 2026 vault chunk-seal v1";
const RECORD_ID_CONTEXT: &str = "ferry 2026 vault record-id v1";
const RECORD_SEAL_CONTEXT: &str = "ferry 2026 vault record-seal v1";
const KEY_CHECK_CONTEXT: &str = "ferry 2026 vault key-check v1";

const CODE_PREFIX: &str = "ferrykey";
const CODE_VERSION: u8 = 1;
const CODE_CHECKSUM_CONTEXT: &str = "ferry 2026 vault recovery code v1 checksum";
const CODE_CHECKSUM_LEN: usize = 3;
const CODE_SYMBOLS: usize = 56;
const CODE_GROUP_LEN: usize = 4;

/// Longest text [`FolderSecret::from_recovery_code`] looks at, in bytes.
pub const MAX_CODE_TEXT_LEN: usize = 512;

/// Length of the key check carried in the clear in every sealed item.
pub(crate) const KEY_CHECK_LEN: usize = 4;

/// A folder's root secret: 32 random bytes from which every vault key is derived.
/// Overwritten with zeros when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct FolderSecret([u8; 32]);

/// Why a text is not a usable recovery code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryCodeError {
    /// The text does not start with `ferrykey`.
    #[error(
        "this is not a ferry recovery code (those start with `ferrykey1`); use what `ferry folder key` printed"
    )]
    NotACode,
    /// The text is an invite code, not a recovery code.
    #[error(
        "this is an invite code, not a recovery code; use the code `ferry folder key` printed (it starts with `ferrykey1`)"
    )]
    InviteCode,
    /// The code's format version is not 1.
    #[error(
        "this recovery code has format version {0}, made by a newer ferry; upgrade ferry on this device"
    )]
    UnsupportedVersion(u8),
    /// A character that cannot appear in a recovery code.
    #[error(
        "a typo: {ch:?} at character {position} cannot appear in a recovery code; check the code against your copy"
    )]
    BadCharacter {
        /// The character as it was written.
        ch: char,
        /// Where it is, counting from 1 at the code's first character.
        position: usize,
    },
    /// The code has fewer characters than a recovery code.
    #[error(
        "the recovery code is incomplete: {found} of its {CODE_SYMBOLS} characters after `ferrykey1`; check for a missing group"
    )]
    Truncated {
        /// How many code characters there were.
        found: usize,
    },
    /// The code has more characters than a recovery code.
    #[error(
        "the recovery code is too long: {found} characters after `ferrykey1` where it has {CODE_SYMBOLS}; check for a doubled group"
    )]
    TooLong {
        /// How many code characters there were.
        found: usize,
    },
    /// The checksum does not match the secret.
    #[error("the recovery code has a typo (checksum mismatch); check each group against your copy")]
    Checksum,
}

impl FolderSecret {
    /// A fresh random secret.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
        Self(bytes)
    }

    /// Wraps secret bytes (as stored in the index).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The secret bytes, for storing in the index; never show them to the holder.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Derives every per-purpose key (see the module docs).
    pub fn keys(&self) -> VaultKeys {
        let seal = |context| {
            let key = Zeroizing::new(blake3::derive_key(context, &self.0));
            XChaCha20Poly1305::new((&*key).into())
        };
        let check = Zeroizing::new(blake3::derive_key(KEY_CHECK_CONTEXT, &self.0));
        let mut key_check = [0u8; KEY_CHECK_LEN];
        key_check.copy_from_slice(&check[..KEY_CHECK_LEN]);
        VaultKeys {
            chunk_id: blake3::derive_key(CHUNK_ID_CONTEXT, &self.0),
            record_id: blake3::derive_key(RECORD_ID_CONTEXT, &self.0),
            chunk_seal: seal(CHUNK_SEAL_CONTEXT),
            record_seal: seal(RECORD_SEAL_CONTEXT),
            key_check,
        }
    }

    /// The secret as a recovery code, `ferrykey1-` then 14 groups of 4 base32
    /// characters; zeroed when dropped.
    pub fn recovery_code(&self) -> Zeroizing<String> {
        let mut payload = Zeroizing::new([0u8; 32 + CODE_CHECKSUM_LEN]);
        payload[..32].copy_from_slice(&self.0);
        payload[32..].copy_from_slice(&code_checksum(&self.0));
        let b32 = Zeroizing::new(BASE32_NOPAD.encode(payload.as_ref()).to_ascii_lowercase());
        let mut text = Zeroizing::new(String::with_capacity(
            CODE_PREFIX.len() + 1 + CODE_SYMBOLS / CODE_GROUP_LEN * (CODE_GROUP_LEN + 1),
        ));
        text.push_str(CODE_PREFIX);
        text.push(char::from(b'0' + CODE_VERSION));
        for (i, c) in b32.chars().enumerate() {
            if i % CODE_GROUP_LEN == 0 {
                text.push('-');
            }
            text.push(c);
        }
        text
    }

    /// Reads a recovery code as a person typed or pasted it (see the module docs).
    /// Never panics; refuses texts over [`MAX_CODE_TEXT_LEN`] bytes unread.
    pub fn from_recovery_code(text: &str) -> Result<Self, RecoveryCodeError> {
        if text.len() > MAX_CODE_TEXT_LEN {
            return Err(RecoveryCodeError::TooLong { found: text.len() });
        }
        // Each significant character with its 1-based position in the trimmed
        // text, so errors point at what the person sees.
        let chars: Zeroizing<Vec<(char, usize)>> = Zeroizing::new(
            text.trim()
                .chars()
                .zip(1..)
                .filter(|(c, _)| !c.is_whitespace() && *c != '-')
                .collect(),
        );
        let starts_with = |prefix: &str| {
            chars.len() >= prefix.len()
                && chars
                    .iter()
                    .zip(prefix.chars())
                    .all(|((c, _), p)| c.to_ascii_lowercase() == p)
        };
        if !starts_with(CODE_PREFIX) {
            let invite = starts_with("ferry")
                && chars
                    .get("ferry".len())
                    .is_some_and(|(c, _)| c.is_ascii_digit());
            return Err(if invite {
                RecoveryCodeError::InviteCode
            } else {
                RecoveryCodeError::NotACode
            });
        }
        match chars.get(CODE_PREFIX.len()) {
            None => return Err(RecoveryCodeError::Truncated { found: 0 }),
            Some(('1', _)) => {}
            Some((c, _)) => match c.to_digit(10) {
                Some(n) => return Err(RecoveryCodeError::UnsupportedVersion(n as u8)),
                None => return Err(RecoveryCodeError::NotACode),
            },
        }
        let body = &chars[CODE_PREFIX.len() + 1..];
        let mut symbols = Zeroizing::new(Vec::with_capacity(CODE_SYMBOLS));
        for &(ch, position) in body {
            let upper = match ch.to_ascii_uppercase() {
                '0' => 'O',
                '1' => 'I',
                c => c,
            };
            if !matches!(upper, 'A'..='Z' | '2'..='7') {
                return Err(RecoveryCodeError::BadCharacter { ch, position });
            }
            symbols.push(upper as u8);
        }
        match symbols.len() {
            n if n < CODE_SYMBOLS => return Err(RecoveryCodeError::Truncated { found: n }),
            n if n > CODE_SYMBOLS => return Err(RecoveryCodeError::TooLong { found: n }),
            _ => {}
        }
        // 56 symbols are exactly 35 bytes, so every symbol decodes.
        let bytes = Zeroizing::new(
            BASE32_NOPAD
                .decode(&symbols)
                .map_err(|_| RecoveryCodeError::Checksum)?,
        );
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes[..32]);
        let secret = Self(secret);
        if code_checksum(&secret.0) != bytes[32..] {
            return Err(RecoveryCodeError::Checksum);
        }
        Ok(secret)
    }
}

impl Drop for FolderSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for FolderSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FolderSecret(..)")
    }
}

fn code_checksum(secret: &[u8; 32]) -> [u8; CODE_CHECKSUM_LEN] {
    let hash = blake3::Hasher::new_derive_key(CODE_CHECKSUM_CONTEXT)
        .update(secret)
        .finalize();
    let mut out = [0u8; CODE_CHECKSUM_LEN];
    out.copy_from_slice(&hash.as_bytes()[..CODE_CHECKSUM_LEN]);
    out
}

/// The keys derived from one [`FolderSecret`]; zeroed when dropped.
#[derive(Clone)]
pub struct VaultKeys {
    chunk_id: [u8; 32],
    record_id: [u8; 32],
    chunk_seal: XChaCha20Poly1305,
    record_seal: XChaCha20Poly1305,
    key_check: [u8; KEY_CHECK_LEN],
}

impl VaultKeys {
    /// The id a holder stores a chunk under: blake3 keyed by the chunk-id key over
    /// the chunk's plaintext hash, so the holder cannot test for known content.
    pub fn chunk_id(&self, hash: &ChunkHash) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_id, &hash.0).as_bytes())
    }

    /// The id a holder stores a path's current record under; replacing it needs
    /// no knowledge of the name.
    pub fn record_id(&self, path: &RelPath) -> RecordId {
        let mut h = blake3::Hasher::new_keyed(&self.record_id);
        h.update(&[0]).update(path.as_str().as_bytes());
        RecordId(*h.finalize().as_bytes())
    }

    /// The id of a history version of a path, one per revision, unlinkable to
    /// the path's current record id by the holder.
    pub fn history_record_id(&self, path: &RelPath, revision: u64) -> RecordId {
        let mut h = blake3::Hasher::new_keyed(&self.record_id);
        h.update(&[1])
            .update(&revision.to_be_bytes())
            .update(path.as_str().as_bytes());
        RecordId(*h.finalize().as_bytes())
    }

    pub(crate) fn chunk_cipher(&self) -> &XChaCha20Poly1305 {
        &self.chunk_seal
    }

    pub(crate) fn record_cipher(&self) -> &XChaCha20Poly1305 {
        &self.record_seal
    }

    pub(crate) fn key_check(&self) -> [u8; KEY_CHECK_LEN] {
        self.key_check
    }
}

impl Drop for VaultKeys {
    fn drop(&mut self) {
        // The ciphers zero their own keys (the crate's `zeroize` feature).
        self.chunk_id.zeroize();
        self.record_id.zeroize();
    }
}

impl fmt::Debug for VaultKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VaultKeys(..)")
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The id as lowercase hex, as a holder may name its files.
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
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
    };
}

id_type!(
    /// What a holder calls a sealed chunk: a keyed hash of its plaintext hash.
    ChunkId
);
id_type!(
    /// What a holder calls a sealed record: a keyed hash of its path (and, for a
    /// history version, its revision).
    RecordId
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> FolderSecret {
        FolderSecret::from_bytes(*b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn generated_secrets_differ() {
        assert_ne!(FolderSecret::generate(), FolderSecret::generate());
    }

    #[test]
    fn debug_never_shows_key_material() {
        let s = secret();
        assert_eq!(format!("{s:?}"), "FolderSecret(..)");
        assert_eq!(format!("{:?}", s.keys()), "VaultKeys(..)");
    }

    #[test]
    fn per_purpose_keys_are_distinct() {
        let k = secret().keys();
        let sub = [
            k.chunk_id,
            k.record_id,
            blake3::derive_key(CHUNK_SEAL_CONTEXT, secret().as_bytes()),
            blake3::derive_key(RECORD_SEAL_CONTEXT, secret().as_bytes()),
        ];
        for i in 0..sub.len() {
            for j in i + 1..sub.len() {
                assert_ne!(sub[i], sub[j]);
            }
            assert_ne!(&sub[i], secret().as_bytes());
        }
    }

    #[test]
    fn keyed_ids_differ_across_folders_and_hide_the_plain_hash() {
        let hash = ChunkHash::from(blake3::hash(b"a well-known file"));
        let a = secret().keys();
        let b = FolderSecret::generate().keys();
        assert_ne!(a.chunk_id(&hash), b.chunk_id(&hash));
        assert_ne!(a.chunk_id(&hash).0, hash.0);
        assert_eq!(a.chunk_id(&hash), secret().keys().chunk_id(&hash));
        let path = RelPath::new("taxes/2025.pdf").unwrap();
        assert_ne!(a.record_id(&path), b.record_id(&path));
    }

    #[test]
    fn history_ids_differ_from_the_current_id_and_each_other() {
        let k = secret().keys();
        let path = RelPath::new("notes.txt").unwrap();
        let current = k.record_id(&path);
        let h1 = k.history_record_id(&path, 1);
        let h2 = k.history_record_id(&path, 2);
        assert!(current != h1 && current != h2 && h1 != h2);
        assert_ne!(
            k.record_id(&RelPath::new("a").unwrap()),
            k.record_id(&RelPath::new("b").unwrap())
        );
    }

    #[test]
    fn recovery_code_round_trips_in_groups() {
        let s = secret();
        let code = s.recovery_code();
        assert!(code.starts_with("ferrykey1-"), "{}", *code);
        let groups: Vec<&str> = code.split('-').skip(1).collect();
        assert_eq!(groups.len(), 14);
        assert!(groups.iter().all(|g| g.len() == 4));
        assert_eq!(FolderSecret::from_recovery_code(&code), Ok(s));
    }

    #[test]
    fn recovery_code_tolerates_case_separators_and_look_alike_digits() {
        let s = FolderSecret::generate();
        let code = s.recovery_code();
        let upper = code.to_ascii_uppercase();
        assert_eq!(FolderSecret::from_recovery_code(&upper).as_ref(), Ok(&s));
        let spaced = format!("  {}\n", code.replace('-', " ").replacen(' ', "\n", 3));
        assert_eq!(FolderSecret::from_recovery_code(&spaced).as_ref(), Ok(&s));
        let squashed: String = code.chars().filter(|c| *c != '-').collect();
        assert_eq!(FolderSecret::from_recovery_code(&squashed).as_ref(), Ok(&s));
        let body = &code["ferrykey1".len()..];
        let digits = format!("ferrykey1{}", body.replace('o', "0").replace('i', "1"));
        assert_eq!(FolderSecret::from_recovery_code(&digits).as_ref(), Ok(&s));
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let code = secret().recovery_code();
        let mut tried = 0;
        for (i, orig) in code.char_indices().skip("ferrykey1".len()) {
            if orig == '-' {
                continue;
            }
            for c in "abcdefghjkmnpqrstuvwxyz234567!".chars() {
                if c == orig {
                    continue;
                }
                let typo = format!("{}{c}{}", &code[..i], &code[i + 1..]);
                match FolderSecret::from_recovery_code(&typo) {
                    Err(RecoveryCodeError::Checksum) => {}
                    Err(RecoveryCodeError::BadCharacter { ch, position }) => {
                        assert_eq!((ch, position), (c, i + 1));
                    }
                    other => panic!("typo at {i} to {c:?} gave {other:?}"),
                }
                tried += 1;
            }
        }
        assert!(tried > 1000);
    }

    #[test]
    fn refuses_what_is_not_a_recovery_code() {
        let code = secret().recovery_code();
        let cases = [
            ("", RecoveryCodeError::NotACode),
            ("hello", RecoveryCodeError::NotACode),
            ("ferryboat", RecoveryCodeError::NotACode),
            ("ferry1-aemx62zd-4fwikmwg", RecoveryCodeError::InviteCode),
            ("ferrykey", RecoveryCodeError::Truncated { found: 0 }),
            ("ferrykey1-abcd", RecoveryCodeError::Truncated { found: 4 }),
            ("ferrykey2-abcd", RecoveryCodeError::UnsupportedVersion(2)),
            ("ferrykeyx-abcd", RecoveryCodeError::NotACode),
            (
                "ferrykey1-ab9d",
                RecoveryCodeError::BadCharacter {
                    ch: '9',
                    position: 13,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                FolderSecret::from_recovery_code(input),
                Err(want),
                "{input}"
            );
        }
        let dropped_group = code.replacen(&code[10..15], "", 1);
        assert_eq!(
            FolderSecret::from_recovery_code(&dropped_group),
            Err(RecoveryCodeError::Truncated { found: 52 })
        );
        let doubled = format!("{}{}", *code, &code[9..14]);
        assert_eq!(
            FolderSecret::from_recovery_code(&doubled),
            Err(RecoveryCodeError::TooLong { found: 60 })
        );
        let huge = "a".repeat(MAX_CODE_TEXT_LEN + 1);
        assert!(matches!(
            FolderSecret::from_recovery_code(&huge),
            Err(RecoveryCodeError::TooLong { .. })
        ));
        assert!(
            RecoveryCodeError::Checksum
                .to_string()
                .contains("check each group")
        );
    }

    proptest! {
        #[test]
        fn any_secret_round_trips(bytes in any::<[u8; 32]>()) {
            let s = FolderSecret::from_bytes(bytes);
            prop_assert_eq!(FolderSecret::from_recovery_code(&s.recovery_code()), Ok(s));
        }

        #[test]
        fn any_text_parses_or_fails_cleanly(text in "\\PC{0,120}") {
            let _ = FolderSecret::from_recovery_code(&text);
        }
    }
}
