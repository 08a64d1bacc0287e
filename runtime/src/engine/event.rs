//! What a call sends back to its client, in order: heartbeats, one result,
//! then the result payload's pieces. The service turns these into replies.

use aipod::codec::Encoding;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::{
    engine::status::{Beat, Phase},
    error::Error,
};

/// One thing a call sends back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// A heartbeat.
    Beat(Beat),
    /// The model's result.
    Result {
        /// The JSON result, serialized.
        json: Bytes,
        /// Size of the result payload that follows, if any.
        payload_size: Option<u64>,
        /// How the result payload is encoded: as the client encoded its own.
        encoding: Encoding,
    },
    /// The next encoded piece of the result payload.
    Data(Bytes),
}

/// How a call ended when it did not succeed: the error and the phase the
/// call was in, which the client is told.
#[derive(Debug)]
pub(crate) struct Failed {
    /// What went wrong.
    pub(crate) error: Error,
    /// Where the call was when it did.
    pub(crate) phase: Phase,
}

/// Where a call's events go; a closed channel means the client left.
pub(crate) type Events = mpsc::Sender<Result<Event, Failed>>;
