//! Sending a result payload: read from the call's output directory and
//! encoded chunk by chunk on a blocking thread, each chunk waiting for room
//! in the bounded reply channel, so a slow client never makes the server
//! buffer the file.

use std::{fs::File, path::PathBuf};

use aipod::{
    codec::{ChunkEncoder, DEFAULT_ZSTD_LEVEL},
    contract::CHUNK_SIZE,
    proto::Encoding,
};

use crate::{
    call::{Event, Events},
    error::{Error, Result},
};

/// Result payloads this small are encoded on the async task itself.
const INLINE_MAX: u64 = 256 << 10;

/// Streams the file at `path` (`size` bytes) to `events` as `Data` events.
pub async fn send_payload(path: PathBuf, size: u64, encoding: Encoding, events: Events) -> Result<()> {
    let file = File::open(&path).map_err(|e| Error::spool_io("opening the result payload", e))?;
    let mut encoder = ChunkEncoder::with_size(file, encoding, DEFAULT_ZSTD_LEVEL, CHUNK_SIZE, Some(size))
        .map_err(|e| Error::Internal(format!("zstd encoder: {e}")))?;
    if size <= INLINE_MAX {
        while let Some(chunk) = encoder.next_chunk().map_err(|e| Error::spool_io("reading the result payload", e))? {
            events.send(Ok(Event::Data(chunk))).await.map_err(|_| Error::Cancelled)?;
        }
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        while let Some(chunk) = encoder.next_chunk().map_err(|e| Error::spool_io("reading the result payload", e))? {
            events.blocking_send(Ok(Event::Data(chunk))).map_err(|_| Error::Cancelled)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Internal(format!("result sender: {e}")))?
}
