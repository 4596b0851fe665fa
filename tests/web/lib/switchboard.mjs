// Starts `switchboard dev` on port 0 for one test file and stops it afterwards.
//
// The binary comes from $SWITCHBOARD_BIN, or ../../target/debug/switchboard
// relative to tests/web (build it with
// `cargo build -p switchboard-server --bin switchboard`).

import { spawn } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** tests/web */
export const WEB_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
/** The repository root. */
export const REPO_ROOT = path.resolve(WEB_DIR, "..", "..");
/** The directory that holds switchboard/v1/switchboard.proto. */
export const PROTO_DIR = path.join(REPO_ROOT, "proto", "proto");

const STDERR_KEEP = 64 * 1024;
const TAIL_LINES = 40;

export function switchboardBin() {
  const fromEnv = process.env.SWITCHBOARD_BIN;
  return fromEnv ? path.resolve(fromEnv) : path.join(REPO_ROOT, "target", "debug", "switchboard");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Every child still alive when this test process exits, or is told to stop
// (the test runner sends SIGTERM to a file's process when it is cancelled or
// its output pipe breaks), is killed, so that no server is left behind.
const live = new Set(); // {child, dir}
function killAll() {
  for (const { child, dir } of live) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
    rmSync(dir, { recursive: true, force: true });
  }
  live.clear();
}
process.on("exit", killAll);
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(signal, () => {
    killAll();
    process.kill(process.pid, signal); // the default action, now that the handler is gone
  });
}

/**
 * Runs `switchboard dev --listen 127.0.0.1:0 --credentials-file <tmp>` and
 * resolves once the credentials file holds {endpoint, user_token, admin_token}.
 *
 * Options left out are not passed, so the server's defaults apply (`--hosts 2 --max-hosts 6
 * --capacity 4 --buffer 4 --scale-down-after 20`, regions us-east-1 and eu-west-1).
 *
 * @param {{
 *   hosts?: number,          // --hosts: local hosts per region the scaler keeps at least
 *   maxHosts?: number,       // --max-hosts: local hosts per region the scaler runs at most
 *   capacity?: number,       // --capacity: mandelboxes per host
 *   buffer?: number,         // --buffer: warm mandelboxes the scaler keeps per region
 *   scaleDownAfter?: number, // --scale-down-after: seconds of excess (and since a launch) before a drain
 *   regions?: string[],
 *   timeoutMs?: number,
 * }} [options]
 */
