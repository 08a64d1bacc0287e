// Validates PodMonitors (JSON, one document per argument file) against
// prometheus-operator's monitoring.coreos.com/v1 schema, as compiled by
// @kubernetes-models/prometheus-operator. Exits 1 naming the first error.
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";

let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of JSON.parse(readFileSync(file, "utf8"))) {
    const name = `${file}: PodMonitor ${doc?.metadata?.name}`;
    try {
      new PodMonitor(doc).validate();
      console.log(`${name}: valid`);
    } catch (e) {
      console.log(`${name}: INVALID: ${e.message}`);
      failed = 1;
    }
  }
}
process.exit(failed);
