// Run a Foredeck agent from Node.js: create a run through the gateway, stream its events as they
// happen, and read a Foredeck error the way any client should (ErrorInfo first, then RetryInfo,
// QuotaFailure, BadRequest from the `grpc-status-details-bin` trailer).
//
//   npm ci && node run.js "What is 17 * 23? Use the calculator."
//
// Where and who, like the Python SDK: FOREDECK_ADDRESS and FOREDECK_API_KEY, else the local
// stack that `foredeck up` started (the nearest .foredeck: stack.json and the gateway's
// services/gateway/credentials.json).
// With --json every line printed is one JSON document (the test reads them).

import { existsSync, readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const STATUS_DETAILS_KEY = "grpc-status-details-bin";

const { values: args, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    agent: { type: "string", default: "" },
    json: { type: "boolean", default: false },
    "proto-dir": { type: "string", default: path.resolve(HERE, "../../proto") },
    "data-dir": { type: "string" },
  },
});
const task = positionals.join(" ");
if (!task) {
  console.error('usage: node run.js [--agent NAME] [--json] "the task"');
  process.exit(2);
}

// Where the gateway is and which key to present.
function findDataDir() {
  if (args["data-dir"]) return args["data-dir"];
  if (process.env.FOREDECK_DATA_DIR) return process.env.FOREDECK_DATA_DIR;
  for (let dir = process.cwd(); ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, ".foredeck");
    if (existsSync(path.join(candidate, "stack.json"))) return candidate;
    if (path.dirname(dir) === dir) return null;
  }
}

function readJson(file) {
  try {
    return JSON.parse(readFileSync(file, "utf8"));
  } catch {
    return {};
  }
}

const dataDir = findDataDir();
const address =
  process.env.FOREDECK_ADDRESS ||
  (dataDir && readJson(path.join(dataDir, "stack.json")).components?.gateway?.address);
const apiKey =
  process.env.FOREDECK_API_KEY ||
  (dataDir &&
    readJson(path.join(dataDir, "services", "gateway", "credentials.json")).developer?.secret);
if (!address || !apiKey) {
  console.error("no gateway: set FOREDECK_ADDRESS and FOREDECK_API_KEY, or run `foredeck up`");
  process.exit(2);
}

// The contracts, straight from proto/.
const protoDir = args["proto-dir"];
function protoFiles(dir, prefix = "") {
  return readdirSync(path.join(dir, prefix), { withFileTypes: true }).flatMap((entry) => {
    const relative = path.posix.join(prefix, entry.name);
    if (entry.isDirectory()) return protoFiles(dir, relative);
    return entry.name.endsWith(".proto") ? [relative] : [];
  });
}
const definition = protoLoader.loadSync(protoFiles(protoDir), {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
const packageObject = grpc.loadPackageDefinition(definition);
const Gateway = packageObject.foredeck.gateway.v1.GatewayService;
const gateway = new Gateway(address, grpc.credentials.createInsecure());

// google.rpc, for reading errors.
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => path.join(protoDir, target);
root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = root.lookupType("google.rpc.Status");

function decodeError(error) {
  const decoded = { code: grpc.status[error.code], message: error.details };
  const raw = error.metadata?.get(STATUS_DETAILS_KEY)?.[0];
  if (!raw) return decoded;
  const status = Status.decode(raw);
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const type = root.lookupType(typeName);
    const detail = type.toObject(type.decode(any.value), { longs: Number, enums: String });
    if (typeName === "google.rpc.ErrorInfo" && !decoded.reason) {
      decoded.reason = detail.reason;
      decoded.domain = detail.domain;
      decoded.metadata = detail.metadata ?? {};
    } else if (typeName === "google.rpc.RetryInfo") {
      const delay = detail.retry_delay ?? {};
      decoded.retryAfterSeconds = (delay.seconds ?? 0) + (delay.nanos ?? 0) / 1e9;
    } else if (typeName === "google.rpc.QuotaFailure") {
      decoded.quota = detail.violations ?? [];
    } else if (typeName === "google.rpc.BadRequest") {
      decoded.fieldViolations = detail.field_violations ?? [];
    }
  }
  return decoded;
}

function metadata() {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${apiKey}`);
  return md;
}

function unary(method, request, seconds = 30) {
  return new Promise((resolve, reject) => {
    gateway[method](request, metadata(), { deadline: Date.now() + seconds * 1000 }, (err, res) =>
      err ? reject(err) : resolve(res),
    );
  });
}

function say(kind, value) {
  if (args.json) {
    console.log(JSON.stringify({ [kind]: value }));
  } else if (kind === "event") {
    const payload = value.payload;
    console.log(`${value.sequence} ${payload} ${JSON.stringify(value[payload])}`);
  } else {
    console.log(`${kind}: ${JSON.stringify(value)}`);
  }
}

// Follow a run's events; resume from the last one after a dropped stream.
function watch(runId, afterEventId = "") {
  return new Promise((resolve, reject) => {
    let last = afterEventId;
    const stream = gateway.WatchRun({ run_id: runId, after_event_id: last }, metadata());
    stream.on("data", (response) => {
      last = response.event.event_id;
      say("event", response.event);
    });
    stream.on("end", () => resolve(null));
    stream.on("error", (error) => {
      if (error.code === grpc.status.UNAVAILABLE) resolve(last);
      else reject(error);
    });
  });
}

try {
  const requestId = `node-${Date.now()}-${Math.random().toString(16).slice(2)}`;
  const created = await unary("CreateRun", {
    agent_name: args.agent,
    input: task,
    request_id: requestId,
  });
  say("run", created.run);
  let resumeFrom = "";
  for (let attempt = 0; attempt < 10; attempt += 1) {
    resumeFrom = await watch(created.run.run_id, resumeFrom);
    if (resumeFrom === null) break;
  }
  const finished = await unary("GetRun", { run_id: created.run.run_id });
  say("run", finished.run);

  // Errors, read like any client should: a run that does not exist.
  try {
    await unary("GetRun", { run_id: "run-that-does-not-exist" });
  } catch (error) {
    say("error", decodeError(error));
  }
  gateway.close();
  process.exit(finished.run.status === "RUN_STATUS_SUCCEEDED" ? 0 : 1);
} catch (error) {
  const decoded = decodeError(error);
  console.error(`foredeck: ${decoded.message} (${decoded.reason ?? decoded.code})`);
  if (args.json) say("error", decoded);
  gateway.close();
  process.exit(4);
}
