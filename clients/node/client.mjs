// Calling tokenyard from Node.js with @grpc/grpc-js: list models, stream a
// generation, ask for n samples of one prompt, constrain a reply to a JSON Schema
// (response_format), cancel a stream midway, and read
// the rich error details
// (google.rpc.Status in the grpc-status-details-bin trailer) of rejected calls.
//
//   TOKENYARD_API_KEY=ty_... node client.mjs --address 127.0.0.1:50051 --model smollm2-135m
//
// Options: --address HOST:PORT, --model NAME, --prompt TEXT, --max-tokens N,
// --n SAMPLES (default 2), --cache default|bypass|refresh (the router's response
// cache, when the key enables it: the usage of a stream answered from it says
// cached=true), --tls-ca FILE (TLS), --deadline SECONDS. Protos load at run time from
// ../../protos (tokenyard) and ./protos (google/rpc, vendored).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const includeDirs = [path.join(here, "../../protos"), path.join(here, "protos")];

const { values: opts } = parseArgs({
  options: {
    address: { type: "string", default: process.env.TOKENYARD_ADDRESS ?? "127.0.0.1:50051" },
    model: { type: "string", default: process.env.TOKENYARD_MODEL ?? "smollm2-135m" },
    prompt: { type: "string", default: "Write a haiku about gRPC." },
    "max-tokens": { type: "string", default: "24" },
    n: { type: "string", default: "2" },
    cache: { type: "string", default: "default" },
    "tls-ca": { type: "string" },
    deadline: { type: "string", default: "30" },
  },
});

