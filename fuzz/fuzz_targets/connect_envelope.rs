//! Reads Connect envelopes as the E2B sandbox daemon does (a Start
//! request's body), then decodes each message as JSON, and the live
//! snapshot file a paused sandbox is kept in: never a panic, and what is
//! read back out lies inside the input.
//!   cargo +nightly fuzz run connect_envelope
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroboot_server::e2b::connect::{envelope, read_envelopes, FLAG_END_STREAM};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelopes) = read_envelopes(data, 1 << 20) {
        let mut total = 0;
        for e in &envelopes {
            assert!(e.flags & !FLAG_END_STREAM == 0);
            total += 5 + e.message.len();
            let _ = serde_json::from_slice::<serde_json::Value>(e.message);
            // What we read, written again, reads the same.
            let again = envelope(e.flags, e.message);
            assert_eq!(read_envelopes(&again, 1 << 20).ok().map(|v| v.len()), Some(1));
        }
        assert_eq!(total, data.len());
    }
    let _ = zeroboot_vmm::snapshot::live::decode(data);
});
