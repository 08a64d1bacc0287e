//! The first frame of a call and its metadata (`x-func-name`,
//! `x-aipod-call-id`, `grpc-timeout`): checked and turned into the engine's
//! [`CallRequest`] before a single payload byte is read.

use aipod::{contract, proto};
use serde_json::Value;

use crate::{
    engine::payload::PayloadSpec,
    engine::request::CallRequest,
    engine::retain::MIN_CALL_ID_LEN,
    error::{Error, Result},
    model::Kwargs,
};

/// The limits a header is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeaderLimits {
    /// Largest kwargs JSON.
    pub max_kwargs_bytes: u64,
    /// Largest payload.
    pub max_payload_bytes: u64,
}

/// Builds the call request from the header and the call's metadata.
pub(crate) fn request(
    meta_func: Option<&str>,
    meta_call_id: Option<&str>,
    header: &mut proto::Header,
    limits: HeaderLimits,
) -> Result<CallRequest> {
    // Everything is checked first; only then are the header's strings moved
    // out (not copied), so a refused header still names its function.
    let func_given = match (meta_func.filter(|f| !f.is_empty()), header.func.as_str()) {
        (Some(m), "") => Some(m),
        (None, "") => Some(contract::DEFAULT_FUNC),
        (None, _) => None,
        (Some(m), h) if m == h => None,
        (Some(m), h) => {
            return Err(Error::InvalidArgument(format!(
                "{} metadata says {:?} but the header's func says {:?}",
                contract::FUNC_NAME_KEY,
                crate::error::echo(m),
                crate::error::echo(h)
            )));
        }
    };
    let encoding = proto::Encoding::codec(header.encoding)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown payload encoding {}", header.encoding)))?;
    let kwargs = kwargs(&header.kwargs_json, limits.max_kwargs_bytes)?;
    let payload = PayloadSpec { encoding, declared: header.payload_size, max: limits.max_payload_bytes };
    payload.check_declared()?;
    let call_id_given = match (header.call_id.as_str(), meta_call_id) {
        ("", Some(m)) if !m.is_empty() => Some(m),
        ("", _) => Some(""),
        _ => None,
    };
    let call_id = call_id_given.unwrap_or(&header.call_id);
    if call_id.len() > 128 {
        return Err(Error::InvalidArgument("call_id is longer than 128 bytes".into()));
    }
    // Printable ASCII only: a call id is logged and sent back as metadata.
    if !call_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidArgument(
            "call_id must be printable ASCII without spaces (letters, digits, punctuation)".into(),
        ));
    }
    let retain = header.retain_seconds.filter(|s| *s > 0).map(std::time::Duration::from_secs);
    if (retain.is_some() || header.resume_from.is_some()) && call_id.chars().count() < MIN_CALL_ID_LEN {
        return Err(Error::InvalidArgument(format!(
            "a retained or resumed call needs a call_id of at least {MIN_CALL_ID_LEN} characters, unguessable \
             (128 random bits or more): it is the key to the call"
        )));
    }
    let taken = |given: Option<&str>, own: &mut String| given.map_or_else(|| std::mem::take(own), str::to_owned);
    Ok(CallRequest {
        call_id: taken(call_id_given, &mut header.call_id),
        func: taken(func_given, &mut header.func),
        version: std::mem::take(&mut header.version),
        kwargs,
        payload,
        deadline: None,
        retain,
        resume_from: header.resume_from,
    })
}

