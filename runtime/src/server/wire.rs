//! The protocol's types at the edge, in one place: runtime errors to gRPC
//! statuses (with the retryable flag and the phase) and the client's stream
//! errors back, frames to payload chunks, events and heartbeats to replies.
//! Below this, nothing names tonic or the generated types.

use aipod::{contract, proto};
use bytes::Bytes;
use tonic::{Status, metadata::MetadataValue};

use crate::{
    code::ErrorCode,
    engine::event::{Event, Failed},
    engine::status::{Beat, Phase},
    error::Error,
};

pub(crate) fn chunk(frame: Result<proto::Frame, Status>) -> crate::error::Result<Bytes> {
    match frame {
        Ok(proto::Frame { kind: Some(proto::frame::Kind::Data(bytes)) }) => Ok(bytes),
        Ok(proto::Frame { kind: Some(proto::frame::Kind::Header(_)) }) => {
            Err(Error::InvalidArgument("a call has exactly one header, and this is a second one".into()))
        }
        Ok(proto::Frame { kind: None }) => {
            Err(Error::InvalidArgument("a frame carried neither header nor data".into()))
        }
        Err(s) => Err(inbound_error(s)),
    }
}

/// An error reading the client's stream: too-large and too-slow messages
/// keep their meaning (and whether a retry may help); anything else means
/// the client went away.
pub(crate) fn inbound_error(s: Status) -> Error {
    let retryable = s.metadata().get(contract::RETRYABLE_KEY).is_some_and(|v| v == "true");
    match s.code() {
        tonic::Code::ResourceExhausted if retryable => Error::Busy(s.message().to_owned()),
        tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => Error::ResourceExhausted(s.message().to_owned()),
        tonic::Code::DeadlineExceeded => Error::TooSlow(s.message().to_owned()),
        tonic::Code::InvalidArgument | tonic::Code::Internal | tonic::Code::Unimplemented => {
            Error::InvalidArgument(format!("malformed request stream: {}", s.message()))
        }
        _ => Error::Cancelled,
    }
}

pub(crate) fn reply(event: Event) -> proto::Reply {
    use proto::reply::Kind;
    let kind = match event {
        Event::Beat(beat) => Kind::Heartbeat(heartbeat(beat)),
        Event::Result { json, payload_size, encoding } => {
            Kind::Result(proto::Result { json, payload_size, encoding: proto::Encoding::from(encoding) as i32 })
        }
        Event::Data(bytes) => Kind::Data(bytes),
    };
    proto::Reply { kind: Some(kind) }
}

fn heartbeat(beat: Beat) -> proto::Heartbeat {
    let phase = match beat.phase {
        Phase::Receiving => proto::Phase::Receiving,
        Phase::Queued => proto::Phase::Queued,
        Phase::Running => proto::Phase::Running,
        Phase::Sending => proto::Phase::Sending,
    };
    proto::Heartbeat {
        phase: phase as i32,
        elapsed_ms: beat.elapsed.as_millis() as u64,
        received_bytes: beat.received_bytes,
        queue_position: beat.queue_position,
        progress: beat.progress,
        message: beat.message,
        retain_seconds: beat.retain.as_secs(),
    }
}

/// The one conversion from runtime errors to gRPC statuses. Refusals a
/// client may retry carry `x-aipod-retryable: true`.
pub(crate) fn status(e: Error) -> Status {
    let mut status = Status::new(tonic_code(e.code()), e.message());
    if e.retryable() {
        status.metadata_mut().insert(contract::RETRYABLE_KEY, MetadataValue::from_static("true"));
    }
    status
}

/// A call that failed after admission: its status, with the phase it was in.
pub(crate) fn failed(f: Failed) -> Status {
    let mut status = status(f.error);
    status.metadata_mut().insert(contract::PHASE_KEY, MetadataValue::from_static(phase_name(f.phase)));
    status
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Receiving => "RECEIVING",
        Phase::Queued => "QUEUED",
        Phase::Running => "RUNNING",
        Phase::Sending => "SENDING",
    }
}

fn tonic_code(code: ErrorCode) -> tonic::Code {
    tonic::Code::from_i32(code.number())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_maps_to_the_same_tonic_code() {
        // The numbers of the gRPC status code specification.
        let spec = [
            ("CANCELLED", 1),
            ("UNKNOWN", 2),
            ("INVALID_ARGUMENT", 3),
            ("DEADLINE_EXCEEDED", 4),
            ("NOT_FOUND", 5),
            ("ALREADY_EXISTS", 6),
            ("PERMISSION_DENIED", 7),
            ("RESOURCE_EXHAUSTED", 8),
            ("FAILED_PRECONDITION", 9),
            ("ABORTED", 10),
            ("OUT_OF_RANGE", 11),
            ("UNIMPLEMENTED", 12),
            ("INTERNAL", 13),
            ("UNAVAILABLE", 14),
            ("DATA_LOSS", 15),
            ("UNAUTHENTICATED", 16),
        ];
        assert_eq!(ErrorCode::ALL.len(), spec.len());
        for code in ErrorCode::ALL {
            let (_, number) = spec.iter().find(|(name, _)| *name == code.name()).expect("a gRPC code name");
            assert_eq!(tonic_code(code) as i32, *number, "{code}");
            assert_eq!(
                format!("{:?}", tonic_code(code)).to_ascii_uppercase().replace('_', ""),
                code.name().replace('_', "")
            );
        }
    }
}
