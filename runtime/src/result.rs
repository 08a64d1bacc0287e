//! Sending a result payload: read from the call's output directory and
//! encoded through the codec's async bridge (in line when small, else on a
//! blocking thread), each chunk waiting for room in the bounded reply
//! channel, so a slow client never makes the server buffer the file.

use std::{fs::File, path::PathBuf};

use aipod::{
    codec::{DEFAULT_ZSTD_LEVEL, Encoding, bridge::EncodedStream},
    contract::CHUNK_SIZE,
};

use crate::{
    error::{Error, Result},
    event::{Event, Events},
};

/// Streams the file at `path` (`size` bytes) to `events` as `Data` events.
pub(crate) async fn send_payload(path: PathBuf, size: u64, encoding: Encoding, events: &Events) -> Result<()> {
    let file = File::open(&path).map_err(|e| Error::spool_io("opening the result payload", e))?;
    let mut chunks = EncodedStream::new(file, encoding, DEFAULT_ZSTD_LEVEL, CHUNK_SIZE, Some(size));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| Error::spool_io("reading the result payload", e))?;
        events.send(Ok(Event::Data(chunk))).await.map_err(|_| Error::Cancelled)?;
    }
    Ok(())
}
