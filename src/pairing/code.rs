//! Invite codes: the short-lived text a person copies from `ferry invite` on one
//! device to `ferry join CODE` on another, carrying what the joiner needs to dial
//! the inviter and prove it was invited.
//!
//! # Format, version 1
//!
//! The text is the prefix `ferry1` (`ferry` and the format version as one digit)
//! followed by the payload in base32 (RFC 4648 alphabet, lower case, no padding).
//! [`InviteCode::encode`] writes a `-` after the prefix and between blocks of 8
//! base32 characters; [`InviteCode::decode`] ignores case, whitespace (including
//! line breaks) and `-` anywhere, since codes get pasted through chats and mail.
//!
//! The payload, integers big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version, `1` |
//! | 32 | inviter's device id (ed25519 public key) |
//! | 16 | secret |
//! | 8 | expiry, Unix seconds |
//! | 1 | number of addresses, at most [`MAX_ADDRS`] |
//! | 7 or 19 each | address: tag `4` + 4 IP bytes, or tag `6` + 16 IP bytes; then the port (2) |
//! | 2 + n | relay URL: length n (0 = no relay, at most [`MAX_RELAY_LEN`]), then UTF-8 bytes |
//! | 4 | checksum: the first 4 bytes of blake3 in derive-key mode (context `ferry 2026 invite code v1 checksum`) over everything before it |
//!
//! The checksum is checked before any field is parsed, so a typo is reported as a
//! typo rather than as whatever field it happened to land in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use data_encoding::{BASE32_NOPAD, DecodeKind};
use iroh_base::PublicKey;

/// Most direct addresses a code carries.
pub const MAX_ADDRS: usize = 8;

/// Longest relay URL a code carries, in bytes.
pub const MAX_RELAY_LEN: usize = 256;

/// Longest text [`InviteCode::decode`] looks at, in bytes; the longest valid code
/// is well under half of this.
pub const MAX_TEXT_LEN: usize = 2048;

const PREFIX: &str = "ferry";
const VERSION: u8 = 1;
const CHECKSUM_CONTEXT: &str = "ferry 2026 invite code v1 checksum";
const CHECKSUM_LEN: usize = 4;
const GROUP_LEN: usize = 8;
const TAG_V4: u8 = 4;
const TAG_V6: u8 = 6;

/// What a joiner needs to dial and prove itself to an inviter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteCode {
    /// The inviter's device id.
    pub inviter: PublicKey,
    /// A fresh 128-bit secret the joiner presents to show it holds this code.
    pub secret: [u8; 16],
    /// When the code stops being accepted, in Unix seconds.
    pub expires_at: u64,
    /// The inviter's direct addresses, at most [`MAX_ADDRS`].
    pub addrs: Vec<SocketAddr>,
    /// The inviter's relay URL, at most [`MAX_RELAY_LEN`] bytes.
    pub relay: Option<String>,
}

/// Why a text is not a usable invite code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// The text does not start with `ferry`.
    #[error(
        "this is not a ferry invite code (those start with `ferry1`); copy what `ferry invite` printed"
    )]
    NotACode,
    /// The code's format version is not 1.
    #[error(
        "this invite code has format version {0}, made by a newer ferry; upgrade ferry on this device"
    )]
    UnsupportedVersion(u8),
    /// A character that base32 never uses; `position` counts from 1 at the code's first character.
    #[error(
        "a typo: {ch:?} at character {position} cannot appear in an invite code; copy the code again"
    )]
    BadCharacter {
        /// The character as it was written.
        ch: char,
        /// Where it is, counting from 1 at the code's first character.
        position: usize,
    },
    /// The checksum does not match the rest of the code.
    #[error("the code has a typo (checksum mismatch); copy it again")]
    Checksum,
    /// The code ends before its last field.
    #[error("the code is incomplete; copy all of it again")]
    Truncated,
    /// The code has bytes after its last field.
    #[error("the code has extra data after its end; ask the inviting device for a new code")]
    TrailingBytes,
    /// The text is longer than [`MAX_TEXT_LEN`].
    #[error("this text is too long to be an invite code (over {MAX_TEXT_LEN} characters)")]
    TooLong,
    /// The code lists more than [`MAX_ADDRS`] addresses.
    #[error(
        "the code lists more than {MAX_ADDRS} addresses; ask the inviting device for a new code"
    )]
    TooManyAddrs,
    /// An address has an unknown kind.
    #[error("the code holds a malformed address; ask the inviting device for a new code")]
    BadAddr,
    /// The relay URL is not UTF-8 or is longer than [`MAX_RELAY_LEN`].
    #[error(
        "the code's relay URL is not UTF-8 or longer than {MAX_RELAY_LEN} bytes; ask the inviting device for a new code"
    )]
    BadRelay,
    /// The device id is not a valid ed25519 public key.
    #[error(
        "the code's device id is not a valid public key; ask the inviting device for a new code"
    )]
    BadKey,
}

