//! Two operator instances against one in-memory API server (kube-fake-client,
//! which enforces `resourceVersion` on updates): exactly one writes, a
//! stopped leader is replaced within the lease duration, and a leader whose
//! renewals are refused stops writing before anyone else starts.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client, api::PostParams, client::Body};

use super::*;

const NS: &str = "aipod-system";

/// Short times, so a takeover happens in seconds.
const TIMING: Timing = Timing {
    lease: Duration::from_millis(2400),
    renew_deadline: Duration::from_millis(1500),
    retry: Duration::from_millis(200),
};

/// One operator instance's view of the API server: every request it sends
/// is counted (writes apart), and can be refused from a moment on.
#[derive(Clone)]
struct Instance {
    shared: Client,
    writes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    refused: Arc<AtomicBool>,
}

impl tower_service::Service<http::Request<Body>> for Instance {
    type Response = http::Response<Body>;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = kube::Result<http::Response<Body>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<kube::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if request.method() != http::Method::GET {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        let (shared, refused) = (self.shared.clone(), self.refused.load(Ordering::SeqCst));
        Box::pin(async move {
            if refused {
                return Err(kube::Error::Service("the API server refuses this instance".into()));
            }
            shared.send(request).await
        })
    }
}

impl Instance {
    fn new(shared: &Client) -> Self {
        Self { shared: shared.clone(), writes: Arc::default(), requests: Arc::default(), refused: Arc::default() }
    }

    fn client(&self) -> Client {
        Client::new(self.clone(), NS)
    }

    fn election(&self, identity: &str) -> Election {
        Election::new(self.client(), NS, "aipod-operator", identity, TIMING)
    }
}

async fn api_server() -> Client {
    kube_fake_client::ClientBuilder::new().build().await.expect("fake API server")
}

