//! The decision function on generated traces with a simulated clock and
//! ReplicaSet, and its inputs: the policy from a spec, the runtime's
//! metrics, the deletion costs.

use std::time::Duration;

use serde_json::json;

use super::simulation::{Rng, run};
use super::*;

fn policy(min: u32, max: u32, target: u32) -> Policy {
    Policy {
        min,
        max,
        target,
        scale_up_delay: Duration::ZERO,
        scale_down_delay: DEFAULT_SCALE_DOWN_DELAY,
        interval: DEFAULT_INTERVAL,
    }
}

#[test]
fn a_ramp_from_one_pod_reaches_the_pods_its_load_asks_for_within_an_interval_of_each_step() {
    // 1 → 8 pods' worth of hour-long calls, one more pod's worth (16
    // calls) every two minutes; new pods take 20 s to start.
    let p = policy(1, 10, 16);
    let (cluster, _) = run(&p, 1, Duration::from_secs(20), 20 * 60, |s, _| {
        if s % 120 == 0 && s / 120 < 8 { vec![Duration::from_secs(3600); 16] } else { Vec::new() }
    });
    let r = &cluster.report;
    // Each step of load is answered at the next reading (5 s).
    for step in 1..8u64 {
        let at = step * 120;
        let reached = r.changes.iter().find(|(_, n)| u64::from(*n) > step).map(|(t, _)| *t);
        assert!(
            reached.is_some_and(|t| t >= at && t <= at + 5),
            "{} pods for {} calls: reached at {reached:?} s, asked at {at} s; {:?}",
            step + 1,
            (step + 1) * 16,
            r.changes
        );
    }
    assert_eq!(cluster.replicas(), 8, "{:?}", r.changes);
    assert_eq!((r.removed, r.cut), (0, 0));
}

#[test]
fn a_load_twice_what_the_pods_hold_scales_up_at_once_despite_the_delay() {
    let mut p = policy(1, 20, 10);
    p.scale_up_delay = Duration::from_secs(120);
    // 25 calls on 1 pod of 10: 2.5× — a panic: up at the first reading.
    let (cluster, _) =
        run(
            &p,
            1,
            Duration::from_secs(10),
            30,
            |s, _| {
                if s == 0 { vec![Duration::from_secs(3600); 25] } else { Vec::new() }
            },
        );
    assert_eq!(cluster.report.changes, vec![(0, 3)]);
    assert_eq!(cluster.report.decisions[0], "ScaledUpPanic");
    // 15 calls on 1 pod of 10 (1.5×): the delay holds for 120 s.
    let (cluster, _) =
        run(
            &p,
            1,
            Duration::from_secs(10),
            200,
            |s, _| {
                if s == 0 { vec![Duration::from_secs(3600); 15] } else { Vec::new() }
            },
        );
    assert_eq!(cluster.report.changes, vec![(120, 2)], "{:?}", cluster.report.decisions);
}

#[test]
fn an_oscillating_load_does_not_flap() {
    // Every 2 minutes the load swings between 2 and 6 pods' worth of
    // 90-second calls: the pods follow it up, and never down, because
    // some reading within 5 minutes always asked for 6.
    let p = policy(1, 10, 16);
    let (cluster, _) = run(&p, 1, Duration::from_secs(15), 60 * 60, |s, c| {
        let want: usize = if (s / 120) % 2 == 0 { 6 * 16 } else { 2 * 16 };
        let missing = want.saturating_sub(c.calls());
        if s % 5 == 0 { vec![Duration::from_secs(90); missing] } else { Vec::new() }
    });
    let r = &cluster.report;
    assert!(r.changes.len() <= 2, "flapped: {:?}", r.changes);
    assert_eq!(cluster.replicas(), 6, "{:?}", r.changes);
    assert_eq!(r.removed, 0);
}

#[test]
fn an_hour_of_long_calls_scaled_down_again_and_again_removes_only_idle_pods() {
    // Bursts of calls of 1 to 15 minutes, with quiet stretches between,
    // for two hours: the pods grow and shrink again and again, and no pod
    // the ReplicaSet deletes holds a call.
    let mut p = policy(1, 12, 8);
    p.scale_down_delay = Duration::from_secs(120);
    let mut rng = Rng::new(7);
    let (cluster, _) = run(&p, 1, Duration::from_secs(20), 2 * 3600, |s, _| {
        // Each half hour: 10 minutes of a call every ~8 s, then 20 quiet
        // minutes with a call every ~2 minutes.
        let busy = s % 1800 < 600;
        let arrives = if busy { rng.below(8) == 0 } else { rng.below(120) == 0 };
        if arrives { vec![Duration::from_secs(60 + rng.below(14 * 60))] } else { Vec::new() }
    });
    let r = &cluster.report;
    let downs = r.decisions.iter().filter(|d| **d == "ScaledDown").count();
    let ups = r.decisions.iter().filter(|d| d.starts_with("ScaledUp")).count();
    assert!(downs >= 3 && ups >= 3, "the trace should scale both ways often: {downs} down, {ups} up; {:?}", r.changes);
    assert!(r.removed >= 5, "pods removed: {}", r.removed);
    assert_eq!(r.cut, 0, "calls on removed pods");
    assert!(r.decisions.contains(&"ScaleDownDeferred"), "long calls kept every pod busy at some point");
}

