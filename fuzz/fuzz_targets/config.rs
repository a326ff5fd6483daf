//! Any config text is either a valid config or a clear error, never a panic;
//! a valid one survives a write-and-read round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(c) = ferry::config::Config::from_toml_str(text)
    {
        let again = ferry::config::Config::from_toml_str(&c.to_commented_toml());
        assert_eq!(again.ok(), Some(c));
    }
});
