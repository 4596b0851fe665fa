// Fleet scaling as an operator sees it with grpcurl: the scaler adds local hosts
// as sessions take warm boxes and drains them as sessions end, the scaling
// settings and instances in the admin RPCs and the fleet page's JSON, refused
// input, and an image rollout followed with WatchOperation.
//
// One small region of its own, so that every step is a host or two:
// at least 1 host, at most 3, 2 boxes each, 2 kept warm, drained after 2 s of excess.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, it } from "node:test";

import { grpcurl, grpcurlJson } from "./lib/grpcurl.mjs";
import { poll, startSwitchboard } from "./lib/switchboard.mjs";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
// grpcurl exits with 64 + the gRPC status code when the RPC fails.
const EXIT_INVALID_ARGUMENT = 64 + 3;
const EXIT_NOT_FOUND = 64 + 5;
const EXIT_FAILED_PRECONDITION = 64 + 9;

const REGION = "us-east-1";
const MIN = 1;
const MAX = 3;
const CAPACITY = 2;
const BUFFER = 2;
const SCALE_DOWN_AFTER = 2;
const HOST = (n) => `dev-${REGION}-${n}`; // dev names hosts by launch count
// The region as `switchboard dev` stores it (ListRegions, minus the output-only status).
const SETTINGS = {
  name: REGION,
  enabled: true,
  image: "dev",
  buffer: BUFFER,
  minInstances: MIN,
  maxInstances: MAX,
  instanceTypes: [{ name: "local", capacity: CAPACITY }],
};
const ALLOCATE = JSON.stringify({ regions: [REGION], app: "chrome", client_version: "1.0.0" });
// Polls wait for the scaler, which looks every second; 30 s is far more than any step needs.
const SETTLE = { timeoutMs: 30_000, intervalMs: 200 };

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * The messages of a server-streaming call: grpcurl prints each one as an
 * indented JSON object, one after the other, so split at the top-level braces.
 */
function parseJsonStream(text) {
  const messages = [];
  let depth = 0;
  let start = -1;
  let inString = false;
  let escaped = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (escaped) escaped = false;
      else if (c === "\\") escaped = true;
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
    } else if (c === "{") {
      if (depth++ === 0) start = i;
    } else if (c === "}" && --depth === 0) {
      messages.push(JSON.parse(text.slice(start, i + 1)));
    }
  }
  assert.equal(depth, 0, `unbalanced grpcurl stream output:\n${text}`);
  return messages;
}

const isLive = (i) => i.state !== "INSTANCE_STATE_TERMINATED" && i.state !== "INSTANCE_STATE_TERMINATING";
const byHost = (a, b) => a.hostId.localeCompare(b.hostId);

