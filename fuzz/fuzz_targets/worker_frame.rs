//! Decodes frames between the host and a worker process. The host reads
//! replies from a worker whose VMM a guest might have subverted, so
//! whatever the bytes, decoding returns an error or a message, never
//! panics or allocates from a claimed length.
//!   cargo +nightly fuzz run worker_frame
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroboot_sandbox::wire::{decode, read_frame, Command, Reply};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Reply>(data);
    let _ = decode::<Command>(data);
    let mut input = data;
    while read_frame::<Reply>(&mut input).is_ok() {}
});
