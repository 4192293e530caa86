// Calling tokenyard's OpenAI-compatible HTTP API from Node.js with the official
// `openai` package: list models, stream a chat completion with usage, and read the
// errors of rejected calls (OpenAI's envelope: status, type, param, code).
//
//   OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=ty_... node openai-http.mjs
//
// Options: --model NAME, --prompt TEXT, --max-tokens N.
import { parseArgs } from "node:util";

import OpenAI from "openai";

const { values: opts } = parseArgs({
  options: {
    model: { type: "string", default: process.env.TOKENYARD_MODEL ?? "smollm2-135m" },
    prompt: { type: "string", default: "Write a haiku about gRPC." },
    "max-tokens": { type: "string", default: "24" },
  },
});

// baseURL and apiKey come from OPENAI_BASE_URL and OPENAI_API_KEY.
const client = new OpenAI({ maxRetries: 0 });

const models = await client.models.list();
console.log(`models: ${models.data.map((m) => m.id).join(", ")}`);

const stream = await client.chat.completions.create({
  model: opts.model,
  messages: [{ role: "user", content: opts.prompt }],
  max_completion_tokens: Number(opts["max-tokens"]),
  stream: true,
  stream_options: { include_usage: true },
  ignore_eos: true, // a tokenyard extension, passed through as is
});
let text = "";
let role = null;
let finish = null;
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  if (choice) {
    role ??= choice.delta.role;
    text += choice.delta.content ?? "";
    finish = choice.finish_reason ?? finish;
  } else if (chunk.usage) {
    const u = chunk.usage;
    console.log(`usage: prompt_tokens=${u.prompt_tokens} completion_tokens=${u.completion_tokens}`);
  }
}
console.log(`role=${role} finish_reason=${finish} text=${JSON.stringify(text)}`);

async function rejected(label, call) {
  try {
    await call();
    console.log(`${label}: accepted?`);
  } catch (err) {
    if (!(err instanceof OpenAI.APIError)) throw err;
    console.log(`rejected (${label}): ${err.status} ${err.constructor.name} param=${err.param}`);
  }
}

const badKey = new OpenAI({ apiKey: "ty_sk_not_a_real_key", maxRetries: 0 });
await rejected("bad key", () => badKey.models.list());
await rejected("bad temperature", () =>
  client.chat.completions.create({
    model: opts.model,
    messages: [{ role: "user", content: "hi" }],
    temperature: -1,
  }),
);
