// Builds the Switchboard schema at test time (no generated code is committed):
// `buf build proto/proto -o <tmp>/switchboard.binpb` with the buf CLI from npm,
// then a protobuf-es registry from that FileDescriptorSet.

import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { promisify } from "node:util";

import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";

import { PROTO_DIR, WEB_DIR } from "./switchboard.mjs";

const run = promisify(execFile);

export async function loadRegistry() {
  const buf = path.join(WEB_DIR, "node_modules", ".bin", "buf");
  const dir = await mkdtemp(path.join(tmpdir(), "switchboard-proto-"));
  try {
    const out = path.join(dir, "switchboard.binpb");
    try {
      // Imports (google/protobuf/timestamp.proto) are included by default.
      await run(buf, ["build", PROTO_DIR, "-o", out], { cwd: WEB_DIR });
    } catch (err) {
      throw new Error(
        `buf build ${PROTO_DIR} failed (did \`npm ci\` run in tests/web?): ${err.message}\n${err.stderr ?? ""}`,
      );
    }
    const set = fromBinary(FileDescriptorSetSchema, await readFile(out));
    return createFileRegistry(set);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The name of enum value `number` in enum `typeName`, e.g. SESSION_STATE_RUNNING. */
export function enumName(registry, typeName, number) {
  const desc = registry.getEnum(typeName);
  if (!desc) throw new Error(`enum ${typeName} not in the schema`);
  return desc.values.find((v) => v.number === number)?.name ?? `<unknown ${typeName} value ${number}>`;
}