/// Parses a `grpc-timeout` header value (`100m`, `30S`, `2H`…): digits then
/// one unit of H, M, S, m (ms), u (µs) or n (ns).
pub(super) fn grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Parses kwargs: empty means `{}`; anything else must be a JSON object.
pub(super) fn kwargs(json: &[u8], max: u64) -> Result<Kwargs> {
    if json.len() as u64 > max {
        return Err(Error::InvalidArgument(format!(
            "kwargs are {} bytes, over this server's limit of {max} (--max-kwargs-bytes); send large inputs as the payload",
            json.len()
        )));
    }
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(Kwargs::new());
    }
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Error::InvalidArgument(format!(
            "kwargs must be a JSON object, got {}",
            match other {
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                _ => "null",
            }
        ))),
        Err(e) => Err(Error::InvalidArgument(format!("kwargs are not valid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeaderLimits = HeaderLimits { max_kwargs_bytes: 64, max_payload_bytes: 1000 };

    fn header(func: &str) -> proto::Header {
        proto::Header { func: func.into(), ..Default::default() }
    }

    #[test]
    fn function_comes_from_metadata_or_header_or_defaults_to_chaos() {
        assert_eq!(request(Some("echo"), None, &mut header(""), LIMITS).expect("meta").func, "echo");
        assert_eq!(request(None, None, &mut header("sha256"), LIMITS).expect("header").func, "sha256");
        assert_eq!(request(Some("echo"), None, &mut header("echo"), LIMITS).expect("both").func, "echo");
        assert_eq!(request(None, None, &mut header(""), LIMITS).expect("neither").func, "chaos");
        let e = request(Some("echo"), None, &mut header("sleep"), LIMITS).expect_err("disagree");
        assert!(matches!(e, Error::InvalidArgument(m) if m.contains("x-func-name")));
    }

    #[test]
    fn kwargs_must_be_a_small_json_object() {
        assert!(kwargs(b"", 10).expect("empty").is_empty());
        assert_eq!(kwargs(br#"{"a":1}"#, 10).expect("object")["a"], 1);
        for bad in [&b"[1]"[..], b"\"s\"", b"{nope", b"null"] {
            assert!(matches!(kwargs(bad, 64), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
        let e = kwargs(br#"{"a":"0123456789"}"#, 10).expect_err("too large");
        assert!(e.to_string().contains("over this server's limit"));
    }

    #[test]
    fn oversized_declared_payload_and_unknown_encoding_are_refused() {
        let mut h = header("echo");
        h.payload_size = Some(1001);
        assert_eq!(
            request(None, None, &mut h, LIMITS).expect_err("big").code(),
            crate::code::ErrorCode::ResourceExhausted
        );
        let mut h = header("echo");
        h.encoding = 7;
        assert!(matches!(request(None, None, &mut h, LIMITS), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout("7u"), Some(Duration::from_micros(7)));
        for bad in ["", "m", "12", "1x", "123456789S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retained_and_resumed_calls_need_long_call_ids() {
        let mut h = header("echo");
        h.retain_seconds = Some(60);
        h.call_id = "short-id".into();
        let e = request(None, None, &mut h.clone(), LIMITS).expect_err("short");
        assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("at least 16")), "{e}");
        h.call_id = "0123456789abcdef".into();
        let r = request(None, None, &mut h.clone(), LIMITS).expect("long enough");
        assert_eq!(r.retain, Some(std::time::Duration::from_secs(60)));
        h.retain_seconds = Some(0);
        h.call_id = "x".into();
        assert_eq!(request(None, None, &mut h.clone(), LIMITS).expect("0 = not retained").retain, None);
        h.resume_from = Some(5);
        assert!(request(None, None, &mut h, LIMITS).is_err(), "a resume names its call with a long id too");
    }

    #[test]
    fn call_ids_that_could_forge_a_log_line_are_refused() {
        for bad in ["a\nINFO forged", "tab\there", "space here", "é-accent", "nul\0"] {
            let mut h = header("echo");
            h.call_id = bad.into();
            let e = request(None, None, &mut h, LIMITS).expect_err(bad);
            assert!(e.to_string().contains("printable ASCII"), "{bad:?}: {e}");
        }
        let mut h = header("echo");
        h.call_id = "ok-123_ABC.x:y/z".into();
        assert_eq!(request(None, None, &mut h, LIMITS).expect("printable").call_id, "ok-123_ABC.x:y/z");
    }

    #[test]
    fn call_id_comes_from_header_then_metadata() {
        let mut h = header("echo");
        assert_eq!(request(None, Some("m-1"), &mut h.clone(), LIMITS).expect("meta").call_id, "m-1");
        h.call_id = "h-1".into();
        assert_eq!(request(None, Some("m-1"), &mut h, LIMITS).expect("header").call_id, "h-1");
    }
}
