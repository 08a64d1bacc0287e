//! Leader election on a `coordination.k8s.io/v1` Lease, so the operator can
//! run as two replicas: only the leader reconciles and writes; a follower
//! takes over within the lease duration after the leader stops renewing; a
//! leader that cannot renew within its renew deadline steps down at once
//! (the caller drops the controller and exits non-zero, to restart as a
//! follower).
//!
//! The algorithm is client-go's (`leaderelection` with a `LeaseLock`): read
//! the Lease, decide ([`decide`], pure), and write with optimistic
//! concurrency — the Lease's `resourceVersion` makes two writers conflict,
//! so exactly one wins. The renew deadline (10 s) is shorter than the lease
//! duration (15 s): a leader cut off from the API server stops writing
//! before anyone else may start.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;

use crate::{Error, Result};

/// How the election runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease holds after its last renewal.
    pub lease: Duration,
    /// How long a leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often the Lease is read (followers) or renewed (the leader).
    pub retry: Duration,
}

impl Default for Timing {
    /// client-go's defaults.
    fn default() -> Self {
        Self { lease: Duration::from_secs(15), renew_deadline: Duration::from_secs(10), retry: Duration::from_secs(2) }
    }
}

/// What to do with the Lease as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take it: nobody holds it, or the holder let it expire.
    Acquire,
    /// Renew it: we hold it.
    Renew,
    /// Leave it: `holder` holds it, for `for_at_least` more.
    Follow {
        /// Who holds it.
        holder: String,
        /// The time left before it expires.
        for_at_least: Duration,
    },
}

/// What `me` does at `now` with a Lease whose spec is `spec` (`None`: no
/// Lease yet). An expired Lease counts from its renew time plus its
/// duration.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Step {
    let holder = spec.and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty());
    let Some(holder) = holder else { return Step::Acquire };
    if holder == me {
        return Step::Renew;
    }
    let spec = spec.expect("a holder comes from a spec");
    let (Some(renewed), Some(seconds)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds) else {
        // A holder that never said when it renewed or for how long holds
        // nothing.
        return Step::Acquire;
    };
    let Ok(expires) = renewed.0.checked_add(SignedDuration::from_secs(i64::from(seconds.max(0)))) else {
        return Step::Acquire;
    };
    match expires.duration_since(now) {
        left if left.is_positive() => {
            Step::Follow { holder: holder.to_owned(), for_at_least: Duration::try_from(left).unwrap_or_default() }
        }
        _ => Step::Acquire,
    }
}

/// One operator instance's part in the election.
pub struct Election {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
}