impl InviteCode {
    /// A code with a fresh random secret. Keeps the first [`MAX_ADDRS`] addresses
    /// (so pass the best first) and drops a relay URL that is empty or longer
    /// than [`MAX_RELAY_LEN`], so that the code holds exactly what it will carry.
    ///
    /// # Panics
    ///
    /// If the operating system's random number generator fails.
    pub fn new(
        inviter: PublicKey,
        addrs: Vec<SocketAddr>,
        relay: Option<String>,
        expires_at: u64,
    ) -> Self {
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret)
            .expect("the operating system's random number generator failed");
        Self {
            inviter,
            secret,
            expires_at,
            addrs: addrs
                .iter()
                .take(MAX_ADDRS)
                .map(|a| plain_addr(*a))
                .collect(),
            relay: relay.filter(|r| relay_fits(r)),
        }
    }

    /// The code as text, `ferry1-` then base32 in dash-separated blocks of 8.
    /// Fields past the limits that [`InviteCode::new`] applies are left out.
    pub fn encode(&self) -> String {
        let mut payload = Vec::with_capacity(128);
        payload.push(VERSION);
        payload.extend_from_slice(self.inviter.as_bytes());
        payload.extend_from_slice(&self.secret);
        payload.extend_from_slice(&self.expires_at.to_be_bytes());
        let addrs = &self.addrs[..self.addrs.len().min(MAX_ADDRS)];
        payload.push(addrs.len() as u8);
        for addr in addrs {
            match addr.ip() {
                IpAddr::V4(ip) => {
                    payload.push(TAG_V4);
                    payload.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    payload.push(TAG_V6);
                    payload.extend_from_slice(&ip.octets());
                }
            }
            payload.extend_from_slice(&addr.port().to_be_bytes());
        }
        let relay = self
            .relay
            .as_deref()
            .filter(|r| relay_fits(r))
            .unwrap_or("");
        payload.extend_from_slice(&(relay.len() as u16).to_be_bytes());
        payload.extend_from_slice(relay.as_bytes());
        let sum = checksum(&payload);
        payload.extend_from_slice(&sum);
        to_text(&payload)
    }

    /// Reads a code as a person pasted it: case, whitespace and `-` do not matter.
    /// Never panics, and refuses texts over [`MAX_TEXT_LEN`] bytes before looking
    /// at them.
    pub fn decode(text: &str) -> Result<Self, CodeError> {
        if text.len() > MAX_TEXT_LEN {
            return Err(CodeError::TooLong);
        }
        // Each significant character with its 1-based position in the trimmed
        // text, so errors point at what the person sees.
        let chars: Vec<(char, usize)> = text
            .trim()
            .chars()
            .zip(1..)
            .filter(|(c, _)| !c.is_whitespace() && *c != '-')
            .collect();
        let prefix_ok = chars.len() >= PREFIX.len()
            && chars
                .iter()
                .zip(PREFIX.chars())
                .all(|((c, _), p)| c.to_ascii_lowercase() == p);
        if !prefix_ok {
            return Err(CodeError::NotACode);
        }
        match chars.get(PREFIX.len()) {
            None => return Err(CodeError::Truncated),
            Some(('1', _)) => {}
            Some((c, _)) => match c.to_digit(10) {
                Some(n) => return Err(CodeError::UnsupportedVersion(n as u8)),
                None => return Err(CodeError::NotACode),
            },
        }
        let body = &chars[PREFIX.len() + 1..];
        let mut symbols = Vec::with_capacity(body.len());
        for &(ch, position) in body {
            let upper = ch.to_ascii_uppercase();
            if !matches!(upper, 'A'..='Z' | '2'..='7') {
                return Err(CodeError::BadCharacter { ch, position });
            }
            symbols.push(upper as u8);
        }
        let bytes = BASE32_NOPAD.decode(&symbols).map_err(|e| match e.kind {
            DecodeKind::Length => CodeError::Truncated,
            // A symbol whose unused low bits are set: only a typo makes one.
            _ => match body.get(e.position) {
                Some(&(ch, position)) => CodeError::BadCharacter { ch, position },
                None => CodeError::Checksum,
            },
        })?;
        let Some(split) = bytes.len().checked_sub(CHECKSUM_LEN) else {
            return Err(CodeError::Truncated);
        };
        let (payload, sum) = bytes.split_at(split);
        if checksum(payload) != sum {
            return Err(CodeError::Checksum);
        }
        parse_payload(payload)
    }

    /// Whether the code is no longer accepted at `now_unix` (Unix seconds).
    pub fn is_expired(&self, now_unix: u64) -> bool {
        now_unix >= self.expires_at
    }
}

