//! Moving a file's bytes between an HTTP body and a sandbox, streamed: at
//! most one copy piece of a transfer is in the server's memory at a time.
//!
//! On the sandbox's disk the guest only allocates or looks up the file's
//! blocks, a window at a time ([`FileOp::WriteMap`], [`FileOp::ReadMap`]),
//! and the bytes go straight between the body and guest memory
//! ([`GuestFiles::write_disk`], [`GuestFiles::read_disk`]). Anywhere else
//! (/tmp, the root image) the guest reads and writes them itself, a
//! mailbox-sized piece per request.

use axum::body::Bytes;
use axum::http::StatusCode;
use tokio_stream::{Stream, StreamExt};
use zeroboot_protocol::files::{self, decode_map, FileMap, FileOp, PARENTS, TRUNCATE};

use super::guest::{errno_error, GuestFiles};
use crate::error::ApiError;

/// File bytes the guest allocates or looks up per operation: 32 DAX faults
/// of 2 MiB for a write.
const WINDOW: u64 = 64 << 20;
/// Bytes per copy between the server and the sandbox's memory.
const PIECE: usize = 4 << 20;
/// Bytes per guest read or write, for files off the disk: what fits the
/// mailbox with room to spare.
const DATA_PIECE: usize = 512 << 10;

/// Where a file's bytes go, decided by the guest when the file is created.
enum Sink {
    /// On the disk: the current window's map.
    Disk(Option<FileMap>, u64),
    /// Elsewhere: written by the guest.
    Guest,
}

/// Writes the body in `stream` to `path` (created, with its parent directories, or
/// emptied) and sets its size. `expected` is the body's length, when the
/// client said it. Returns the bytes written.
pub(crate) async fn upload<E: std::fmt::Display>(
    files: &GuestFiles,
    path: &str,
    stream: &mut (impl Stream<Item = Result<Bytes, E>> + Unpin),
    expected: Option<u64>,
) -> Result<u64, ApiError> {
    // Created (or emptied) with the first window mapped when the client
    // said how long the body is, else empty: one round trip either way.
    let first = expected.unwrap_or(0).min(WINDOW);
    let mut create = files.request(FileOp::WriteMap, path);
    create.flags = TRUNCATE | PARENTS;
    create.length = first;
    let reply = files.try_op(create).await?;
    let mut sink = match reply.errno {
        0 if first > 0 => Sink::Disk(
            Some(decode_map(&reply.data, 0, first, files.disk_bytes).map_err(ApiError::internal)?),
            first,
        ),
        0 => Sink::Disk(None, 0),
        libc::EXDEV => {
            let mut create = files.request(FileOp::WriteData, path);
            create.flags = TRUNCATE | PARENTS;
            files.op(create).await?;
            Sink::Guest
        }
        _ => return Err(errno_error(path, &reply)),
    };
    let mut pending: Vec<u8> = Vec::with_capacity(PIECE);
    let mut written = 0u64;
    let piece = match sink {
        Sink::Disk(..) => PIECE,
        Sink::Guest => DATA_PIECE,
    };
    loop {
        let next = stream.next().await;
        let done = next.is_none();
        if let Some(chunk) = next {
            let chunk = chunk.map_err(|e| ApiError::bad_request("body_error", format!("reading the upload: {e}")))?;
            pending.extend_from_slice(&chunk);
        }
        while pending.len() >= piece || (done && !pending.is_empty()) {
            let rest = pending.split_off(pending.len().min(piece));
            let bytes = std::mem::replace(&mut pending, rest);
            let last = done && pending.is_empty();
            written = put_piece(files, path, &mut sink, written, bytes, expected, last).await?;
        }
        if done {
            break;
        }
    }
    if let Sink::Disk(..) = sink {
        // The allocation rounds the size up to 2 MiB; this is the real one.
        let mut size = files.request(FileOp::SetSize, path);
        size.length = written;
        files.op(size).await?;
    }
    Ok(written)
}

/// Writes `bytes` at file offset `at`; returns the offset after them.
async fn put_piece(
    files: &GuestFiles,
    path: &str,
    sink: &mut Sink,
    at: u64,
    bytes: Vec<u8>,
    expected: Option<u64>,
    last: bool,
) -> Result<u64, ApiError> {
    let end = at + bytes.len() as u64;
    let (map, map_end) = match sink {
        Sink::Guest => {
            let mut write = files.request(FileOp::WriteData, path);
            write.offset = at;
            write.data = bytes;
            files.op(write).await?;
            return Ok(end);
        }
        Sink::Disk(map, map_end) => (map, map_end),
    };
    let mut from = at;
    while from < end {
        if map.is_none() || from >= *map_end {
            // The next window: as long as the client said the file is, or
            // than this last piece, else a whole window.
            let want = match expected {
                Some(total) if total > from => total - from,
                _ if last => end - from,
                _ => WINDOW,
            };
            let len = want.min(WINDOW).max(end - from);
            let mut allocate = files.request(FileOp::WriteMap, path);
            allocate.offset = from;
            allocate.length = len;
            let data = files.op(allocate).await?;
            *map = Some(decode_map(&data, from, from + len, files.disk_bytes).map_err(ApiError::internal)?);
            *map_end = from + len;
        }
        let Some(current) = map.as_ref() else { break };
        let upto = end.min(*map_end);
        // Every byte of the window is on a written extent: the guest made
        // them so, and a gap means it did not.
        let mut cursor = from;
        for (start, physical, len) in current.pieces(from, upto) {
            if start != cursor {
                break;
            }
            let slice = &bytes[(start - at) as usize..(start + len - at) as usize];
            files.write_disk(physical, slice.to_vec()).await?;
            cursor = start + len;
        }
        if cursor < upto {
            return Err(ApiError::internal(format!(
                "{path}: the guest left bytes {cursor}..{upto} unallocated"
            )));
        }
        from = upto;
    }
    Ok(end)
}

