// The desktop app's view of Switchboard: a real gRPC-web client
// (@connectrpc/connect-web over fetch, HTTP/1.1) against `switchboard dev`.

import assert from "node:assert/strict";
import http from "node:http";
import net from "node:net";
import { after, before, describe, it } from "node:test";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { enumName, loadRegistry } from "./lib/schema.mjs";
import { poll, startSwitchboard } from "./lib/switchboard.mjs";

const ALLOCATE = { regions: ["us-east-1"], app: "chrome", clientVersion: "1.0.0" };
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const ORIGIN = "http://example.test";

describe("gRPC-web client (connect-web)", { timeout: 60_000 }, () => {
  let sb;
  let registry;
  let allocation;
  let admin;
  const bearer = (token) => ({ headers: { authorization: `Bearer ${token}` } });
  const name = (type, number) => enumName(registry, `switchboard.v1.${type}`, number);

  before(async () => {
    // Build the schema and start the server side by side; stop the server if the schema fails.
    const [server, reg] = await Promise.allSettled([startSwitchboard(), loadRegistry()]);
    if (server.status === "fulfilled") sb = server.value;
    if (server.status === "rejected") throw server.reason;
    if (reg.status === "rejected") throw reg.reason;
    registry = reg.value;

    const transport = createGrpcWebTransport({ baseUrl: sb.endpoint, useBinaryFormat: true });
    const service = (n) => {
      const desc = registry.getService(`switchboard.v1.${n}`);
      assert.ok(desc, `switchboard.v1.${n} is in the schema`);
      return desc;
    };
    allocation = createClient(service("AllocationService"), transport);
    admin = createClient(service("AdminService"), transport);
  });

  after(async () => {
    await sb?.stop();
  });

  /** Runs `call`, expects a ConnectError, and returns it. */
  async function expectConnectError(call) {
    try {
      await call();
    } catch (err) {
      assert.ok(err instanceof ConnectError, `expected a ConnectError, got ${err}`);
      return err;
    }
    assert.fail("the call succeeded but should have failed");
  }

  // Runs first: `switchboard dev` writes its credentials once the hosts are connected, which can
  // be before their warm mandelboxes exist (an Allocate then answers PENDING), so wait for them.
  it("the dev fleet comes up: admin ListHosts lists 4 ACTIVE hosts with every mandelbox warm", async (t) => {
    const startedAt = Date.now();
    let rows;
    const warm = await poll(
      async () => {
        const { hosts } = await admin.listHosts({}, bearer(sb.adminToken));
        rows = hosts
          .map((h) => [h.hostId, h.region, name("HostState", h.state), h.connected, h.capacity, h.warmMandelboxes])
          .sort((a, b) => a[0].localeCompare(b[0]));
        return hosts.length === 4 && hosts.every((h) => h.capacity > 0 && h.warmMandelboxes === h.capacity);
      },
      { timeoutMs: 10_000, intervalMs: 50 },
    );
    t.diagnostic(`fleet warm ${Date.now() - startedAt} ms after the credentials file appeared`);
    assert.ok(warm, `every host warm within 10 s: ${JSON.stringify(rows)}`);
    assert.deepEqual(rows, [
      ["dev-eu-west-1-1", "eu-west-1", "HOST_STATE_ACTIVE", true, 4, 4],
      ["dev-eu-west-1-2", "eu-west-1", "HOST_STATE_ACTIVE", true, 4, 4],
      ["dev-us-east-1-1", "us-east-1", "HOST_STATE_ACTIVE", true, 4, 4],
      ["dev-us-east-1-2", "us-east-1", "HOST_STATE_ACTIVE", true, 4, 4],
    ]);
  });

  it("Allocate returns a RUNNING session; the port echoes; closing it ends the session", async (t) => {
    const res = await allocation.allocate(ALLOCATE, bearer(sb.userToken));
    assert.equal(name("SessionState", res.state), "SESSION_STATE_RUNNING");
    assert.match(res.sessionId, UUID);
    assert.match(res.mandelboxId, UUID);
    assert.match(res.sessionKey, /^[0-9a-f]{32}$/);
    assert.equal(res.region, "us-east-1");
    assert.equal(res.hostAddress, "127.0.0.1");
    assert.equal(res.ports.length, 1);
    const [port] = res.ports;
    assert.equal(port.name, "tcp_32262");
    assert.equal(port.protocol, "tcp");
    assert.ok(port.port > 0 && port.port < 65536, `port ${port.port}`);

    // GetSession over gRPC-web agrees with Allocate while the client is connected.
    const socket = await connect(res.hostAddress, port.port);
    const payload = Buffer.from(`hello switchboard ${res.sessionId}\n`);
    const echoed = await echo(socket, payload);
    assert.equal(echoed.toString(), payload.toString());

    const running = await allocation.getSession({ sessionId: res.sessionId }, bearer(sb.userToken));
    assert.equal(name("SessionState", running.state), "SESSION_STATE_RUNNING");
    assert.equal(running.sessionId, res.sessionId);
    assert.equal(running.mandelboxId, res.mandelboxId);
    assert.equal(running.userId, "dev-user");
    assert.equal(running.app, "chrome");
    assert.deepEqual(running.requestedRegions, ["us-east-1"]);
    assert.deepEqual(
      running.ports.map((p) => [p.name, p.port, p.protocol]),
      [["tcp_32262", port.port, "tcp"]],
    );
    assert.equal(name("EndReason", running.endReason), "END_REASON_UNSPECIFIED");

    const closedAt = Date.now();
    await close(socket);
    const ended = await poll(
      async () => {
        const s = await allocation.getSession({ sessionId: res.sessionId }, bearer(sb.userToken));
        return name("SessionState", s.state) === "SESSION_STATE_ENDED" ? s : null;
      },
      { timeoutMs: 5_000, intervalMs: 100 },
    );
    assert.ok(ended, "GetSession reached SESSION_STATE_ENDED within 5 s of the TCP client closing");
    t.diagnostic(`session ended ${Date.now() - closedAt} ms after the client closed`);
    assert.equal(name("EndReason", ended.endReason), "END_REASON_CLIENT_DISCONNECTED");
    assert.ok(ended.endedAt, "ended_at is set");
  });

  it("Allocate without a token fails with Unauthenticated and reason UNAUTHENTICATED", async () => {
    const err = await expectConnectError(() => allocation.allocate(ALLOCATE));
    assert.equal(err.code, Code.Unauthenticated);
    assert.match(err.rawMessage, /^UNAUTHENTICATED: /);
    assert.equal(err.metadata.get("x-switchboard-reason"), "UNAUTHENTICATED");
  });

  it("Allocate with a forged token fails with Unauthenticated and reason UNAUTHENTICATED", async () => {
    const [header, payload] = sb.userToken.split(".");
    const forged = `${header}.${payload}.${Buffer.from("not the signature").toString("base64url")}`;
    const err = await expectConnectError(() => allocation.allocate(ALLOCATE, bearer(forged)));
    assert.equal(err.code, Code.Unauthenticated);
    assert.match(err.rawMessage, /^UNAUTHENTICATED: /);
    assert.equal(err.metadata.get("x-switchboard-reason"), "UNAUTHENTICATED");
  });

  it("AdminService.ListHosts: user token is PermissionDenied/FORBIDDEN, admin token lists 4 hosts", async () => {
    const err = await expectConnectError(() => admin.listHosts({}, bearer(sb.userToken)));
    assert.equal(err.code, Code.PermissionDenied);
    assert.match(err.rawMessage, /^FORBIDDEN: /);
    assert.equal(err.metadata.get("x-switchboard-reason"), "FORBIDDEN");

    const { hosts } = await admin.listHosts({}, bearer(sb.adminToken));
    assert.equal(hosts.length, 4);
    const rows = hosts
      .map((h) => [h.hostId, h.region, name("HostState", h.state), h.connected, h.capacity])
      .sort((a, b) => a[0].localeCompare(b[0]));
    assert.deepEqual(rows, [
      ["dev-eu-west-1-1", "eu-west-1", "HOST_STATE_ACTIVE", true, 4],
      ["dev-eu-west-1-2", "eu-west-1", "HOST_STATE_ACTIVE", true, 4],
      ["dev-us-east-1-1", "us-east-1", "HOST_STATE_ACTIVE", true, 4],
      ["dev-us-east-1-2", "us-east-1", "HOST_STATE_ACTIVE", true, 4],
    ]);
  });

  it("CORS preflight from another origin allows POST with content-type, x-grpc-web, authorization", async (t) => {
    const res = await rawRequest(sb.endpoint, "/switchboard.v1.AllocationService/Allocate", {
      method: "OPTIONS",
      headers: {
        origin: ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web,authorization",
      },
    });
    t.diagnostic(`preflight: ${res.status} ${JSON.stringify(corsHeaders(res.headers))}`);
    assert.ok(res.status >= 200 && res.status < 300, `preflight status ${res.status}`);
    assert.ok(
      ["*", ORIGIN].includes(res.headers["access-control-allow-origin"]),
      `access-control-allow-origin: ${res.headers["access-control-allow-origin"]}`,
    );
    const methods = list(res.headers["access-control-allow-methods"]);
    assert.ok(methods.includes("*") || methods.includes("post"), `allow-methods: ${methods}`);
    const allowed = list(res.headers["access-control-allow-headers"]);
    for (const h of ["content-type", "x-grpc-web", "authorization"]) {
      assert.ok(allowed.includes("*") || allowed.includes(h), `allow-headers ${JSON.stringify(allowed)} covers ${h}`);
    }
  });

  it(
    "CORS preflight lists authorization explicitly (the Fetch standard's `*` does not cover it)",
    async () => {
      const res = await rawRequest(sb.endpoint, "/switchboard.v1.AllocationService/Allocate", {
        method: "OPTIONS",
        headers: {
          origin: ORIGIN,
          "access-control-request-method": "POST",
          "access-control-request-headers": "content-type,x-grpc-web,authorization",
        },
      });
      const allowed = list(res.headers["access-control-allow-headers"]);
      assert.ok(allowed.includes("authorization"), `allow-headers ${JSON.stringify(allowed)} names authorization`);
    },
  );

  it("a cross-origin gRPC-web error exposes grpc-status, grpc-message and x-switchboard-reason", async () => {
    // An empty AllocateRequest, framed for gRPC-web: flag 0, length 0.
    const res = await rawRequest(sb.endpoint, "/switchboard.v1.AllocationService/Allocate", {
      method: "POST",
      headers: {
        origin: ORIGIN,
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
        accept: "application/grpc-web+proto",
      },
      body: Buffer.alloc(5),
    });
    assert.equal(res.status, 200);
    assert.ok(
      ["*", ORIGIN].includes(res.headers["access-control-allow-origin"]),
      `access-control-allow-origin: ${res.headers["access-control-allow-origin"]}`,
    );
    const exposed = list(res.headers["access-control-expose-headers"]);
    for (const h of ["grpc-status", "grpc-message", "x-switchboard-reason"]) {
      assert.ok(exposed.includes(h), `expose-headers ${JSON.stringify(exposed)} includes ${h}`);
    }
    // A trailers-only error response: the status is in the headers.
    assert.equal(res.headers["grpc-status"], String(Code.Unauthenticated));
    assert.equal(res.headers["x-switchboard-reason"], "UNAUTHENTICATED");
    assert.match(decodeURIComponent(res.headers["grpc-message"] ?? ""), /^UNAUTHENTICATED: /);
  });

  it("WatchSession streams the current state first, then the end", async () => {
    const res = await allocation.allocate(ALLOCATE, bearer(sb.userToken));
    assert.equal(name("SessionState", res.state), "SESSION_STATE_RUNNING");

    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 10_000);
    try {
      const stream = allocation.watchSession(
        { sessionId: res.sessionId },
        { ...bearer(sb.userToken), signal: abort.signal },
      )[Symbol.asyncIterator]();

      const first = await stream.next();
      assert.equal(first.done, false, "the stream yields at least one update");
      const s = first.value.session;
      assert.ok(s, "the update carries a session");
      assert.equal(s.sessionId, res.sessionId);
      assert.equal(s.mandelboxId, res.mandelboxId);
      assert.equal(name("SessionState", s.state), "SESSION_STATE_RUNNING");
      assert.deepEqual(
        s.ports.map((p) => [p.name, p.port, p.protocol]),
        res.ports.map((p) => [p.name, p.port, p.protocol]),
      );
      // The key goes out once: with Allocate here, never again on the watch.
      assert.equal(first.value.sessionKey, "");

      const endedByCall = await allocation.endSession({ sessionId: res.sessionId }, bearer(sb.userToken));
      assert.equal(name("SessionState", endedByCall.state), "SESSION_STATE_ENDED");
      assert.equal(name("EndReason", endedByCall.endReason), "END_REASON_USER_ENDED");

      // Every later update belongs to this session; the last says ENDED / USER_ENDED, then the stream closes.
      const states = [];
      let last;
      for (;;) {
        const next = await stream.next();
        if (next.done) break;
        last = next.value.session;
        assert.equal(last.sessionId, res.sessionId);
        states.push(name("SessionState", last.state));
      }
      assert.ok(last, "the stream reported the end before closing");
      assert.equal(states.at(-1), "SESSION_STATE_ENDED");
      assert.equal(name("EndReason", last.endReason), "END_REASON_USER_ENDED");
    } finally {
      clearTimeout(timer);
    }
  });

  it("WatchSession of an unknown session fails with NotFound/SESSION_NOT_FOUND", async () => {
    const err = await expectConnectError(async () => {
      for await (const _ of allocation.watchSession(
        { sessionId: "00000000-0000-4000-8000-000000000000" },
        bearer(sb.userToken),
      )) {
        // no updates expected
      }
    });
    assert.equal(err.code, Code.NotFound);
    assert.match(err.rawMessage, /^SESSION_NOT_FOUND: /);
    assert.equal(err.metadata.get("x-switchboard-reason"), "SESSION_NOT_FOUND");
  });
});

