//! AIPod → GRPCRoute: one rule matching service `ai.AI` and header
//! `x-upstream` exactly, sending to the AIPod's Service.

use gateway_api::apis::standard::grpcroutes::{
    GrpcRoute, GrpcRouteParentRefs, GrpcRouteRules, GrpcRouteRulesBackendRefs, GrpcRouteRulesMatches,
    GrpcRouteRulesMatchesHeaders, GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethod,
    GrpcRouteRulesMatchesMethodType, GrpcRouteSpec,
};

use crate::{Result, crd::AIPod, labels, service};

/// The GRPCRoute for `aipod`, or `None` when it asks for no Gateway route.
pub fn grpc_route(aipod: &AIPod) -> Result<Option<GrpcRoute>> {
    let Some(gateway) = aipod.spec.route.as_ref().and_then(|r| r.gateway.as_ref()) else {
        return Ok(None);
    };
    let name = crate::name(aipod)?;
    let parent_refs = gateway
        .parent_refs
        .iter()
        .map(|p| GrpcRouteParentRefs {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            section_name: p.section_name.clone(),
            port: p.port,
            ..Default::default()
        })
        .collect();
    let rule = GrpcRouteRules {
        matches: Some(vec![GrpcRouteRulesMatches {
            method: Some(GrpcRouteRulesMatchesMethod {
                r#type: Some(GrpcRouteRulesMatchesMethodType::Exact),
                service: Some(aipod::contract::SERVICE_NAME.to_owned()),
                method: None,
            }),
            headers: Some(vec![GrpcRouteRulesMatchesHeaders {
                r#type: Some(GrpcRouteRulesMatchesHeadersType::Exact),
                name: aipod::contract::UPSTREAM_KEY.to_owned(),
                value: aipod.upstream(),
            }]),
        }]),
        backend_refs: Some(vec![GrpcRouteRulesBackendRefs {
            name: name.to_owned(),
            port: Some(service::port(aipod)),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Ok(Some(GrpcRoute {
        metadata: crate::child_meta(aipod, name, labels::labels(aipod, name))?,
        spec: GrpcRouteSpec {
            parent_refs: Some(parent_refs),
            hostnames: (!gateway.hostnames.is_empty()).then(|| gateway.hostnames.clone()),
            rules: Some(vec![rule]),
        },
        status: None,
    }))
}