/// The code drawn as a QR code in Unicode half blocks, light modules lit, as
/// suits a terminal with light text on a dark background. The text is put in the
/// QR code in upper case, which QR stores more compactly and
/// [`InviteCode::decode`] reads the same. `None` if it is too long for a QR code.
pub fn render_qr(code: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let qr = qrcode::QrCode::new(code.to_ascii_uppercase().as_bytes()).ok()?;
    Some(
        qr.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build(),
    )
}

fn parse_payload(payload: &[u8]) -> Result<InviteCode, CodeError> {
    let mut r = Reader(payload);
    let version = r.u8()?;
    if version != VERSION {
        return Err(CodeError::UnsupportedVersion(version));
    }
    let inviter = PublicKey::from_bytes(&r.array()?).map_err(|_| CodeError::BadKey)?;
    let secret = r.array()?;
    let expires_at = u64::from_be_bytes(r.array()?);
    let n_addrs = usize::from(r.u8()?);
    if n_addrs > MAX_ADDRS {
        return Err(CodeError::TooManyAddrs);
    }
    let mut addrs = Vec::with_capacity(n_addrs);
    for _ in 0..n_addrs {
        let ip = match r.u8()? {
            TAG_V4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            TAG_V6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            _ => return Err(CodeError::BadAddr),
        };
        addrs.push(SocketAddr::new(ip, u16::from_be_bytes(r.array()?)));
    }
    let relay_len = usize::from(u16::from_be_bytes(r.array()?));
    if relay_len > MAX_RELAY_LEN {
        return Err(CodeError::BadRelay);
    }
    let relay = match relay_len {
        0 => None,
        n => Some(
            std::str::from_utf8(r.take(n)?)
                .map_err(|_| CodeError::BadRelay)?
                .to_owned(),
        ),
    };
    if !r.0.is_empty() {
        return Err(CodeError::TrailingBytes);
    }
    Ok(InviteCode {
        inviter,
        secret,
        expires_at,
        addrs,
        relay,
    })
}

/// Reads fields off the front of a payload; running out is [`CodeError::Truncated`].
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodeError> {
        if self.0.len() < n {
            return Err(CodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, CodeError> {
        Ok(self.array::<1>()?[0])
    }
}

fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let hash = blake3::Hasher::new_derive_key(CHECKSUM_CONTEXT)
        .update(payload)
        .finalize();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&hash.as_bytes()[..CHECKSUM_LEN]);
    out
}

/// `ferry1-` and the base32 of `bytes` (payload and checksum) in blocks of 8.
fn to_text(bytes: &[u8]) -> String {
    let b32 = BASE32_NOPAD.encode(bytes).to_ascii_lowercase();
    let mut text = format!("{PREFIX}{VERSION}");
    for (i, c) in b32.chars().enumerate() {
        if i % GROUP_LEN == 0 {
            text.push('-');
        }
        text.push(c);
    }
    text
}

/// The address as a code carries it: IPv6 flow info and scope id mean nothing on
/// another device.
fn plain_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port())
}