// ---------------------------------------------------------------------------

function connect(host, port) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    socket.once("connect", () => resolve(socket));
    socket.once("error", reject);
  });
}

/** Writes `payload` and resolves with as many bytes as came back (fails after 5 s). */
function echo(socket, payload) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let got = 0;
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`echo: got ${got} of ${payload.length} bytes within 5 s`));
    }, 5_000);
    const onData = (chunk) => {
      chunks.push(chunk);
      got += chunk.length;
      if (got >= payload.length) {
        cleanup();
        resolve(Buffer.concat(chunks));
      }
    };
    const onEnd = () => {
      cleanup();
      reject(new Error(`echo: connection closed after ${got} of ${payload.length} bytes`));
    };
    const cleanup = () => {
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("end", onEnd);
      socket.off("error", onEnd);
    };
    socket.on("data", onData);
    socket.on("end", onEnd);
    socket.on("error", onEnd);
    socket.write(payload);
  });
}

/** Half-closes, then waits (up to 2 s) for the socket to close, destroying it if it does not. */
function close(socket) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => socket.destroy(), 2_000);
    socket.once("close", () => {
      clearTimeout(timer);
      resolve();
    });
    socket.resume();
    socket.end();
  });
}

/** A plain HTTP/1.1 request, so that CORS headers can be sent and read as a browser would. */
function rawRequest(base, pathName, { method, headers, body }) {
  return new Promise((resolve, reject) => {
    const req = http.request(new URL(pathName, base), { method, headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

function list(value) {
  return (value ?? "")
    .split(",")
    .map((s) => s.trim().toLowerCase())
    .filter(Boolean);
}

function corsHeaders(headers) {
  return Object.fromEntries(Object.entries(headers).filter(([k]) => k.startsWith("access-control-")));
}
