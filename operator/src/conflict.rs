//! Who holds an upstream when several AIPods in a namespace claim it: the
//! oldest (then the first by name) keeps it; the others get no route.

use std::cmp::Ordering;

use crate::crd::AIPod;

/// The order in which claims count: oldest first, then by name.
pub fn claim_order(a: &AIPod, b: &AIPod) -> Ordering {
    let created = |x: &AIPod| x.metadata.creation_timestamp.as_ref().map(|t| t.0);
    created(a).cmp(&created(b)).then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

/// The AIPod among `aipods` that holds `upstream`; deleted ones do not count.
pub fn holder<'a>(aipods: &'a [AIPod], upstream: &str) -> Option<&'a AIPod> {
    aipods
        .iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none() && a.upstream() == upstream)
        .min_by(|a, b| claim_order(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::AIPodSpec;
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    fn pod(name: &str, upstream: Option<&str>, created_s: i64) -> AIPod {
        let mut a = AIPod::new(
            name,
            AIPodSpec { image: Some("img".into()), upstream: upstream.map(Into::into), ..Default::default() },
        );
        a.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created_s).expect("time")));
        a
    }

    #[test]
    fn the_oldest_claim_wins_then_the_name() {
        let pods = [
            pod("b", Some("shared"), 20),
            pod("a", Some("shared"), 10),
            pod("c", None, 5),
            pod("d", Some("shared"), 10),
        ];
        assert_eq!(holder(&pods, "shared").and_then(|p| p.metadata.name.as_deref()), Some("a"));
        assert_eq!(holder(&pods, "c").and_then(|p| p.metadata.name.as_deref()), Some("c"));
        assert!(holder(&pods, "nobody").is_none());
    }

    #[test]
    fn a_deleted_holder_releases_the_upstream() {
        let mut old = pod("old", Some("u"), 1);
        old.metadata.deletion_timestamp = old.metadata.creation_timestamp.clone();
        let pods = [old, pod("new", Some("u"), 2)];
        assert_eq!(holder(&pods, "u").and_then(|p| p.metadata.name.as_deref()), Some("new"));
    }
}
