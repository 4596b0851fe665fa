// The README's grpcurl flow, as a new user or an operator runs it: the real
// grpcurl binary (server reflection v1alpha) against `switchboard dev`.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { after, before, describe, it } from "node:test";

import { grpcurl, grpcurlJson } from "./lib/grpcurl.mjs";
import { PROTO_DIR, poll, startSwitchboard } from "./lib/switchboard.mjs";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
// grpcurl exits with 64 + the gRPC status code when the RPC fails.
const EXIT_PERMISSION_DENIED = 64 + 7;
const EXIT_UNAUTHENTICATED = 64 + 16;

describe("grpcurl (the README flow)", { timeout: 60_000 }, () => {
  let sb;
  let addr;
  let userAuth;
  let adminAuth;
  let session; // the Allocate response
  let sessionHost;

  before(async () => {
    // Fail (never skip) with a clear message when grpcurl is missing.
    const version = await grpcurl(["-version"]);
    assert.equal(version.code, 0, `grpcurl -version failed:\n${version.output}`);
    sb = await startSwitchboard();
    addr = sb.address;
    userAuth = ["-H", `authorization: Bearer ${sb.userToken}`];
    adminAuth = ["-H", `authorization: Bearer ${sb.adminToken}`];

    // `switchboard dev` writes its credentials once the hosts are connected, which can be
    // before their warm mandelboxes exist (then Allocate answers PENDING). Wait for a warm fleet.
    const warm = await poll(
      async () => {
        const { hosts = [] } = await grpcurlJson(["-plaintext", ...adminAuth, addr, "switchboard.v1.AdminService/ListHosts"]);
        return hosts.length === 4 && hosts.every((h) => h.capacity > 0 && h.warmMandelboxes === h.capacity);
      },
      { timeoutMs: 10_000, intervalMs: 50 },
    );
    assert.ok(warm, "every dev host has all its mandelboxes warm within 10 s of start-up");
  });

  after(async () => {
    await sb?.stop();
  });

  it("list shows every service of the proto, health and reflection", async () => {
    const res = await grpcurl(["-plaintext", addr, "list"]);
    assert.equal(res.code, 0, res.output);
    const listed = res.stdout.trim().split("\n").map((s) => s.trim()).sort();

    const proto = readFileSync(path.join(PROTO_DIR, "switchboard", "v1", "switchboard.proto"), "utf8");
    const declared = [...proto.matchAll(/^service\s+(\w+)/gm)].map((m) => `switchboard.v1.${m[1]}`);
    for (const s of [
      "switchboard.v1.AllocationService",
      "switchboard.v1.AdminService",
      "switchboard.v1.HostService",
      "switchboard.v1.SessionEventsService",
    ]) {
      assert.ok(declared.includes(s), `${s} is declared in the proto`);
    }
    const expected = [...declared, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"].sort();
    assert.deepEqual(listed, expected);
  });

  it("describe switchboard.v1.AllocationService.Allocate shows the method and its comment", async () => {
    const res = await grpcurl(["-plaintext", addr, "describe", "switchboard.v1.AllocationService.Allocate"]);
    assert.equal(res.code, 0, res.output);
    assert.match(res.stdout, /^switchboard\.v1\.AllocationService\.Allocate is a method:$/m);
    assert.match(res.stdout, /^\/\/ Hands out a warm mandelbox in one call\.$/m);
    assert.match(
      res.stdout,
      /^rpc Allocate \( \.switchboard\.v1\.AllocateRequest \) returns \( \.switchboard\.v1\.AllocateResponse \);$/m,
    );

    const req = await grpcurl(["-plaintext", addr, "describe", "switchboard.v1.AllocateRequest"]);
    assert.equal(req.code, 0, req.output);
    assert.match(req.stdout, /^\s*string client_version = 3;$/m);
  });

  it("grpc.health.v1.Health/Check is SERVING", async () => {
    assert.deepEqual(await grpcurlJson(["-plaintext", addr, "grpc.health.v1.Health/Check"]), { status: "SERVING" });
    assert.deepEqual(
      await grpcurlJson([
        "-plaintext",
        "-d",
        '{"service":"switchboard.v1.AllocationService"}',
        addr,
        "grpc.health.v1.Health/Check",
      ]),
      { status: "SERVING" },
    );
  });

  it("Allocate with the user token returns a RUNNING session", async () => {
    session = await grpcurlJson([
      "-plaintext",
      ...userAuth,
      "-d",
      '{"regions":["us-east-1"],"app":"chrome","client_version":"1.0.0","client_data_json":"{\\"timezone\\":\\"UTC\\"}"}',
      addr,
      "switchboard.v1.AllocationService/Allocate",
    ]);
    assert.equal(session.state, "SESSION_STATE_RUNNING");
    assert.equal(session.region, "us-east-1");
    assert.equal(session.hostAddress, "127.0.0.1");
    assert.match(session.sessionId, UUID);
    assert.match(session.mandelboxId, UUID);
    assert.match(session.sessionKey, /^[0-9a-f]{32}$/);
    assert.equal(session.ports.length, 1);
    assert.equal(session.ports[0].name, "tcp_32262");
    assert.equal(session.ports[0].protocol, "tcp");
    assert.ok(session.ports[0].port > 0 && session.ports[0].port < 65536, `port ${session.ports[0].port}`);
  });

  it("admin ListSessions shows the session", async () => {
    assert.ok(session, "Allocate ran");
    const { sessions } = await grpcurlJson([
      "-plaintext",
      ...adminAuth,
      addr,
      "switchboard.v1.AdminService/ListSessions",
    ]);
    assert.equal(sessions.length, 1, JSON.stringify(sessions));
    const [s] = sessions;
    assert.equal(s.sessionId, session.sessionId);
    assert.equal(s.mandelboxId, session.mandelboxId);
    assert.equal(s.userId, "dev-user");
    assert.equal(s.state, "SESSION_STATE_RUNNING");
    assert.equal(s.region, "us-east-1");
    assert.equal(s.app, "chrome");
    assert.deepEqual(s.requestedRegions, ["us-east-1"]);
    assert.deepEqual(s.ports, session.ports);
    assert.match(s.hostId, /^dev-us-east-1-[12]$/);
    sessionHost = s.hostId;
  });

  it("admin ListHosts shows 4 hosts, one of them running the session", async () => {
    assert.ok(sessionHost, "ListSessions ran");
    const { hosts } = await grpcurlJson(["-plaintext", ...adminAuth, addr, "switchboard.v1.AdminService/ListHosts"]);
    const rows = hosts
      .map((h) => [h.hostId, h.region, h.state, h.connected, h.capacity, h.warmMandelboxes ?? 0, h.runningMandelboxes ?? 0])
      .sort((a, b) => a[0].localeCompare(b[0]));
    const row = (id, region) => [id, region, "HOST_STATE_ACTIVE", true, 4, id === sessionHost ? 3 : 4, id === sessionHost ? 1 : 0];
    assert.deepEqual(rows, [
      row("dev-eu-west-1-1", "eu-west-1"),
      row("dev-eu-west-1-2", "eu-west-1"),
      row("dev-us-east-1-1", "us-east-1"),
      row("dev-us-east-1-2", "us-east-1"),
    ]);
  });

  it("admin ListMandelboxes shows 15 warm boxes and the session's box running", async () => {
    const list = () => grpcurlJson(["-plaintext", ...adminAuth, addr, "switchboard.v1.AdminService/ListMandelboxes"]);
    const { mandelboxes } = await list();
    const counts = {};
    for (const m of mandelboxes) counts[m.state] = (counts[m.state] ?? 0) + 1;
    assert.deepEqual(counts, { MANDELBOX_STATE_WAITING: 15, MANDELBOX_STATE_RUNNING: 1 });
    const running = mandelboxes.find((m) => m.state === "MANDELBOX_STATE_RUNNING");
    assert.equal(running.mandelboxId, session.mandelboxId);
    assert.equal(running.sessionId, session.sessionId);
    assert.equal(running.hostId, sessionHost);
    assert.equal(running.region, "us-east-1");
    assert.equal(running.app, "chrome");
    assert.deepEqual(running.ports, session.ports);

    const filtered = await grpcurlJson([
      "-plaintext",
      ...adminAuth,
      "-d",
      '{"state":"MANDELBOX_STATE_RUNNING"}',
      addr,
      "switchboard.v1.AdminService/ListMandelboxes",
    ]);
    assert.deepEqual(
      filtered.mandelboxes.map((m) => m.mandelboxId),
      [session.mandelboxId],
    );
  });

  it("admin ListRegions shows both dev regions enabled", async () => {
    const { regions } = await grpcurlJson(["-plaintext", ...adminAuth, addr, "switchboard.v1.AdminService/ListRegions"]);
    assert.deepEqual(
      regions.map((r) => [r.name, r.enabled ?? false, r.image ?? ""]).sort(),
      [
        ["eu-west-1", true, "dev"],
        ["us-east-1", true, "dev"],
      ],
    );
  });

  it("an admin RPC with the user token is PermissionDenied with reason FORBIDDEN", async () => {
    const res = await grpcurl(["-plaintext", "-v", ...userAuth, addr, "switchboard.v1.AdminService/ListHosts"]);
    assert.equal(res.code, EXIT_PERMISSION_DENIED, res.output);
    assert.match(res.output, /Code: PermissionDenied/);
    assert.match(res.output, /Message: FORBIDDEN: /);
    assert.match(res.output, /^x-switchboard-reason: FORBIDDEN$/m);
  });

  it("ReportDisconnect with a wrong token is PermissionDenied/BAD_MANDELBOX_TOKEN and changes nothing", async () => {
    const res = await grpcurl([
      "-plaintext",
      "-v",
      "-d",
      JSON.stringify({ mandelbox_id: session.mandelboxId, token: "not-the-token" }),
      addr,
      "switchboard.v1.SessionEventsService/ReportDisconnect",
    ]);
    assert.equal(res.code, EXIT_PERMISSION_DENIED, res.output);
    assert.match(res.output, /Code: PermissionDenied/);
    assert.match(res.output, /Message: BAD_MANDELBOX_TOKEN: /);
    assert.match(res.output, /^x-switchboard-reason: BAD_MANDELBOX_TOKEN$/m);

    const after = await grpcurlJson([
      "-plaintext",
      ...userAuth,
      "-d",
      JSON.stringify({ session_id: session.sessionId }),
      addr,
      "switchboard.v1.AllocationService/GetSession",
    ]);
    assert.equal(after.state, "SESSION_STATE_RUNNING");
    assert.equal(after.endReason, undefined);
  });

  it("the mandelbox echoes; leaving it ends the session (GetSession: ENDED, CLIENT_DISCONNECTED)", async (t) => {
    const [{ port }] = session.ports;
    const socket = net.connect({ host: session.hostAddress, port });
    const echoed = await new Promise((resolve, reject) => {
      let got = "";
      const timer = setTimeout(() => reject(new Error(`no echo within 5 s (got ${JSON.stringify(got)})`)), 5_000);
      socket.setEncoding("utf8");
      socket.on("error", reject);
      socket.on("data", (c) => {
        got += c;
        if (got.length >= 6) {
          clearTimeout(timer);
          resolve(got);
        }
      });
      socket.on("connect", () => socket.write("hello\n"));
    });
    assert.equal(echoed, "hello\n");
    const closedAt = Date.now();
    socket.end();

    const getSession = () =>
      grpcurlJson([
        "-plaintext",
        ...userAuth,
        "-d",
        JSON.stringify({ session_id: session.sessionId }),
        addr,
        "switchboard.v1.AllocationService/GetSession",
      ]);
    const ended = await poll(async () => {
      const s = await getSession();
      return s.state === "SESSION_STATE_ENDED" ? s : null;
    }, { timeoutMs: 5_000, intervalMs: 100 });
    socket.destroy();
    assert.ok(ended, "GetSession reached SESSION_STATE_ENDED within 5 s");
    t.diagnostic(`session ended ${Date.now() - closedAt} ms after the client left`);
    assert.equal(ended.endReason, "END_REASON_CLIENT_DISCONNECTED");
    assert.equal(ended.sessionId, session.sessionId);

    const { sessions = [] } = await grpcurlJson([
      "-plaintext",
      ...adminAuth,
      "-d",
      '{"include_ended":true}',
      addr,
      "switchboard.v1.AdminService/ListSessions",
    ]);
    assert.deepEqual(
      sessions.map((s) => [s.sessionId, s.state, s.endReason]),
      [[session.sessionId, "SESSION_STATE_ENDED", "END_REASON_CLIENT_DISCONNECTED"]],
    );
  });

  it("admin DrainHost puts the host in HOST_STATE_DRAINING; new sessions avoid it", async () => {
    const drained = await grpcurlJson([
      "-plaintext",
      ...adminAuth,
      "-d",
      '{"host_id":"dev-eu-west-1-1"}',
      addr,
      "switchboard.v1.AdminService/DrainHost",
    ]);
    assert.equal(drained.hostId, "dev-eu-west-1-1");
    assert.equal(drained.region, "eu-west-1");
    assert.equal(drained.state, "HOST_STATE_DRAINING");

    const { hosts } = await grpcurlJson(["-plaintext", ...adminAuth, addr, "switchboard.v1.AdminService/ListHosts"]);
    const states = new Map(hosts.map((h) => [h.hostId, h.state]));
    assert.equal(states.get("dev-eu-west-1-1"), "HOST_STATE_DRAINING");
    for (const id of ["dev-eu-west-1-2", "dev-us-east-1-1", "dev-us-east-1-2"]) {
      assert.equal(states.get(id), "HOST_STATE_ACTIVE", id);
    }
    // dev's scaler may already be adding a host to refill eu-west-1's buffer
    // (the drain tore down the drained host's warm boxes); any such host is ACTIVE.
    for (const [id, state] of states) {
      if (id !== "dev-eu-west-1-1") assert.equal(state, "HOST_STATE_ACTIVE", id);
    }

    const eu = await grpcurlJson([
      "-plaintext",
      ...userAuth,
      "-d",
      '{"regions":["eu-west-1"],"app":"chrome","client_version":"1.0.0"}',
      addr,
      "switchboard.v1.AllocationService/Allocate",
    ]);
    assert.equal(eu.state, "SESSION_STATE_RUNNING");
    const got = await grpcurlJson([
      "-plaintext",
      ...userAuth,
      "-d",
      JSON.stringify({ session_id: eu.sessionId }),
      addr,
      "switchboard.v1.AllocationService/GetSession",
    ]);
    assert.notEqual(got.hostId, "dev-eu-west-1-1", "the draining host takes no new session");
    assert.ok(got.hostId.startsWith("dev-eu-west-1-"), got.hostId);
  });

  it("Allocate without a token exits non-zero with Unauthenticated", async () => {
    const res = await grpcurl([
      "-plaintext",
      "-d",
      '{"regions":["us-east-1"],"app":"chrome","client_version":"1.0.0"}',
      addr,
      "switchboard.v1.AllocationService/Allocate",
    ]);
    assert.equal(res.code, EXIT_UNAUTHENTICATED, res.output);
    assert.match(res.output, /Code: Unauthenticated/);
    assert.match(res.output, /Message: UNAUTHENTICATED: /);
  });
});