fn relay_fits(relay: &str) -> bool {
    !relay.is_empty() && relay.len() <= MAX_RELAY_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> PublicKey {
        iroh_base::SecretKey::from_bytes(&[seed; 32]).public()
    }

    fn typical() -> InviteCode {
        InviteCode::new(
            key(7),
            vec![
                "192.168.1.20:41641".parse().unwrap(),
                "[2001:db8::1]:41641".parse().unwrap(),
            ],
            None,
            1_900_000_000,
        )
    }

    /// Payload bytes with a correct checksum appended, as text.
    fn text_with_checksum(payload: &[u8]) -> String {
        let mut bytes = payload.to_vec();
        bytes.extend_from_slice(&checksum(payload));
        to_text(&bytes)
    }

    /// The fixed fields of a version 1 payload, up to and including `n_addrs`.
    fn header(n_addrs: u8) -> Vec<u8> {
        let mut p = vec![VERSION];
        p.extend_from_slice(key(1).as_bytes());
        p.extend_from_slice(&[9; 16]);
        p.extend_from_slice(&1_900_000_000u64.to_be_bytes());
        p.push(n_addrs);
        p
    }

    #[test]
    fn round_trips_ipv4_ipv6_and_relay() {
        let mut code = typical();
        code.relay = Some("https://euw1-1.relay.iroh.network./".to_owned());
        let text = code.encode();
        assert!(text.starts_with("ferry1-"));
        assert_eq!(InviteCode::decode(&text), Ok(code));
    }

    #[test]
    fn round_trips_without_addrs_or_relay() {
        let code = InviteCode::new(key(3), vec![], None, 0);
        assert_eq!(InviteCode::decode(&code.encode()), Ok(code));
    }

    #[test]
    fn new_makes_a_fresh_secret_and_keeps_only_what_fits() {
        let many: Vec<SocketAddr> = (0..12)
            .map(|i| SocketAddr::new(Ipv4Addr::new(10, 0, 0, i).into(), 1))
            .collect();
        let a = InviteCode::new(key(1), many.clone(), Some("x".repeat(300)), 5);
        let b = InviteCode::new(key(1), many, Some(String::new()), 5);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.addrs.len(), MAX_ADDRS);
        assert_eq!((a.relay, b.relay), (None, None));
    }

    #[test]
    fn typical_code_has_blocks_of_eight() {
        let text = typical().encode();
        // 90 payload bytes: 144 base32 characters in 18 blocks.
        assert_eq!(text.len(), 6 + 144 + 18);
        assert!(text.split('-').skip(1).all(|b| b.len() == 8));
    }

    #[test]
    fn decode_tolerates_case_whitespace_and_dashes() {
        let code = typical();
        let text = code.encode();
        let pasted = format!(
            "  \n{}\r\n",
            text.to_ascii_uppercase()
                .replacen('-', "\n", 5)
                .replacen('-', " ", 3)
        );
        assert_eq!(InviteCode::decode(&pasted), Ok(code.clone()));
        let squashed: String = text.chars().filter(|c| *c != '-').collect();
        assert_eq!(InviteCode::decode(&squashed), Ok(code));
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let mut code = typical();
        code.relay = Some("https://relay.example/".to_owned());
        let text = code.encode();
        let replacements = "abcdefghijklmnopqrstuvwxyz2345670189!é";
        let mut tried = 0;
        for (i, orig) in text.char_indices().skip("ferry1".len()) {
            if orig == '-' {
                continue;
            }
            for c in replacements.chars().filter(|c| *c != orig) {
                let typo = format!("{}{c}{}", &text[..i], &text[i + 1..]);
                match InviteCode::decode(&typo) {
                    Err(CodeError::Checksum) => {}
                    Err(CodeError::BadCharacter { ch, position }) => {
                        assert_eq!((ch, position), (c, i + 1), "{typo}");
                    }
                    other => panic!("typo at {i} to {c:?} gave {other:?}"),
                }
                tried += 1;
            }
        }
        assert!(tried > 1000);
    }

    #[test]
    fn refuses_what_is_not_a_code() {
        let text = typical().encode();
        let cases = [
            ("", CodeError::NotACode),
            ("   \n ", CodeError::NotACode),
            ("hello world", CodeError::NotACode),
            ("fery1-aaaaaaaa", CodeError::NotACode),
            ("ferryx-aaaaaaaa", CodeError::NotACode),
            ("ferry", CodeError::Truncated),
            ("ferry1", CodeError::Truncated),
            ("ferry1-aaa", CodeError::Truncated),
            ("ferry1-aa", CodeError::Truncated),
            ("ferry1-aaaaaaaa", CodeError::Checksum),
            ("ferry2-aaaaaaaa", CodeError::UnsupportedVersion(2)),
            ("FERRY9", CodeError::UnsupportedVersion(9)),
            (
                "ferry1-abc!",
                CodeError::BadCharacter {
                    ch: '!',
                    position: 11,
                },
            ),
            (
                "  ferry1-abc0",
                CodeError::BadCharacter {
                    ch: '0',
                    position: 11,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(InviteCode::decode(input), Err(want), "{input:?}");
        }
        let long = format!("{text}{}", " ".repeat(MAX_TEXT_LEN));
        assert_eq!(InviteCode::decode(&long), Err(CodeError::TooLong));
        let wrong_prefix = text.replacen("ferry1", "ferry2", 1);
        assert_eq!(
            InviteCode::decode(&wrong_prefix),
            Err(CodeError::UnsupportedVersion(2))
        );
        let cut = &text[..text.len() - 10];
        assert!(matches!(
            InviteCode::decode(cut),
            Err(CodeError::Checksum | CodeError::Truncated | CodeError::BadCharacter { .. })
        ));
    }

    #[test]
    fn well_checksummed_but_malformed_payloads_are_refused() {
        let mut cut_in_addr = header(1);
        cut_in_addr.extend_from_slice(&[TAG_V4, 10, 0]);
        let mut other_version = header(0);
        other_version[0] = 2;
        other_version.extend_from_slice(&[0, 0]);
        let mut trailing = header(0);
        trailing.extend_from_slice(&[0, 0, 42]);
        let mut many = header(9);
        many.extend_from_slice(&[0; 9 * 7 + 2]);
        let mut bad_tag = header(1);
        bad_tag.extend_from_slice(&[5, 1, 2, 3, 4, 0, 80, 0, 0]);
        let mut long_relay = header(0);
        long_relay.extend_from_slice(&257u16.to_be_bytes());
        long_relay.extend_from_slice(&[b'a'; 257]);
        let mut not_utf8 = header(0);
        not_utf8.extend_from_slice(&[0, 2, 0xff, 0xfe]);
        let mut short_relay = header(0);
        short_relay.extend_from_slice(&[0, 20, b'h']);
        let cases = [
            (cut_in_addr, CodeError::Truncated),
            (header(0), CodeError::Truncated),
            (vec![], CodeError::Truncated),
            (other_version, CodeError::UnsupportedVersion(2)),
            (trailing, CodeError::TrailingBytes),
            (many, CodeError::TooManyAddrs),
            (bad_tag, CodeError::BadAddr),
            (long_relay, CodeError::BadRelay),
            (not_utf8, CodeError::BadRelay),
            (short_relay, CodeError::Truncated),
        ];
        for (payload, want) in cases {
            let text = text_with_checksum(&payload);
            assert_eq!(InviteCode::decode(&text), Err(want), "{text}");
        }
    }

    #[test]
    fn an_invalid_public_key_is_refused() {
        // y = 2 is not the y-coordinate of any point on the curve.
        let bad_key = {
            let mut k = [0u8; 32];
            k[0] = 2;
            k
        };
        assert!(PublicKey::from_bytes(&bad_key).is_err());
        let mut payload = header(0);
        payload[1..33].copy_from_slice(&bad_key);
        payload.extend_from_slice(&[0, 0]);
        assert_eq!(
            InviteCode::decode(&text_with_checksum(&payload)),
            Err(CodeError::BadKey)
        );
    }

    #[test]
    fn expires_at_its_deadline() {
        let code = typical();
        assert!(!code.is_expired(code.expires_at - 1));
        assert!(code.is_expired(code.expires_at));
        assert!(code.is_expired(u64::MAX));
    }

    #[test]
    fn a_typical_code_renders_as_a_multiline_qr() {
        let qr = render_qr(&typical().encode()).expect("fits in a QR code");
        assert!(qr.lines().count() > 10);
        assert!(render_qr(&"x".repeat(8000)).is_none());
    }

    #[test]
    fn errors_say_what_to_do() {
        assert!(
            CodeError::NotACode
                .to_string()
                .contains("this is not a ferry invite code")
        );
        assert!(
            CodeError::UnsupportedVersion(2)
                .to_string()
                .contains("upgrade")
        );
        assert!(CodeError::Checksum.to_string().contains("copy it again"));
    }

    fn arb_code() -> impl Strategy<Value = InviteCode> {
        (
            any::<[u8; 32]>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            prop::collection::vec(any::<SocketAddr>(), 0..=MAX_ADDRS),
            prop::option::of("\\PC{1,64}"),
        )
            .prop_map(|(seed, secret, expires_at, addrs, relay)| InviteCode {
                inviter: iroh_base::SecretKey::from_bytes(&seed).public(),
                secret,
                expires_at,
                addrs: addrs.into_iter().map(plain_addr).collect(),
                relay,
            })
    }

    proptest! {
        #[test]
        fn any_code_round_trips(code in arb_code()) {
            let text = code.encode();
            prop_assert!(text.len() <= MAX_TEXT_LEN);
            prop_assert_eq!(InviteCode::decode(&text), Ok(code));
        }

        #[test]
        fn any_text_decodes_or_fails_cleanly(text in "\\PC{0,300}") {
            if let Ok(code) = InviteCode::decode(&text) {
                prop_assert_eq!(InviteCode::decode(&code.encode()), Ok(code));
            }
        }
    }
}
