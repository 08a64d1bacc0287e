// Validates objects of the third-party kinds the operator emits (a JSON
// array per argument file) against their projects' schemas, as compiled by
// kubernetes-models-ts: PodMonitor (prometheus-operator), BackendTLSPolicy
// (Gateway API v1) and the documented KEDA ScaledObject. Exits 1 naming
// each error.
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { BackendTLSPolicy } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/BackendTLSPolicy";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const models = { PodMonitor, BackendTLSPolicy, ScaledObject };
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of JSON.parse(readFileSync(file, "utf8"))) {
    const name = `${file}: ${doc?.kind} ${doc?.metadata?.name}`;
    const Model = models[doc?.kind];
    if (!Model) {
      console.log(`${name}: INVALID: no schema for this kind here`);
      failed = 1;
      continue;
    }
    try {
      new Model(doc).validate();
      console.log(`${name}: valid`);
    } catch (e) {
      console.log(`${name}: INVALID: ${e.message}`);
      failed = 1;
    }
  }
}
process.exit(failed);
