//! One knob for call length: an AIPod's `spec.runtime.maxCallDuration`
//! (default 1h), and every bound that derives from it so that routine
//! changes never cut a call of up to that length — the runtime's drain
//! timeout, its pods' termination grace period, and for a router the grace
//! of its pods and nginx's shutdown bound (the longest among the AIPods it
//! routes). Pure functions, tested without a cluster.

use std::time::Duration;

use crate::{Error, Result, crd::AIPod};

/// `maxCallDuration` when the spec sets none.
pub const DEFAULT_MAX_CALL_DURATION: Duration = Duration::from_secs(3600);
/// [`DEFAULT_MAX_CALL_DURATION`] as the runtime flag spells it.
pub const DEFAULT_MAX_CALL_DURATION_FLAG: &str = "1h";
/// The runtime pods' preStop pause: endpoints controllers and proxies stop
/// sending new calls before the runtime starts draining.
pub const PRE_STOP_SECONDS: i64 = 5;
/// The router pods' pause before nginx stops accepting: the same reason.
pub const ROUTER_PRE_STOP_SECONDS: i64 = 5;
/// Slack on top of a drain for the process to close its connections and
/// exit, and on top of nginx's shutdown bound for its workers to go.
pub const MARGIN_SECONDS: i64 = 5;

/// The AIPod's `spec.runtime.maxCallDuration`, or the default.
pub fn max_call_duration(aipod: &AIPod) -> Result<Duration> {
    parse(aipod.spec.runtime.max_call_duration.as_deref(), "maxCallDuration")
        .map(|d| d.unwrap_or(DEFAULT_MAX_CALL_DURATION))
}

/// The drain timeout: `spec.runtime.drainTimeout` when set, else the max
/// call duration (a drain that long lets every call finish).
pub fn drain_timeout(aipod: &AIPod) -> Result<Duration> {
    match parse(aipod.spec.runtime.drain_timeout.as_deref(), "drainTimeout")? {
        Some(drain) => Ok(drain),
        None => max_call_duration(aipod),
    }
}

/// Why the AIPod's drain would cut calls, when an explicit `drainTimeout`
/// is shorter than `maxCallDuration`: a message for the status and a
/// Warning event. `None` when every call fits the drain.
pub fn short_drain(aipod: &AIPod) -> Result<Option<String>> {
    let (drain, longest) = (drain_timeout(aipod)?, max_call_duration(aipod)?);
    Ok((drain < longest).then(|| {
        format!(
            "spec.runtime.drainTimeout {} is shorter than spec.runtime.maxCallDuration {}: a rollout, scale-down or \
             node drain cuts calls running longer than the drain",
            aipod::duration::format(drain),
            aipod::duration::format(longest)
        )
    }))
}

/// The runtime pods' `terminationGracePeriodSeconds`: the preStop pause,
/// the drain, and a margin.
pub fn runtime_grace_seconds(aipod: &AIPod) -> Result<i64> {
    Ok(PRE_STOP_SECONDS + whole_seconds(drain_timeout(aipod)?) + MARGIN_SECONDS)
}

/// The longest call a router carries: the largest `maxCallDuration` among
/// the AIPods it routes (an unparsable one counts as the default).
pub fn router_longest_call<'a>(members: impl IntoIterator<Item = &'a AIPod>) -> Duration {
    members.into_iter().map(|a| max_call_duration(a).unwrap_or(DEFAULT_MAX_CALL_DURATION)).max().unwrap_or_default()
}

/// nginx's `worker_shutdown_timeout` for a router whose longest call is
/// `longest`: old workers (after a reload or a graceful quit) finish their
/// calls within it, and no longer.
pub fn router_shutdown_bound(longest: Duration) -> Duration {
    Duration::from_secs((whole_seconds(longest) + MARGIN_SECONDS) as u64)
}

/// The router pods' `terminationGracePeriodSeconds`: the preStop pause,
/// nginx's shutdown bound, and a margin.
pub fn router_grace_seconds(longest: Duration) -> i64 {
    ROUTER_PRE_STOP_SECONDS + whole_seconds(router_shutdown_bound(longest)) + MARGIN_SECONDS
}

/// A duration rounded up to whole seconds.
pub fn whole_seconds(d: Duration) -> i64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).min(i64::MAX as u64) as i64
}

fn parse(value: Option<&str>, field: &str) -> Result<Option<Duration>> {
    value
        .map(|v| aipod::duration::parse(v).map_err(|e| Error::InvalidSpec(format!("spec.runtime.{field}: {e}"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn with(max_call: Option<&str>, drain: Option<&str>) -> AIPod {
        let mut a = fixtures::aipod("m").build();
        a.spec.runtime.max_call_duration = max_call.map(str::to_owned);
        a.spec.runtime.drain_timeout = drain.map(str::to_owned);
        a
    }

    #[test]
    fn the_drain_and_grace_follow_the_max_call_duration() {
        // (maxCallDuration, drainTimeout) → (drain s, grace s, warns)
        let table = [
            (None, None, 3600, 3600 + 10, false),
            (Some("90s"), None, 90, 100, false),
            (Some("2h"), None, 7200, 7210, false),
            (Some("10m"), Some("10m"), 600, 610, false),
            (Some("10m"), Some("20m"), 1200, 1210, false),
            (Some("10m"), Some("30s"), 30, 40, true),
            (None, Some("1.5s"), 2, 12, true),
        ];
        for (max_call, drain, drain_s, grace, warns) in table {
            let a = with(max_call, drain);
            assert_eq!(whole_seconds(drain_timeout(&a).expect("drain")), drain_s, "{max_call:?} {drain:?}");
            assert_eq!(runtime_grace_seconds(&a).expect("grace"), grace, "{max_call:?} {drain:?}");
            assert_eq!(short_drain(&a).expect("checked").is_some(), warns, "{max_call:?} {drain:?}");
        }
        let message = short_drain(&with(Some("10m"), Some("30s"))).expect("checked").expect("warns");
        assert!(message.contains("drainTimeout 30s") && message.contains("maxCallDuration 600s"), "{message}");
    }

    #[test]
    fn a_router_waits_for_the_longest_call_among_its_aipods() {
        let members = [with(Some("90s"), None), with(None, None), with(Some("20m"), Some("1m"))];
        assert_eq!(router_longest_call(&members), Duration::from_secs(3600), "the default hour is the longest");
        assert_eq!(router_longest_call(&members[..1]), Duration::from_secs(90));
        assert_eq!(router_longest_call(&[members[0].clone(), members[2].clone()]), Duration::from_secs(1200));
        assert_eq!(router_shutdown_bound(Duration::from_secs(90)), Duration::from_secs(95));
        assert_eq!(router_grace_seconds(Duration::from_secs(90)), 5 + 95 + 5);
        assert_eq!(router_grace_seconds(Duration::from_millis(89_500)), 5 + 95 + 5, "rounded up");
    }

    #[test]
    fn bad_durations_are_invalid_specs_naming_the_field() {
        let e = max_call_duration(&with(Some("soon"), None)).expect_err("bad");
        assert!(e.to_string().contains("spec.runtime.maxCallDuration"), "{e}");
        let e = drain_timeout(&with(None, Some("later"))).expect_err("bad");
        assert!(e.to_string().contains("spec.runtime.drainTimeout"), "{e}");
        assert_eq!(router_longest_call(&[with(Some("soon"), None)]), DEFAULT_MAX_CALL_DURATION);
    }
}