/// A file to send: its size, and where its bytes come from.
pub(crate) struct Download {
    pub size: u64,
    source: Source,
}

enum Source {
    Disk(FileMap, u64),
    /// Read by the guest; the first piece came with the size.
    Guest(Vec<u8>),
}

/// Looks `path` up for a download: 404 and the like before any byte goes out.
pub(crate) async fn open_download(files: &GuestFiles, path: &str) -> Result<Download, ApiError> {
    let mut map = files.request(FileOp::ReadMap, path);
    map.length = WINDOW;
    let reply = files.try_op(map).await?;
    match reply.errno {
        0 => {
            let map = decode_map(&reply.data, 0, WINDOW, files.disk_bytes).map_err(ApiError::internal)?;
            Ok(Download {
                size: map.size,
                source: Source::Disk(map, WINDOW),
            })
        }
        libc::EXDEV => {
            let mut read = files.request(FileOp::ReadData, path);
            read.length = DATA_PIECE as u64;
            let data = files.op(read).await?;
            let size = data
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| ApiError::internal("the guest's read reply has no size"))?;
            Ok(Download {
                size,
                source: Source::Guest(data[8..].to_vec()),
            })
        }
        _ => Err(errno_error(path, &reply)),
    }
}

/// Streams the download into `tx`, exactly `size` bytes (zeros where the
/// file shrank meanwhile), or an error that cuts the response short.
pub(crate) async fn send_download(
    files: GuestFiles,
    path: String,
    download: Download,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let failed = |e: ApiError| Err(std::io::Error::other(e.message));
    let size = download.size;
    let mut at = 0u64;
    match download.source {
        Source::Guest(mut first) => {
            while at < size {
                let piece = if first.is_empty() {
                    let mut read = files.request(FileOp::ReadData, &path);
                    read.offset = at;
                    read.length = DATA_PIECE as u64;
                    match files.op(read).await {
                        Ok(data) if data.len() > 8 => data[8..].to_vec(),
                        Ok(_) => vec![0; (size - at).min(DATA_PIECE as u64) as usize],
                        Err(e) => {
                            let _ = tx.send(failed(e)).await;
                            return;
                        }
                    }
                } else {
                    std::mem::take(&mut first)
                };
                let piece = &piece[..piece.len().min((size - at) as usize)];
                at += piece.len() as u64;
                if tx.send(Ok(Bytes::copy_from_slice(piece))).await.is_err() {
                    return;
                }
            }
        }
        Source::Disk(mut map, mut map_end) => {
            while at < size {
                if at >= map_end {
                    let mut next = files.request(FileOp::ReadMap, &path);
                    next.offset = at;
                    next.length = WINDOW;
                    let decoded = match files.op(next).await {
                        Ok(data) => decode_map(&data, at, at + WINDOW, files.disk_bytes).map_err(ApiError::internal),
                        Err(e) => Err(e),
                    };
                    match decoded {
                        Ok(m) => map = m,
                        Err(e) => {
                            let _ = tx.send(failed(e)).await;
                            return;
                        }
                    }
                    map_end = at + WINDOW;
                }
                let end = (at + PIECE as u64).min(size).min(map_end);
                match read_piece(&files, &map, at, end).await {
                    Ok(piece) => {
                        if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(failed(e)).await;
                        return;
                    }
                }
                at = end;
            }
        }
    }
}

/// Bytes `[from, to)` of the file: its extents' bytes, zeros between them.
async fn read_piece(files: &GuestFiles, map: &FileMap, from: u64, to: u64) -> Result<Vec<u8>, ApiError> {
    let mut piece = vec![0u8; (to - from) as usize];
    for (start, physical, len) in map.pieces(from, to) {
        let bytes = files.read_disk(physical, len as u32).await?;
        if bytes.len() as u64 != len {
            return Err(ApiError::internal("the sandbox returned a short read of its disk"));
        }
        piece[(start - from) as usize..(start + len - from) as usize].copy_from_slice(&bytes);
    }
    Ok(piece)
}

/// The guest's listing of a directory, every page of it.
pub(crate) async fn list(files: &GuestFiles, path: &str) -> Result<Vec<files::Entry>, ApiError> {
    let mut entries = Vec::new();
    loop {
        let mut list = files.request(FileOp::List, path);
        list.offset = entries.len() as u64;
        let data = files.op(list).await?;
        let (page, more) = files::decode_listing(&data).map_err(ApiError::internal)?;
        let empty = page.is_empty();
        entries.extend(page);
        if !more || empty {
            return Ok(entries);
        }
        if entries.len() > MAX_ENTRIES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_entries",
                format!("{path} has more than {MAX_ENTRIES} entries"),
            ));
        }
    }
}

/// Most entries a listing returns.
const MAX_ENTRIES: usize = 100_000;

/// Reads what is left of a body the server will not use, for at most
/// `within`: a client that is still sending then reads the error response
/// instead of a broken pipe.
pub(crate) async fn drain<E>(stream: &mut (impl Stream<Item = Result<Bytes, E>> + Unpin), within: std::time::Duration) {
    let _ = tokio::time::timeout(within, async { while let Some(Ok(_)) = stream.next().await {} }).await;
}