describe("grpcurl: fleet scaling and image rollouts", { timeout: 90_000 }, () => {
  let sb;
  let addr;
  let userAuth;
  let adminAuth;
  const sessions = []; // {sessionId, auth} of every live session, to end them with the token that made them
  let rollout; // the StartRollout response
  let watching; // the WatchOperation grpcurl run, started right after StartRollout
  let oldHost; // the dev host that holds sessions through the rollout

  const admin = (method, body) =>
    grpcurlJson([
      "-plaintext",
      ...adminAuth,
      ...(body === undefined ? [] : ["-d", JSON.stringify(body)]),
      addr,
      `switchboard.v1.AdminService/${method}`,
    ]);
  const allocate = (auth) =>
    grpcurlJson(["-plaintext", ...auth, "-d", ALLOCATE, addr, "switchboard.v1.AllocationService/Allocate"]);
  const getSession = ({ sessionId, auth }) =>
    grpcurlJson([
      "-plaintext",
      ...auth,
      "-d",
      JSON.stringify({ session_id: sessionId }),
      addr,
      "switchboard.v1.AllocationService/GetSession",
    ]);
  const endSessions = async () => {
    for (const s of sessions.splice(0)) {
      const ended = await grpcurlJson([
        "-plaintext",
        ...s.auth,
        "-d",
        JSON.stringify({ session_id: s.sessionId }),
        addr,
        "switchboard.v1.AllocationService/EndSession",
      ]);
      assert.equal(ended.state, "SESSION_STATE_ENDED", JSON.stringify(ended));
      assert.equal(ended.endReason, "END_REASON_USER_ENDED");
    }
  };
  /**
   * What an operator looks at: instances (terminated too), hosts, the region; `warm` counts the
   * warm boxes of ACTIVE hosts (of `image`, if given). Three calls, so the fleet may change in
   * between: `consistent` says the hosts listed are exactly the connected instances.
   */
  const snapshot = async ({ image } = {}) => {
    const { instances = [] } = await admin("ListInstances", { include_terminated: true });
    const { hosts = [] } = await admin("ListHosts");
    const { regions = [] } = await admin("ListRegions");
    const serving = hosts.filter((h) => h.state === "HOST_STATE_ACTIVE" && h.connected && (!image || h.image === image));
    instances.sort(byHost);
    hosts.sort(byHost);
    const connected = instances
      .filter((i) => i.state === "INSTANCE_STATE_RUNNING" || i.state === "INSTANCE_STATE_DRAINING")
      .map((i) => i.hostId);
    return {
      consistent: JSON.stringify(connected) === JSON.stringify(hosts.map((h) => h.hostId)),
      instances,
      live: instances.filter(isLive),
      terminated: instances.filter((i) => !isLive(i)),
      hosts,
      region: regions.find((r) => r.name === REGION),
      warm: serving.reduce((sum, h) => sum + (h.warmMandelboxes ?? 0), 0),
    };
  };
  const fleetPage = (token) =>
    fetch(`${sb.endpoint}/fleet/api/hosts`, token ? { headers: { authorization: `Bearer ${token}` } } : {});
  const brief = (f) =>
    JSON.stringify({
      instances: f.instances.map((i) => [i.hostId, i.image, i.state, i.reason ?? ""]),
      hosts: f.hosts.map((h) => [h.hostId, h.image, h.state, h.warmMandelboxes ?? 0, h.runningMandelboxes ?? 0]),
      status: f.region?.status,
    });

  before(async () => {
    // Fail (never skip) with a clear message when grpcurl is missing.
    const version = await grpcurl(["-version"]);
    assert.equal(version.code, 0, `grpcurl -version failed:\n${version.output}`);
    sb = await startSwitchboard({
      regions: [REGION],
      hosts: MIN,
      maxHosts: MAX,
      capacity: CAPACITY,
      buffer: BUFFER,
      scaleDownAfter: SCALE_DOWN_AFTER,
    });
    addr = sb.address;
    userAuth = ["-H", `authorization: Bearer ${sb.userToken}`];
    adminAuth = ["-H", `authorization: Bearer ${sb.adminToken}`];
  });

  after(async () => {
    await sb?.stop();
  });

  it("ListRegions shows the scaling settings and the scaler's status; ListInstances 1 RUNNING", async () => {
    // The status is the scaler's view at its latest pass (every second); the credentials file
    // appears once the first host is connected and warm, so a pass from now on has seen that.
    const since = Date.now();
    const region = await poll(async () => {
      const { regions = [] } = await admin("ListRegions");
      return regions.find((r) => r.name === REGION && Date.parse(r.status?.updatedAt ?? "") > since) ?? null;
    }, SETTLE);
    assert.ok(region, `ListRegions shows ${REGION} with a scaler status from a pass within 30 s`);
    const { status, ...settings } = region;
    assert.deepEqual(settings, SETTINGS);
    assert.equal(status.liveInstances, 1, JSON.stringify(status));
    assert.equal(status.availableMandelboxes, BUFFER, JSON.stringify(status));
    assert.equal(status.launchingMandelboxes ?? 0, 0, JSON.stringify(status));
    assert.equal(status.lastError, undefined, "no launch failed");

    const { instances } = await admin("ListInstances");
    assert.equal(instances.length, 1, JSON.stringify(instances));
    const [instance] = instances;
    assert.equal(instance.hostId, HOST(1));
    assert.equal(instance.region, REGION);
    assert.match(instance.instanceId, /^i-\w+$/);
    assert.equal(instance.instanceType, "local");
    assert.equal(instance.capacity, CAPACITY);
    assert.equal(instance.image, "dev");
    assert.equal(instance.state, "INSTANCE_STATE_RUNNING");
    assert.equal(instance.reason, undefined);
    assert.ok(instance.launchedAt && instance.connectedAt, JSON.stringify(instance));

    // The host behind it, with every box warm; the region filter really filters.
    const { hosts } = await admin("ListHosts");
    assert.deepEqual(
      hosts.map((h) => [h.hostId, h.state, h.image, h.capacity, h.warmMandelboxes]),
      [[HOST(1), "HOST_STATE_ACTIVE", "dev", CAPACITY, CAPACITY]],
    );
    assert.deepEqual(await admin("ListInstances", { region: "eu-west-1" }), {});
  });

  it("hosts are added as sessions take warm boxes, never more than max_instances (3)", async (t) => {
    const running = new Set(); // hosts seen with a RUNNING instance
    const steps = []; // after each session: live instances and warm boxes
    let maxLive = 0;
    let capped = null;
    // Allocate one session at a time and wait for the scaler to answer, until the region is at
    // max_instances with the buffer short (the 4th or 5th session, depending on whether a host
    // was drained for excess in between). The dev user may hold 3 live sessions
    // (allocation.max_sessions_per_user); the admin is another user with 3 more.
    for (let n = 1; n <= 2 * 3 && !capped; n++) {
      const auth = n <= 3 ? userAuth : adminAuth;
      const allocatedAt = Date.now();
      const session = await allocate(auth);
      assert.equal(session.state, "SESSION_STATE_RUNNING", `session ${n}: ${JSON.stringify(session)}`);
      sessions.push({ sessionId: session.sessionId, auth });

      let last;
      const settled = await poll(async () => {
        const f = (last = await snapshot());
        maxLive = Math.max(maxLive, f.live.length);
        for (const i of f.instances) if (i.state === "INSTANCE_STATE_RUNNING") running.add(i.hostId);
        if (!f.consistent || f.live.some((i) => i.state === "INSTANCE_STATE_LAUNCHING")) return null;
        if (f.warm >= BUFFER) return f;
        // At the maximum the buffer cannot come back; the scaler's status (from a pass after
        // this session) says so: fewer boxes available (warm or warming) than the buffer.
        const status = f.region?.status ?? {};
        const atMax =
          f.live.length === MAX &&
          status.liveInstances === MAX &&
          (status.availableMandelboxes ?? 0) < BUFFER &&
          Date.parse(status.updatedAt) > allocatedAt;
        return atMax ? { ...f, capped: true } : null;
      }, SETTLE);
      assert.ok(settled, `after session ${n} the buffer is back or the region is at its maximum: ${brief(last)}`);
      steps.push({ sessions: n, live: settled.live.length, warm: settled.warm });
      if (settled.capped) capped = settled;
    }
    const story = steps.map((s) => `${s.sessions} sessions: ${s.live} live, ${s.warm} warm`).join("; ");
    t.diagnostic(story);
    assert.ok(capped, `the region reached ${MAX} instances with the buffer short within 6 sessions: ${story}`);
    assert.deepEqual([...running].sort(), [HOST(1), HOST(2), HOST(3)], "a second and a third host came up");
    // Each new host brought the buffer back (2 warm boxes) before the maximum was reached.
    assert.ok(steps.some((s) => s.live === 2 && s.warm >= BUFFER), `buffer back with 2 hosts: ${story}`);
    assert.ok(steps.some((s) => s.live === 3 && s.warm >= BUFFER), `buffer back with 3 hosts: ${story}`);

    // Held at the maximum for a few scaler passes: no 4th instance however short the buffer is.
    const holdUntil = Date.now() + 3_000;
    while (Date.now() < holdUntil) {
      const { instances = [] } = await admin("ListInstances", { include_terminated: true });
      maxLive = Math.max(maxLive, instances.filter(isLive).length);
      assert.deepEqual(
        instances.map((i) => i.hostId).sort(),
        [HOST(1), HOST(2), HOST(3)],
        "no other instance is launched at the maximum",
      );
      await sleep(250);
    }
    assert.ok(maxLive <= MAX, `never more than ${MAX} live instances (saw ${maxLive})`);
    const f = await snapshot();
    assert.equal(f.live.length, MAX, brief(f));
    assert.ok(f.warm < BUFFER, `the buffer is still short at the maximum: ${brief(f)}`);
    assert.equal(f.region.status.liveInstances, MAX, brief(f));
  });

  it("hosts are drained and terminated as sessions end, back to min_instances (1)", async () => {
    assert.ok(sessions.length >= 4, "the scale-up test ran");
    await endSessions();

    let maxLive = 0;
    let last;
    const settled = await poll(async () => {
      const f = (last = await snapshot());
      maxLive = Math.max(maxLive, f.live.length);
      return f.consistent &&
        f.live.length === MIN &&
        f.live[0].state === "INSTANCE_STATE_RUNNING" &&
        f.terminated.length === MAX - MIN &&
        f.warm >= BUFFER
        ? f
        : null;
    }, SETTLE);
    assert.ok(settled, `within 30 s of the last session ending, 1 host is left and 2 are terminated: ${brief(last)}`);
    assert.ok(maxLive <= MAX, `never more than ${MAX} live instances (saw ${maxLive})`);
    for (const i of settled.terminated) {
      assert.equal(i.state, "INSTANCE_STATE_TERMINATED", JSON.stringify(i));
      assert.equal(i.reason, "drained", `${i.hostId} was drained, then terminated once empty: ${JSON.stringify(i)}`);
      assert.match(i.instanceId, /^i-\w+$/);
      assert.ok(i.terminatedAt, JSON.stringify(i));
    }
    const [kept] = settled.live;

    // Terminated hosts are gone from ListHosts; the one left keeps the buffer warm.
    const { hosts } = await admin("ListHosts");
    assert.deepEqual(
      hosts.map((h) => [h.hostId, h.state, h.warmMandelboxes ?? 0, h.runningMandelboxes ?? 0]),
      [[kept.hostId, "HOST_STATE_ACTIVE", BUFFER, 0]],
    );
    // Without include_terminated, ListInstances shows only the live one.
    const { instances } = await admin("ListInstances");
    assert.deepEqual(
      instances.map((i) => [i.hostId, i.state]),
      [[kept.hostId, "INSTANCE_STATE_RUNNING"]],
    );
    // The scaler's status catches up within a pass.
    const status = await poll(async () => {
      const { regions = [] } = await admin("ListRegions");
      const s = regions.find((r) => r.name === REGION)?.status;
      return s?.liveInstances === MIN ? s : null;
    }, SETTLE);
    assert.ok(status, "ListRegions status shows 1 live instance");
    assert.equal(status.availableMandelboxes, BUFFER);
  });

  it("the fleet page's JSON lists the region's scaling settings and the instances", async () => {
    // It needs an admin token, like AdminService.
    assert.equal((await fleetPage()).status, 401, "no token");
    assert.equal((await fleetPage(sb.userToken)).status, 403, "user token");

    const res = await fleetPage(sb.adminToken);
    assert.equal(res.status, 200);
    const view = await res.json();
    assert.deepEqual(
      view.regions.map((r) => ({
        name: r.name,
        enabled: r.enabled,
        image: r.image,
        buffer: r.buffer,
        min_instances: r.min_instances,
        max_instances: r.max_instances,
        instance_types: r.instance_types,
        available: r.available,
        launching: r.launching,
        last_error: r.last_error,
      })),
      [
        {
          name: REGION,
          enabled: true,
          image: "dev",
          buffer: BUFFER,
          min_instances: MIN,
          max_instances: MAX,
          instance_types: [`local ×${CAPACITY}`],
          available: BUFFER,
          launching: 0,
          last_error: null,
        },
      ],
    );

    // The same instances as ListInstances: every one terminated less than a minute ago is still there.
    const { instances } = await admin("ListInstances", { include_terminated: true });
    assert.deepEqual(
      view.instances.map((i) => [i.host_id, i.instance_id, i.instance_type, i.capacity, i.image, i.state, i.reason]).sort(),
      instances
        .map((i) => [
          i.hostId,
          i.instanceId,
          i.instanceType,
          i.capacity,
          i.image,
          i.state.replace(/^INSTANCE_STATE_/, ""),
          i.reason ?? null,
        ])
        .sort(),
    );
    assert.equal(view.instances.length, MAX, JSON.stringify(view.instances));
    assert.deepEqual(
      view.instances.map((i) => i.state).sort(),
      ["RUNNING", "TERMINATED", "TERMINATED"],
    );
    assert.equal(view.hosts.length, 1, JSON.stringify(view.hosts));
    assert.deepEqual(view.operations, [], "no rollout runs yet");
  });

  it("bad input is refused with INVALID_ARGUMENT/INVALID_REQUEST or NOT_FOUND/OPERATION_NOT_FOUND", async () => {
    const refused = async (method, body, exit, code, reason) => {
      const res = await grpcurl([
        "-plaintext",
        "-v",
        ...adminAuth,
        "-d",
        JSON.stringify(body),
        addr,
        `switchboard.v1.AdminService/${method}`,
      ]);
      assert.equal(res.code, exit, `${method} ${JSON.stringify(body)}:\n${res.output}`);
      assert.match(res.output, new RegExp(`Code: ${code}`));
      assert.match(res.output, new RegExp(`Message: ${reason}: `));
      assert.match(res.output, new RegExp(`^x-switchboard-reason: ${reason}$`, "m"));
      return res;
    };
    const region = {
      name: REGION,
      enabled: true,
      image: "dev",
      buffer: BUFFER,
      min_instances: MIN,
      max_instances: MAX,
      instance_types: [{ name: "local", capacity: CAPACITY }],
    };

    // PutRegion replaces the whole record; sending it back unchanged changes nothing.
    const { status: _, ...put } = await admin("PutRegion", region);
    assert.deepEqual(put, SETTINGS);

    const inverted = await refused(
      "PutRegion",
      { ...region, min_instances: 4, max_instances: 3 },
      EXIT_INVALID_ARGUMENT,
      "InvalidArgument",
      "INVALID_REQUEST",
    );
    assert.match(inverted.output, /min_instances/);
    await refused(
      "PutRegion",
      { ...region, instance_types: [{ name: "local", capacity: 0 }] },
      EXIT_INVALID_ARGUMENT,
      "InvalidArgument",
      "INVALID_REQUEST",
    );
    await refused(
      "PutRegion",
      { ...region, instance_types: [{ name: "not a type!", capacity: CAPACITY }] },
      EXIT_INVALID_ARGUMENT,
      "InvalidArgument",
      "INVALID_REQUEST",
    );
    // Refused means untouched.
    const { regions } = await admin("ListRegions");
    assert.deepEqual(
      regions.map(({ status: _, ...r }) => r),
      [SETTINGS],
    );

    await refused("GetOperation", { id: "not-a-uuid" }, EXIT_INVALID_ARGUMENT, "InvalidArgument", "INVALID_REQUEST");
    await refused("GetOperation", { id: randomUUID() }, EXIT_NOT_FOUND, "NotFound", "OPERATION_NOT_FOUND");
    await refused("WatchOperation", { id: "not-a-uuid" }, EXIT_INVALID_ARGUMENT, "InvalidArgument", "INVALID_REQUEST");
    await refused("WatchOperation", { id: randomUUID() }, EXIT_NOT_FOUND, "NotFound", "OPERATION_NOT_FOUND");
    for (const image of ["", "has space"]) {
      await refused("StartRollout", { image, timeout_secs: 60 }, EXIT_INVALID_ARGUMENT, "InvalidArgument", "INVALID_REQUEST");
    }
    assert.deepEqual(await admin("ListOperations"), {}, "a refused StartRollout stores no operation");
  });

  it("StartRollout returns a RUNNING rollout; a second one meanwhile is ROLLOUT_IN_PROGRESS", async () => {
    // Two sessions on the only host keep it busy through the rollout, so that its drain for
    // "old_image" lasts until they end (an idle old host is terminated within a second).
    const ready = await poll(async () => {
      const f = await snapshot();
      return f.consistent && f.live.length === 1 && f.warm === BUFFER ? f : null;
    }, SETTLE);
    assert.ok(ready, "one host with its 2 boxes warm before the rollout");
    oldHost = ready.live[0].hostId;
    for (let n = 0; n < 2; n++) {
      const session = await allocate(userAuth);
      assert.equal(session.state, "SESSION_STATE_RUNNING", JSON.stringify(session));
      sessions.push({ sessionId: session.sessionId, auth: userAuth });
    }
    // The fullest host gets the next session, so both are on the old host.
    for (const s of sessions) assert.equal((await getSession(s)).hostId, oldHost);
    // The scaler adds a host on "dev" for the buffer; wait for it so the rollout starts from a settled fleet.
    let last;
    const buffered = await poll(async () => {
      const f = (last = await snapshot());
      const settled = f.live.length === 2 && f.live.every((i) => i.state === "INSTANCE_STATE_RUNNING");
      return f.consistent && settled && f.warm >= BUFFER ? f : null;
    }, SETTLE);
    assert.ok(buffered, `a second "dev" host keeps the buffer warm: ${brief(last)}`);

    rollout = await admin("StartRollout", { image: "dev-2", timeout_secs: 60 });
    // Follow it at once: the rollout needs about a scaler pass, and the watch should see it run.
    const watchArgs = ["-d", JSON.stringify({ id: rollout.id }), addr, "switchboard.v1.AdminService/WatchOperation"];
    watching = grpcurl(["-plaintext", ...adminAuth, ...watchArgs], { timeoutMs: 45_000 });
    const second = await grpcurl([
      "-plaintext",
      "-v",
      ...adminAuth,
      "-d",
      '{"image":"dev-3","timeout_secs":60}',
      addr,
      "switchboard.v1.AdminService/StartRollout",
    ]);

    assert.match(rollout.id, UUID);
    assert.equal(rollout.kind, "rollout");
    assert.equal(rollout.state, "OPERATION_STATE_RUNNING");
    assert.equal(rollout.rollout.image, "dev-2");
    assert.ok(["LAUNCHING", "WAITING"].includes(rollout.rollout.phase), rollout.rollout.phase);
    assert.ok(Date.parse(rollout.rollout.deadline) > Date.now() + 30_000, `deadline ${rollout.rollout.deadline}`);
    assert.deepEqual(
      rollout.rollout.regions.map((r) => [r.region, r.previousImage, r.wantedMandelboxes, r.ready ?? false]),
      [[REGION, "dev", BUFFER, false]],
    );

    assert.equal(second.code, EXIT_FAILED_PRECONDITION, second.output);
    assert.match(second.output, /Code: FailedPrecondition/);
    assert.match(second.output, /Message: ROLLOUT_IN_PROGRESS: /);
    assert.match(second.output, /^x-switchboard-reason: ROLLOUT_IN_PROGRESS$/m);
  });

  it("WatchOperation streams the rollout until SUCCEEDED/SWITCHED; ListRegions then shows image dev-2", async (t) => {
    assert.ok(watching, "StartRollout ran");
    const res = await watching;
    assert.equal(res.code, 0, `WatchOperation exited ${res.code} (signal ${res.signal}):\n${res.output}`);
    const messages = parseJsonStream(res.stdout);
    const states = messages.map((m) => `${m.state.replace(/^OPERATION_STATE_/, "")}/${m.rollout?.phase}`);
    t.diagnostic(`WatchOperation: ${states.join(" → ")}`);
    // Progress was visible: at least one message while it ran, before the final one.
    assert.ok(messages.length >= 2, `more than the final message:\n${res.stdout}`);
    for (const m of messages) assert.equal(m.id, rollout.id);
    for (const m of messages.slice(0, -1)) {
      assert.equal(m.state, "OPERATION_STATE_RUNNING", JSON.stringify(m));
      assert.ok(["LAUNCHING", "WAITING"].includes(m.rollout.phase), JSON.stringify(m));
    }
    const final = messages.at(-1);
    assert.equal(final.state, "OPERATION_STATE_SUCCEEDED", JSON.stringify(final));
    assert.equal(final.rollout.phase, "SWITCHED");
    assert.equal(final.error, undefined);
    assert.ok(final.finishedAt, JSON.stringify(final));
    assert.equal(final.rollout.regions.length, 1);
    for (const r of final.rollout.regions) {
      assert.equal(r.ready, true, JSON.stringify(r));
      assert.equal(r.previousImage, "dev");
      assert.ok(r.launchedInstances >= 1 && r.connectedInstances >= 1, JSON.stringify(r));
      assert.ok(r.warmMandelboxes >= r.wantedMandelboxes, JSON.stringify(r));
    }

    const { regions } = await admin("ListRegions");
    assert.deepEqual(
      regions.map(({ status: _, ...r }) => r),
      [{ ...SETTINGS, image: "dev-2" }],
    );
  });

  it('old-image hosts drain ("old_image"), then end TERMINATED/"drained"; dev-2 takes over', async () => {
    assert.ok(oldHost, "the rollout test ran");
    // The busy old host drains and keeps its sessions; the idle one is terminated; a new host
    // on dev-2 holds the buffer.
    let last;
    const draining = await poll(async () => {
      const f = (last = await snapshot({ image: "dev-2" }));
      const old = f.instances.find((i) => i.hostId === oldHost);
      const idleOld = f.instances.filter((i) => i.image === "dev" && i.hostId !== oldHost);
      return f.consistent &&
        old?.state === "INSTANCE_STATE_DRAINING" &&
        idleOld.every((i) => i.state === "INSTANCE_STATE_TERMINATED") &&
        f.warm >= BUFFER
        ? f
        : null;
    }, SETTLE);
    assert.ok(draining, `the old host drains, the idle one is terminated, dev-2 is warm: ${brief(last)}`);
    const old = draining.instances.find((i) => i.hostId === oldHost);
    assert.equal(old.reason, "old_image", JSON.stringify(old));
    assert.deepEqual(
      draining.hosts.filter((h) => h.hostId === oldHost).map((h) => [h.state, h.image, h.runningMandelboxes]),
      [["HOST_STATE_DRAINING", "dev", 2]],
    );
    const fresh = draining.live.filter((i) => i.image === "dev-2");
    assert.ok(fresh.length >= 1, brief(draining));
    for (const i of fresh) assert.equal(i.rolloutId, undefined, `ordinary once switched: ${JSON.stringify(i)}`);
    // Draining lets sessions finish.
    for (const s of sessions) assert.equal((await getSession(s)).state, "SESSION_STATE_RUNNING");

    // A new session lands on the new image.
    const session = await allocate(userAuth);
    assert.equal(session.state, "SESSION_STATE_RUNNING", JSON.stringify(session));
    sessions.push({ sessionId: session.sessionId, auth: userAuth });
    const got = await getSession(sessions.at(-1));
    const { hosts } = await admin("ListHosts");
    const on = hosts.find((h) => h.hostId === got.hostId);
    assert.equal(on?.image, "dev-2", `session on ${got.hostId}: ${JSON.stringify(hosts)}`);

    // Once its sessions end, the old host is terminated; dev-2 keeps the buffer warm.
    await endSessions();
    const done = await poll(async () => {
      const f = (last = await snapshot({ image: "dev-2" }));
      const onDev = f.instances.filter((i) => i.image === "dev");
      return f.consistent &&
        onDev.every((i) => i.state === "INSTANCE_STATE_TERMINATED") &&
        f.hosts.every((h) => h.image === "dev-2") &&
        f.warm >= BUFFER
        ? f
        : null;
    }, SETTLE);
    assert.ok(done, `every "dev" instance is terminated and dev-2 is warm: ${brief(last)}`);
    const onDev = done.instances.filter((i) => i.image === "dev");
    assert.equal(onDev.length, 4, `the 3 hosts of the first tests and the idle one added before the rollout: ${brief(done)}`);
    for (const i of onDev) {
      assert.equal(i.reason, "drained", `${i.hostId}: ${JSON.stringify(i)}`);
    }
    assert.ok(done.live.length >= 1 && done.live.every((i) => i.image === "dev-2"), brief(done));
    assert.ok(done.live.length <= MAX, brief(done));
  });

  it("GetOperation/ListOperations show the finished rollout; watching it prints it once", async () => {
    assert.ok(rollout, "StartRollout ran");
    const got = await admin("GetOperation", { id: rollout.id });
    assert.equal(got.state, "OPERATION_STATE_SUCCEEDED");
    assert.equal(got.rollout.phase, "SWITCHED");
    assert.equal(got.rollout.image, "dev-2");

    // Newest first; the refused dev-3 rollout left nothing behind.
    const { operations } = await admin("ListOperations", { limit: 10 });
    assert.deepEqual(
      operations.map((op) => [op.id, op.kind, op.state, op.rollout.image, op.rollout.phase]),
      [[rollout.id, "rollout", "OPERATION_STATE_SUCCEEDED", "dev-2", "SWITCHED"]],
    );
    assert.deepEqual(operations[0], got);
    assert.deepEqual(await admin("ListOperations", { running_only: true }), {}, "nothing runs any more");

    const res = await grpcurl([
      "-plaintext",
      ...adminAuth,
      "-d",
      JSON.stringify({ id: rollout.id }),
      addr,
      "switchboard.v1.AdminService/WatchOperation",
    ]);
    assert.equal(res.code, 0, res.output);
    assert.deepEqual(parseJsonStream(res.stdout), [got]);

    // The fleet page lists running operations only.
    const view = await (await fleetPage(sb.adminToken)).json();
    assert.deepEqual(view.operations, []);
    assert.deepEqual(
      view.regions.map((r) => [r.name, r.image]),
      [[REGION, "dev-2"]],
    );
  });
});