#[test]
fn missing_readings_never_scale_down() {
    // 4 pods, no load at all, one pod's metrics unreadable throughout.
    let mut p = policy(1, 10, 16);
    p.scale_down_delay = Duration::from_secs(30);
    let (cluster, _) = run(&p, 4, Duration::from_secs(5), 600, |s, c| {
        let _ = (s, c);
        Vec::new()
    });
    assert_eq!(cluster.replicas(), 1, "readable, the idle pods go: {:?}", cluster.report.changes);

    let start = tokio::time::Instant::now();
    let mut cluster = super::simulation::Cluster::new(4, start, Duration::ZERO);
    cluster.unreadable = 1;
    let mut autoscale = Autoscale::default();
    for second in (0..600).step_by(5) {
        let now = start + Duration::from_secs(second);
        let sample = cluster.sample(now);
        let decision = autoscale.decide(&p, cluster.replicas(), &sample, now);
        assert_eq!(decision, Decision::Hold(Hold::Unsettled), "at {second} s");
        cluster.apply(now, &decision, &sample);
        cluster.step(now);
    }
    // Readable again: the delay starts over from there.
    cluster.unreadable = 0;
    let now = start + Duration::from_secs(600);
    let sample = cluster.sample(now);
    assert_eq!(autoscale.decide(&p, 4, &sample, now), Decision::Hold(Hold::WaitingToScaleDown));
}

#[test]
fn scale_down_takes_only_idle_pods_and_waits_when_none_is() {
    let mut p = policy(1, 10, 16);
    p.scale_down_delay = Duration::ZERO;
    let pods = |loads: &[u64]| Sample {
        pods: loads
            .iter()
            .enumerate()
            .map(|(i, n)| PodLoad { name: format!("p{i}"), in_flight: *n, queued: 0 })
            .collect(),
        ..Sample::default()
    };
    let now = tokio::time::Instant::now();
    // 3 calls want 1 pod of 4; two are idle: only those go.
    let sample = pods(&[1, 0, 2, 0]);
    let decision = Autoscale::default().decide(&p, 4, &sample, now);
    assert_eq!(decision, Decision::Down { to: 2, remove: vec!["p1".into(), "p3".into()] });
    let Decision::Down { remove, .. } = &decision else { unreachable!() };
    let costs = deletion_costs(&sample, remove);
    assert_eq!(costs, vec![("p0".into(), 1), ("p1".into(), CHOSEN_COST), ("p2".into(), 2), ("p3".into(), CHOSEN_COST)]);
    // Every pod busy: deferred.
    assert_eq!(Autoscale::default().decide(&p, 4, &pods(&[1, 1, 1, 1]), now), Decision::Deferred { wanted: 1 });
    // Above maxReplicas: down to it at once, by idle pods only.
    let p2 = policy(1, 2, 16);
    let decision = Autoscale::default().decide(&p2, 4, &pods(&[5, 0, 0, 0]), now);
    assert_eq!(decision, Decision::Down { to: 2, remove: vec!["p1".into(), "p2".into()] });
    // Below minReplicas: up at once.
    assert_eq!(
        Autoscale::default().decide(&policy(3, 5, 16), 1, &pods(&[0]), now),
        Decision::Up { to: 3, panic: false }
    );
}

fn aipod(autoscaling: serde_json::Value) -> AIPod {
    crate::fixtures::aipod("m").spec(json!({"autoscaling": autoscaling})).build()
}

#[test]
fn the_policy_comes_from_the_spec_and_bad_values_name_their_field() {
    let p = Policy::of(&aipod(json!({"maxReplicas": 5}))).expect("valid").expect("set");
    assert_eq!(
        p,
        Policy {
            min: 1,
            max: 5,
            target: 16,
            scale_up_delay: Duration::ZERO,
            scale_down_delay: Duration::from_secs(300),
            interval: Duration::from_secs(5)
        }
    );
    let mut with_limit = aipod(json!({"maxReplicas": 5, "scaleDownDelay": "10m", "interval": "2s"}));
    with_limit.spec.runtime.max_concurrent_calls = Some(4);
    let p = Policy::of(&with_limit).expect("valid").expect("set");
    assert_eq!((p.target, p.scale_down_delay, p.interval), (4, Duration::from_secs(600), Duration::from_secs(2)));
    assert_eq!(Policy::of(&crate::fixtures::aipod("m").build()), Ok(None));
    for (spec, field) in [
        (json!({"minReplicas": 4, "maxReplicas": 2}), "spec.autoscaling.minReplicas (4) is greater than"),
        (json!({"minReplicas": 0, "maxReplicas": 2}), "spec.autoscaling.minReplicas is 0"),
        (json!({"maxReplicas": -1}), "spec.autoscaling.maxReplicas is -1"),
        (json!({"maxReplicas": 2, "targetCallsPerPod": 0}), "spec.autoscaling.targetCallsPerPod is 0"),
        (json!({"maxReplicas": 2, "scaleDownDelay": "soon"}), "spec.autoscaling.scaleDownDelay"),
        (json!({"maxReplicas": 2, "interval": "10ms"}), "spec.autoscaling.interval"),
    ] {
        let err = Policy::of(&aipod(spec.clone())).expect_err(&spec.to_string());
        assert!(err.starts_with(field), "{spec}: {err}");
    }
}

#[test]
fn the_calls_are_summed_over_versions_from_the_runtime_metrics() {
    let text = "# HELP aipod_calls_in_flight Calls held now, from their header on.\n\
                # TYPE aipod_calls_in_flight gauge\n\
                aipod_calls_in_flight{version=\"v1\"} 3\n\
                aipod_calls_in_flight{version=\"v2\"} 4\n\
                aipod_calls_queued{version=\"v1\"} 1\n\
                aipod_calls_queued_total 99\n\
                aipod_calls_total{version=\"v1\",code=\"OK\"} 12\n";
    assert_eq!(read_metrics(text), Ok((7, 1)));
    assert_eq!(read_metrics(""), Ok((0, 0)));
    assert!(read_metrics("aipod_calls_in_flight{version=\"v1\"} lots\n").is_err());
    assert!(read_metrics("aipod_calls_in_flight -1\n").is_err());
}
