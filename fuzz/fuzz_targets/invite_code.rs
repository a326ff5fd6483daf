//! Any text either fails to decode as an invite code or decodes to a code that
//! encodes and decodes back to itself.
#![no_main]
use ferry::pairing::code::InviteCode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(c) = InviteCode::decode(s)
    {
        assert_eq!(InviteCode::decode(&c.encode()), Ok(c));
    }
});