export async function startSwitchboard(options = {}) {
  const { hosts, maxHosts, capacity, buffer, scaleDownAfter, regions, timeoutMs = 30_000 } = options;
  const bin = switchboardBin();
  if (!existsSync(bin)) {
    throw new Error(
      `switchboard binary not found at ${bin}; build it with ` +
        "`cargo build -p switchboard-server --bin switchboard` or set SWITCHBOARD_BIN",
    );
  }

  const dir = await mkdtemp(path.join(tmpdir(), "switchboard-web-"));
  const credentialsFile = path.join(dir, "credentials.json");
  const args = ["dev", "--listen", "127.0.0.1:0", "--credentials-file", credentialsFile];
  if (hosts !== undefined) args.push("--hosts", String(hosts));
  if (maxHosts !== undefined) args.push("--max-hosts", String(maxHosts));
  if (capacity !== undefined) args.push("--capacity", String(capacity));
  if (buffer !== undefined) args.push("--buffer", String(buffer));
  if (scaleDownAfter !== undefined) args.push("--scale-down-after", String(scaleDownAfter));
  if (regions !== undefined) args.push("--regions", regions.join(","));

  // Hermetic: no configuration file or overrides from the caller's environment.
  // RUST_LIB_BACKTRACE=0 keeps start-up errors short (anyhow backtraces off; panics unchanged).
  const env = { ...process.env, NO_COLOR: "1", RUST_LIB_BACKTRACE: "0" };
  for (const key of Object.keys(env)) {
    if (key === "SWITCHBOARD_CONFIG" || key.startsWith("SWITCHBOARD__")) delete env[key];
  }

  const child = spawn(bin, args, { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
  const watchdog = startWatchdog(child.pid, credentialsFile, dir);
  const entry = { child, dir };
  live.add(entry);

  let stderr = "";
  let stdout = "";
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (chunk) => {
    stderr += chunk;
    if (stderr.length > 2 * STDERR_KEEP) stderr = stderr.slice(-STDERR_KEEP);
  });
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk) => {
    stdout += chunk;
    if (stdout.length > 2 * STDERR_KEEP) stdout = stdout.slice(-STDERR_KEEP);
  });

  let exited = null; // {code, signal} once the process is gone
  let spawnError = null;
  const exitPromise = new Promise((resolve) => {
    child.on("exit", (code, signal) => {
      exited = { code, signal };
      live.delete(entry);
      resolve(exited);
    });
    child.on("error", (err) => {
      spawnError = err;
      exited ??= { code: null, signal: null };
      live.delete(entry);
      resolve(exited);
    });
  });

  const tail = (text) =>
    text
      .replace(/\x1b\[[0-9;]*m/g, "")
      .trimEnd()
      .split("\n")
      .slice(-TAIL_LINES)
      .join("\n");
  const stderrTail = () => tail(stderr);
  // The server's logs may go to either stream (tracing's fmt layer writes to
  // stdout by default), so failure messages show the tail of both.
  const outputTail = () =>
    `--- stderr (last ${TAIL_LINES} lines) ---\n${tail(stderr) || "(empty)"}\n` +
    `--- stdout (last ${TAIL_LINES} lines) ---\n${tail(stdout) || "(empty)"}`;

  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    watchdog?.kill("SIGKILL");
    if (!exited) {
      child.kill("SIGTERM");
      let timer;
      const done = await Promise.race([
        exitPromise,
        new Promise((resolve) => {
          timer = setTimeout(() => resolve(null), 5_000);
        }),
      ]);
      clearTimeout(timer);
      if (!done) {
        child.kill("SIGKILL");
        await exitPromise;
      }
    }
    await rm(dir, { recursive: true, force: true });
  };

  const started = Date.now();
  let credentials = null;
  try {
    while (!credentials) {
      if (spawnError) {
        throw new Error(`could not start ${bin}: ${spawnError.message}`);
      }
      if (exited) {
        throw new Error(
          `switchboard dev exited before writing ${credentialsFile} ` +
            `(code ${exited.code}, signal ${exited.signal}):\n${outputTail()}`,
        );
      }
      if (Date.now() - started > timeoutMs) {
        throw new Error(
          `switchboard dev did not write ${credentialsFile} within ${timeoutMs} ms:\n${outputTail()}`,
        );
      }
      credentials = await readCredentials(credentialsFile);
      if (!credentials) await sleep(50);
    }
  } catch (err) {
    await stop();
    throw err;
  }

  const endpoint = credentials.endpoint.replace(/\/+$/, "");
  const url = new URL(endpoint);
  return {
    /** e.g. http://127.0.0.1:41234 */
    endpoint,
    /** host:port, as grpcurl wants it */
    address: url.host,
    userToken: credentials.user_token,
    adminToken: credentials.admin_token,
    credentialsFile,
    pid: child.pid,
    stderrTail,
    outputTail,
    stop,
  };
}

// A test process can die without running any handler (the test runner
// SIGKILLs a file's process when its own output pipe breaks, for one). A small
// shell watches a pipe from this process: when the pipe closes without the
// watchdog having been stopped first, it sends the server SIGTERM, SIGKILL
// after 10 s if the same server (same credentials file) is still there, and
// removes the temporary directory.
const WATCHDOG = `
while read -r _; do :; done
if kill -TERM "$1" 2>/dev/null; then
  i=0
  while kill -0 "$1" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -ge 100 ]; then
      grep -qF -- "$2" "/proc/$1/cmdline" 2>/dev/null && kill -KILL "$1" 2>/dev/null
      break
    fi
    sleep 0.1
  done
fi
rm -rf -- "$3"
`;

function startWatchdog(pid, credentialsFile, dir) {
  if (pid === undefined || !existsSync("/bin/sh")) return null;
  const watchdog = spawn("/bin/sh", ["-c", WATCHDOG, "switchboard-watchdog", String(pid), credentialsFile, dir], {
    stdio: ["pipe", "ignore", "ignore"],
  });
  watchdog.on("error", () => {}); // best effort
  watchdog.stdin.on("error", () => {});
  // Neither the watchdog nor its pipe keeps this process alive.
  watchdog.unref();
  watchdog.stdin.unref?.();
  return watchdog;
}

/** The parsed credentials file, or null while it is missing or still being written. */
async function readCredentials(file) {
  let text;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    if (err.code === "ENOENT") return null;
    throw err;
  }
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    return null; // partially written
  }
  for (const key of ["endpoint", "user_token", "admin_token"]) {
    if (typeof parsed[key] !== "string" || parsed[key] === "") return null;
  }
  return parsed;
}

/** Polls `fn` until it returns a truthy value or `timeoutMs` passes; returns the last value. */
export async function poll(fn, { timeoutMs = 5_000, intervalMs = 50 } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value || Date.now() >= deadline) return value;
    await sleep(intervalMs);
  }
}
