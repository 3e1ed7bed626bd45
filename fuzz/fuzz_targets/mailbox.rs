//! Decodes a mailbox whose header (its entropy and fresh-memory tables
//! included) and response area a hostile guest wrote, and the response area
//! as a file operation's reply.
//!   cargo +nightly fuzz run mailbox
#![no_main]

use libfuzzer_sys::fuzz_target;
use zeroboot_protocol::{
    files, fresh, header, read_chunk, read_entropy_table, read_request, Outcome, MAILBOX_SIZE, RESPONSE_OFFSET,
};

fuzz_target!(|data: &[u8]| {
    let mut mailbox = vec![0u8; MAILBOX_SIZE];
    // The first bytes are the header, the rest lands in the response area.
    let (head, body) = data.split_at(data.len().min(header::FRESH_TABLE + 4 * fresh::ENTRY_LEN));
    mailbox[..head.len()].copy_from_slice(head);
    let body = &body[..body.len().min(MAILBOX_SIZE - RESPONSE_OFFSET)];
    mailbox[RESPONSE_OFFSET..RESPONSE_OFFSET + body.len()].copy_from_slice(body);
    let seq = u32::from_le_bytes(mailbox[header::RESPONSE_SEQ..header::RESPONSE_SEQ + 4].try_into().unwrap());
    if let Ok(chunk) = read_chunk(&mailbox, seq) {
        assert!(chunk.stdout.len() + chunk.stderr.len() <= MAILBOX_SIZE - RESPONSE_OFFSET);
        let mut response = Outcome::default();
        let _ = response.append(&chunk, 1 << 20);
    }
    // A file operation's reply is a chunk's stdout: every decoder the
    // files API runs on it, with the bounds it checks against.
    let reply = &mailbox[RESPONSE_OFFSET..RESPONSE_OFFSET + body.len()];
    let _ = files::decode_entries(reply);
    let _ = files::decode_listing(reply);
    if let Ok(map) = files::decode_map(reply, 1 << 20, 65 << 20, 1 << 30) {
        let mut at = 1 << 20;
        for x in map.extents {
            assert!(x.logical >= at && x.logical + x.length <= 65 << 20 && x.physical + x.length <= 1 << 30);
            at = x.logical + x.length;
        }
    }
    let _ = read_request(&mailbox);
    if let Ok(regions) = read_entropy_table(&mailbox) {
        for r in regions {
            let end = u128::from(r.gpa) + u128::from(r.write_len());
            assert!(end <= u128::from(r.gpa | 0xfff) + 1 && end <= u128::from(u64::MAX));
        }
    }
    if let Ok(runs) = fresh::read_table(&mailbox) {
        for r in runs {
            assert!(r.len > 0 && r.gpa % fresh::RUN_ALIGN == 0 && r.len % fresh::RUN_ALIGN == 0);
            assert!(r.gpa.checked_add(r.len).is_some());
        }
    }
});
