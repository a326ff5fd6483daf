//! Version vectors read from the index (and later from peers) never panic, and
//! whatever decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = ferry::version_vector::VersionVector::decode(data) {
        assert_eq!(v.encode(), data);
    }
});
