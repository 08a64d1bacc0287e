//! Test fixtures: one builder for the AIPods every test module needs, so a
//! new spec field or default changes one place.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use serde_json::{Value, json};

use crate::crd::AIPod;

/// An AIPod under construction; [`aipod`] starts one.
#[derive(Debug, Clone)]
pub(crate) struct AIPodFixture {
    manifest: Value,
    created_s: Option<i64>,
    generation: Option<i64>,
}

/// An AIPod called `name` in namespace `default` with image `img`, the
/// rest of the spec defaulted as the API server would.
pub(crate) fn aipod(name: &str) -> AIPodFixture {
    AIPodFixture {
        manifest: json!({
            "apiVersion": "aipod.io/v1alpha1", "kind": "AIPod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"image": "img"},
        }),
        created_s: None,
        generation: None,
    }
}

impl AIPodFixture {
    /// In namespace `ns`.
    pub(crate) fn namespace(mut self, ns: &str) -> Self {
        self.manifest["metadata"]["namespace"] = json!(ns);
        self
    }

    /// With these spec fields (top-level keys replace the builder's).
    pub(crate) fn spec(mut self, fields: Value) -> Self {
        if let (Some(spec), Some(fields)) = (self.manifest["spec"].as_object_mut(), fields.as_object()) {
            spec.extend(fields.clone());
        }
        self
    }

    /// Claiming `x-upstream` value `upstream`.
    pub(crate) fn upstream(self, upstream: &str) -> Self {
        self.spec(json!({"upstream": upstream}))
    }

    /// Routed by the nginx router `router`.
    pub(crate) fn router(self, router: &str) -> Self {
        self.spec(json!({"route": {"router": router}}))
    }

    /// Routed with call affinity (after [`AIPodFixture::router`]).
    pub(crate) fn call_affinity(mut self) -> Self {
        self.manifest["spec"]["route"]["callAffinity"] = json!(true);
        self
    }

    /// Created `seconds` after the epoch (conflicts go to the oldest).
    pub(crate) fn created(mut self, seconds: i64) -> Self {
        self.created_s = Some(seconds);
        self
    }

    /// At metadata generation `generation`.
    pub(crate) fn generation(mut self, generation: i64) -> Self {
        self.generation = Some(generation);
        self
    }

    /// The AIPod as written (no uid: what a client sends).
    pub(crate) fn build(self) -> AIPod {
        let mut a: AIPod = serde_json::from_value(self.manifest).expect("a valid AIPod fixture");
        a.metadata.creation_timestamp =
            self.created_s.map(|s| Time(Timestamp::from_second(s).expect("a fixture time")));
        a.metadata.generation = self.generation;
        a
    }

    /// The AIPod as the API server hands it over: with a uid.
    pub(crate) fn stored(self) -> AIPod {
        crate::render::as_stored(self.build())
    }
}