const definition = protoLoader.loadSync("tokenyard/generation/v1/generation_service.proto", {
  includeDirs,
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const generation = grpc.loadPackageDefinition(definition).tokenyard.generation.v1;

// google.rpc types, to decode the error details every tokenyard error carries.
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => {
  for (const dir of includeDirs) {
    const candidate = path.join(dir, target);
    if (fs.existsSync(candidate)) return candidate;
  }
  return target; // google/protobuf/*.proto are built into protobufjs
};
rpcRoot.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = rpcRoot.lookupType("google.rpc.Status");

function credentials() {
  return opts["tls-ca"]
    ? grpc.credentials.createSsl(fs.readFileSync(opts["tls-ca"]))
    : grpc.credentials.createInsecure();
}

function client() {
  return new generation.GenerationService(opts.address, credentials());
}

function metadataFor(key) {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${key}`);
  return md;
}

// Every call gets a deadline: a call without one can hang forever.
function deadline(seconds = Number(opts.deadline)) {
  return new Date(Date.now() + seconds * 1000);
}

/** Decode grpc-status-details-bin into {reason, metadata, retryDelaySeconds}. */
export function errorDetails(err) {
  const out = { code: grpc.status[err.code], message: err.details, reason: "", metadata: {} };
  const raw = err.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return out;
  const status = Status.decode(raw);
  for (const any of status.details) {
    const typeName = any.type_url.split("/").pop();
    const type = rpcRoot.lookupType(typeName);
    const detail = type.toObject(type.decode(any.value), { longs: Number });
    if (typeName === "google.rpc.ErrorInfo") {
      out.reason = detail.reason;
      out.metadata = detail.metadata ?? {};
    } else if (typeName === "google.rpc.RetryInfo") {
      const d = detail.retryDelay ?? {};
      out.retryDelaySeconds = Number(d.seconds ?? 0) + Number(d.nanos ?? 0) / 1e9;
    } else if (typeName === "google.rpc.QuotaFailure") {
      out.quotaViolations = detail.violations;
    }
  }
  return out;
}

function listModels(stub, key) {
  return new Promise((resolve, reject) => {
    stub.ListModels({}, metadataFor(key), { deadline: deadline() }, (err, reply) =>
      err ? reject(err) : resolve(reply.models),
    );
  });
}

function generate(stub, key, request) {
  return new Promise((resolve, reject) => {
    stub.Generate(request, metadataFor(key), { deadline: deadline() }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

function streamGenerate(stub, key, request, { cancelAfter } = {}) {
  return new Promise((resolve, reject) => {
    const call = stub.StreamGenerate(request, metadataFor(key), { deadline: deadline() });
    let messages = 0;
    let last = null;
    call.on("data", (msg) => {
      messages += 1;
      if (msg.text) process.stdout.write(msg.text);
      if (msg.finish_reason !== "FINISH_REASON_UNSPECIFIED") last = msg;
      if (cancelAfter && messages === cancelAfter) call.cancel();
    });
    call.on("error", (err) => {
      if (err.code === grpc.status.CANCELLED && cancelAfter) resolve({ messages, cancelled: true });
      else reject(err);
    });
    call.on("end", () => resolve({ messages, last, cancelled: false }));
  });
}

async function main() {
  const key = process.env.TOKENYARD_API_KEY;
  if (!key) {
    console.error("set TOKENYARD_API_KEY");
    process.exit(2);
  }
  const stub = client();
  const maxTokens = Number(opts["max-tokens"]);

  const models = await listModels(stub, key);
  console.log(`models: ${models.map((m) => `${m.name} (${m.workers} workers)`).join(", ")}`);

  process.stdout.write("stream: ");
  const done = await streamGenerate(stub, key, {
    model: opts.model,
    prompt: opts.prompt,
    sampling: { max_tokens: maxTokens, ignore_eos: true, temperature: 0 },
    cache: `CACHE_MODE_${opts.cache.toUpperCase()}`,
  });
  process.stdout.write("\n");
  const usage = done.last?.usage ?? {};
  console.log(
    `finished: ${done.last?.finish_reason} after ${done.messages} messages, ` +
      `completion_tokens=${usage.completion_tokens} cached=${usage.cached}`,
  );

  // n samples of one prompt, prefilled once: `choices` holds one entry per sample.
  const samples = await generate(stub, key, {
    model: opts.model,
    prompt: opts.prompt,
    n: Number(opts.n),
    sampling: { max_tokens: maxTokens, ignore_eos: true, seed: "7" },
  });
  const described = samples.choices.map(
    (c) => `${c.index}:${c.finish_reason}:${c.token_ids.length}`,
  );
  console.log(
    `samples: ${described.join(" ")} completion_tokens=${samples.usage.completion_tokens}`,
  );

  // Structured output: the reply is one JSON value valid under the schema (the
  // server masks every token the schema forbids; it ends once the JSON is whole).
  const schema = {
    type: "object",
    properties: { answer: { enum: ["yes", "no"] } },
    required: ["answer"],
    additionalProperties: false,
  };
  const structured = await generate(stub, key, {
    model: opts.model,
    prompt: opts.prompt,
    sampling: { max_tokens: 32 },
    response_format: { json_schema: JSON.stringify(schema) },
  });
  console.log(`structured: ${structured.finish_reason} ${structured.text}`);

  process.stdout.write("cancel: ");
  const cancelled = await streamGenerate(
    stub,
    key,
    { model: opts.model, prompt: opts.prompt, sampling: { max_tokens: 400, ignore_eos: true } },
    { cancelAfter: 3 },
  );
  process.stdout.write("\n");
  console.log(`cancelled: ${cancelled.cancelled} after ${cancelled.messages} messages`);

  for (const [label, callKey, request] of [
    ["bad key", "ty_sk_not_a_real_key", { model: opts.model, prompt: "hi" }],
    ["bad top_p", key, { model: opts.model, prompt: "hi", sampling: { top_p: 2 } }],
    [
      "bad schema",
      key,
      { model: opts.model, prompt: "hi", response_format: { json_schema: '{"type": "objekt"}' } },
    ],
  ]) {
    try {
      await streamGenerate(stub, callKey, request);
      console.log(`${label}: unexpectedly accepted`);
    } catch (err) {
      const d = errorDetails(err);
      const retry = d.retryDelaySeconds !== undefined ? ` retry_after=${d.retryDelaySeconds}s` : "";
      const field = d.metadata.field ? ` field=${d.metadata.field}` : "";
      console.log(`rejected (${label}): ${d.code} reason=${d.reason}${field}${retry}`);
    }
  }
  stub.close();
}

main().catch((err) => {
  const d = errorDetails(err);
  console.error(`error: ${d.code}: ${d.message} (reason ${d.reason || "none"})`);
  process.exit(1);
});