impl Election {
    /// Competes for Lease `name` in `namespace` as `identity` (the pod's
    /// name: unique among the replicas).
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timing: Timing) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.to_owned(), identity: identity.to_owned(), timing }
    }

    /// Runs the election, telling `leading` whether this instance leads.
    /// Returns only when a leader lost its Lease — another holds it, or no
    /// renewal went through within the renew deadline — with
    /// [`Error::LeaseLost`]: the caller must stop writing at once.
    pub async fn run(&self, leading: &watch::Sender<bool>) -> Error {
        let mut renewed: Option<Instant> = None;
        loop {
            let attempt = tokio::time::timeout(self.timing.retry, self.try_once()).await;
            let leads = *leading.borrow();
            match attempt {
                Ok(Ok(true)) => {
                    renewed = Some(Instant::now());
                    if !leads {
                        tracing::info!(identity = self.identity, lease = self.name, "became the leader");
                        leading.send_replace(true);
                    }
                }
                Ok(Ok(false)) if leads => {
                    return Error::LeaseLost(format!("Lease {} is held by another instance", self.name));
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(identity = self.identity, error = %e, "Lease {} could not be read or renewed", self.name);
                }
                Err(_) => {
                    tracing::warn!(identity = self.identity, "Lease {}: the API server did not answer", self.name)
                }
            }
            if leads && renewed.is_none_or(|at| at.elapsed() >= self.timing.renew_deadline) {
                return Error::LeaseLost(format!(
                    "Lease {} not renewed within the renew deadline of {}s",
                    self.name,
                    self.timing.renew_deadline.as_secs()
                ));
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Runs `work` once this instance leads, for as long as it leads:
    /// `Ok` when `work` ends by itself, [`Error::LeaseLost`] when the Lease
    /// is lost — `work` is dropped at that instant, so nothing it does
    /// writes after. `on_lead` hears when leadership starts.
    pub async fn lead(&self, work: impl Future<Output = ()>, on_lead: impl FnOnce()) -> Result<()> {
        let (leading, mut led) = watch::channel(false);
        let work = async move {
            if led.wait_for(|leads| *leads).await.is_ok() {
                on_lead();
                work.await;
            }
        };
        tokio::select! {
            lost = self.run(&leading) => Err(lost),
            () = work => Ok(()),
        }
    }

    /// Reads the Lease and takes or renews it when [`decide`] says so;
    /// whether this instance holds it afterwards.
    async fn try_once(&self) -> Result<bool> {
        let current = self.api.get_opt(&self.name).await?;
        self.claim(current).await
    }

    /// Takes or renews the Lease as it was read (`current`), when
    /// [`decide`] says so; whether this instance holds it afterwards.
    async fn claim(&self, current: Option<Lease>) -> Result<bool> {
        let now = Timestamp::now();
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let step = decide(spec, &self.identity, now);
        let renewing = match step {
            Step::Follow { .. } => return Ok(false),
            Step::Renew => true,
            Step::Acquire => false,
        };
        let old = spec.cloned().unwrap_or_default();
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease.as_secs().try_into().unwrap_or(i32::MAX)),
            renew_time: Some(MicroTime(now)),
            acquire_time: if renewing { old.acquire_time.clone() } else { Some(MicroTime(now)) },
            lease_transitions: Some(old.lease_transitions.unwrap_or(0) + i32::from(!renewing)),
            ..old
        };
        let written = match current {
            // The resourceVersion read above makes a concurrent writer
            // conflict: exactly one of two candidates wins.
            Some(lease) => {
                self.api.replace(&self.name, &PostParams::default(), &Lease { spec: Some(spec), ..lease }).await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the Lease up (a graceful stop), so a follower takes over at
    /// once instead of after the lease duration. Best effort.
    pub async fn release(&self) {
        let Ok(Some(lease)) = self.api.get_opt(&self.name).await else { return };
        let ours = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.identity.as_str());
        if !ours {
            return;
        }
        let spec = LeaseSpec { holder_identity: None, ..lease.spec.clone().unwrap_or_default() };
        match self.api.replace(&self.name, &PostParams::default(), &Lease { spec: Some(spec), ..lease }).await {
            Ok(_) => tracing::info!(identity = self.identity, "released the leader Lease"),
            Err(e) => tracing::warn!(error = %e, "could not release the leader Lease; it expires by itself"),
        }
    }
}

#[cfg(test)]
mod election_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_s: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_s).expect("time"))),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("time")
    }

    #[test]
    fn who_takes_renews_or_follows() {
        assert_eq!(decide(None, "a", at(100)), Step::Acquire, "no Lease yet");
        assert_eq!(decide(Some(&spec(None, 90, 15)), "a", at(100)), Step::Acquire, "released");
        assert_eq!(decide(Some(&spec(Some(""), 90, 15)), "a", at(100)), Step::Acquire, "released (empty)");
        assert_eq!(decide(Some(&spec(Some("a"), 0, 15)), "a", at(100)), Step::Renew, "ours, even if late");
        assert_eq!(
            decide(Some(&spec(Some("b"), 90, 15)), "a", at(100)),
            Step::Follow { holder: "b".into(), for_at_least: Duration::from_secs(5) }
        );
        assert_eq!(decide(Some(&spec(Some("b"), 85, 15)), "a", at(100)), Step::Acquire, "expired exactly now");
        assert_eq!(decide(Some(&spec(Some("b"), 10, 15)), "a", at(100)), Step::Acquire, "long expired");
        let vague = LeaseSpec { holder_identity: Some("b".into()), ..Default::default() };
        assert_eq!(decide(Some(&vague), "a", at(100)), Step::Acquire, "a holder with no renew time");
    }

    #[test]
    fn the_renew_deadline_ends_leadership_before_anyone_may_take_over() {
        let t = Timing::default();
        // Worst case: the last attempt before the deadline fails at once,
        // the next one hangs for its whole timeout (one retry period).
        assert!(t.renew_deadline + 2 * t.retry < t.lease, "a cut-off leader stops before the Lease expires: {t:?}");
    }
}