/// What a leader does: writes a ConfigMap again and again, noting when.
async fn write_forever(client: Client, name: &'static str, log: WriteLog) {
    let api = Api::<ConfigMap>::namespaced(client, NS);
    loop {
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta { name: Some(format!("written-by-{name}")), ..Default::default() },
            ..Default::default()
        };
        let _ = api.delete(&format!("written-by-{name}"), &Default::default()).await;
        if api.create(&PostParams::default(), &cm).await.is_ok() {
            log.lock().expect("log").push((name, Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Who wrote when.
type WriteLog = Arc<Mutex<Vec<(&'static str, Instant)>>>;

/// An API server and two operator instances on it, with an empty write log.
async fn two_instances() -> (Client, Instance, Instance, WriteLog) {
    let server = api_server().await;
    let (a, b) = (Instance::new(&server), Instance::new(&server));
    (server, a, b, WriteLog::default())
}

fn writes_by(log: &Mutex<Vec<(&'static str, Instant)>>, name: &str) -> Vec<Instant> {
    log.lock().expect("log").iter().filter(|(n, _)| *n == name).map(|(_, at)| *at).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_two_instances_leads_and_writes() {
    let (server, a, b, log) = two_instances().await;
    let (ea, eb) = (a.election("a"), b.election("b"));
    let run_a = ea.lead(write_forever(a.client(), "a", Arc::clone(&log)), || {});
    let run_b = eb.lead(write_forever(b.client(), "b", Arc::clone(&log)), || {});
    let _ = tokio::time::timeout(Duration::from_secs(3), async { tokio::join!(run_a, run_b) }).await;
    let (wa, wb) = (writes_by(&log, "a").len(), writes_by(&log, "b").len());
    assert!((wa > 0) != (wb > 0), "exactly one leader writes: a wrote {wa} times, b {wb}");
    let lease = Api::<Lease>::namespaced(server, NS).get("aipod-operator").await.expect("the Lease");
    let holder = lease.spec.and_then(|s| s.holder_identity).expect("a holder");
    assert_eq!(holder, if wa > 0 { "a" } else { "b" });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_over_within_the_lease_duration_when_the_leader_stops() {
    let (_server, a, b, log) = two_instances().await;
    let ea = a.election("a");
    // a leads alone first.
    let leading = {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let lead_a = ea.lead(write_forever(a.client(), "a", Arc::clone(&log)), move || {
            let _ = tx.send(());
        });
        tokio::select! {
            _ = lead_a => panic!("a stopped leading"),
            _ = &mut rx => {}
        }
        // The leader crashes: its future is gone, the Lease is not released.
        Instant::now()
    };
    let stopped = writes_by(&log, "a").last().copied().unwrap_or(leading);
    let eb = b.election("b");
    let _ = tokio::time::timeout(
        TIMING.lease + Duration::from_secs(2),
        eb.lead(write_forever(b.client(), "b", Arc::clone(&log)), || {}),
    )
    .await;
    let first_b = *writes_by(&log, "b").first().expect("b took over");
    let gap = first_b.duration_since(stopped);
    assert!(gap <= TIMING.lease + 2 * TIMING.retry + Duration::from_millis(300), "b took over after {gap:?}");
    assert!(gap >= TIMING.lease / 2, "b waited for the Lease to expire ({gap:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewals_are_refused_stops_writing_before_the_follower_starts() {
    let (_server, a, b, log) = two_instances().await;
    let (ea, eb) = (a.election("a"), b.election("b"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let lead_a = tokio::spawn({
        let (client, log) = (a.client(), Arc::clone(&log));
        async move {
            let lost = ea.lead(write_forever(client, "a", log), || {}).await;
            let _ = tx.send(Instant::now());
            lost
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!writes_by(&log, "a").is_empty(), "a leads");
    let follower = tokio::spawn({
        let (client, log) = (b.client(), Arc::clone(&log));
        async move { eb.lead(write_forever(client, "b", log), || {}).await }
    });
    // The API server stops answering a (a partition, a revoked token).
    let cut = Instant::now();
    a.refused.store(true, Ordering::SeqCst);
    let lost_at = rx.await.expect("a's election ended");
    let lost = lead_a.await.expect("join").expect_err("a lost the Lease");
    assert!(matches!(lost, Error::LeaseLost(_)), "{lost}");
    let took = lost_at.duration_since(cut);
    assert!(
        took <= TIMING.renew_deadline + 2 * TIMING.retry + Duration::from_millis(300),
        "stepped down after {took:?}"
    );
    let requests_at_loss = a.requests.load(Ordering::SeqCst);
    tokio::time::sleep(TIMING.lease + Duration::from_secs(1)).await;
    assert_eq!(a.requests.load(Ordering::SeqCst), requests_at_loss, "nothing at all from a after it stepped down");
    let first_b = *writes_by(&log, "b").first().expect("b took over");
    assert!(first_b > lost_at, "b wrote only after a had stopped");
    follower.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_at_once() {
    let server = api_server().await;
    let (a, b) = (Instance::new(&server), Instance::new(&server));
    let ea = a.election("a");
    let leading = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&leading);
    let _ = tokio::time::timeout(
        Duration::from_millis(600),
        ea.lead(std::future::pending(), move || {
            flag.store(true, Ordering::SeqCst);
        }),
    )
    .await;
    assert!(leading.load(Ordering::SeqCst));
    ea.release().await;
    let started = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let eb = b.election("b");
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        eb.lead(std::future::pending(), move || {
            let _ = tx.send(Instant::now());
        }),
    )
    .await;
    let led = rx.await.expect("b leads").duration_since(started);
    assert!(led < TIMING.lease / 2, "a released Lease is taken without waiting for it to expire: {led:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_candidates_that_read_the_same_expired_lease_only_the_first_write_wins() {
    let server = api_server().await;
    let (a, b, old) = (Instance::new(&server), Instance::new(&server), Instance::new(&server));
    // A leader that stopped long ago.
    let stale = LeaseSpec {
        holder_identity: Some("old".into()),
        renew_time: Some(MicroTime(Timestamp::now().checked_sub(SignedDuration::from_secs(60)).expect("time"))),
        lease_duration_seconds: Some(15),
        ..Default::default()
    };
    let lease =
        Lease { metadata: ObjectMeta { name: Some("aipod-operator".into()), ..Default::default() }, spec: Some(stale) };
    Api::<Lease>::namespaced(old.client(), NS).create(&PostParams::default(), &lease).await.expect("old Lease");
    let (ea, eb) = (a.election("a"), b.election("b"));
    // Both read it expired...
    let seen_by_a = ea.api.get_opt("aipod-operator").await.expect("read");
    let seen_by_b = eb.api.get_opt("aipod-operator").await.expect("read");
    // ...b writes first; a's write carries the resourceVersion it read.
    assert!(eb.claim(seen_by_b).await.expect("b claims"), "b takes the expired Lease");
    assert!(!ea.claim(seen_by_a).await.expect("a claims"), "a's stale write conflicts: it does not lead");
    let holder = Api::<Lease>::namespaced(server, NS).get("aipod-operator").await.expect("Lease").spec;
    assert_eq!(holder.and_then(|s| s.holder_identity).as_deref(), Some("b"));
}
