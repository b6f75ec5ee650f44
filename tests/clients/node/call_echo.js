// A Node.js client of a Foredeck service built from nothing but proto/ and stock packages
// (@grpc/grpc-js, @grpc/proto-loader, protobufjs). It calls one method of the schema-free echo
// service with a google.protobuf.StringValue and prints one JSON object: the reply, or the
// error decoded from its `grpc-status-details-bin` trailer as a google.rpc.Status.
//
//   node call_echo.js --address 127.0.0.1:PORT --method Echo [--value text] [--proto-dir DIR]
//
// The principal token, when the call should carry one, comes from FOREDECK_PRINCIPAL so that it
// never shows in a process listing.

import { readdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ECHO_SERVICE = "foredeck.kittest.v1.EchoService";
const PRINCIPAL_KEY = "x-foredeck-principal";
const STATUS_DETAILS_KEY = "grpc-status-details-bin";

const { values: args } = parseArgs({
  options: {
    address: { type: "string" },
    method: { type: "string", default: "Echo" },
    value: { type: "string", default: "hello" },
    "proto-dir": { type: "string", default: path.resolve(HERE, "../../../proto") },
    "deadline-ms": { type: "string", default: "5000" },
  },
});
if (!args.address) {
  throw new Error("--address is required");
}
const protoDir = args["proto-dir"];

function protoFiles(dir, prefix = "") {
  return readdirSync(path.join(dir, prefix), { withFileTypes: true }).flatMap((entry) => {
    const relative = path.posix.join(prefix, entry.name);
    if (entry.isDirectory()) return protoFiles(dir, relative);
    return entry.name.endsWith(".proto") ? [relative] : [];
  });
}

// Every contract in proto/ loads with proto-loader, the way a Node client would load a service.
const definition = protoLoader.loadSync(protoFiles(protoDir), { includeDirs: [protoDir] });
const services = Object.keys(definition)
  .filter((name) => !("format" in definition[name]))
  .sort();

// google.rpc comes from the vendored files in proto/google/rpc; protobufjs ships the
// well-known types (Any, Duration, StringValue) itself.
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => path.join(protoDir, target);
// keepCase keeps the proto field names (type_url, retry_delay) rather than camelCasing them.
root.loadSync(
  ["google/rpc/status.proto", "google/rpc/error_details.proto", "google/protobuf/wrappers.proto"],
  { keepCase: true },
);
const StringValue = root.lookupType("google.protobuf.StringValue");
const Status = root.lookupType("google.rpc.Status");
const asObject = { longs: Number, enums: String, defaults: true };

function decodeStatus(bytes) {
  const status = Status.decode(bytes);
  const details = status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const type = root.lookupType(typeName);
    return { type: typeName, ...type.toObject(type.decode(any.value), asObject) };
  });
  return { code: status.code, message: status.message, details };
}

function seconds(duration) {
  return duration ? duration.seconds + duration.nanos / 1e9 : null;
}

function describe(error) {
  const [bytes] = error.metadata.get(STATUS_DETAILS_KEY);
  const status = bytes ? decodeStatus(bytes) : null;
  const detail = (type) => status?.details.find((d) => d.type === `google.rpc.${type}`);
  const info = detail("ErrorInfo");
  const retry = detail("RetryInfo");
  return {
    ok: false,
    code: error.code,
    codeName: grpc.status[error.code],
    message: error.details,
    status,
    reason: info?.reason ?? null,
    domain: info?.domain ?? null,
    errorMetadata: info?.metadata ?? null,
    retryDelaySeconds: seconds(retry?.retry_delay),
  };
}

const metadata = new grpc.Metadata();
if (process.env.FOREDECK_PRINCIPAL) {
  metadata.set(PRINCIPAL_KEY, process.env.FOREDECK_PRINCIPAL);
}
const client = new grpc.Client(args.address, grpc.credentials.createInsecure());
const result = await new Promise((resolve) => {
  client.makeUnaryRequest(
    `/${ECHO_SERVICE}/${args.method}`,
    (message) => Buffer.from(StringValue.encode(StringValue.fromObject(message)).finish()),
    (bytes) => StringValue.toObject(StringValue.decode(bytes), asObject),
    { value: args.value },
    metadata,
    { deadline: Date.now() + Number(args["deadline-ms"]) },
    (error, reply) => resolve(error ? describe(error) : { ok: true, value: reply.value }),
  );
});
client.close();
process.stdout.write(`${JSON.stringify({ services, ...result })}\n`);
