// The official `openai` npm client against the adapter. Env: OPENAI_BASE_URL, OPENAI_API_KEY, MODEL.
// Prints one JSON object with what it saw; tests/test_openai_js_client.py checks it.
import OpenAI from "openai";
import { VERSION } from "openai/version";

const client = new OpenAI({
  baseURL: process.env.OPENAI_BASE_URL,
  apiKey: process.env.OPENAI_API_KEY || "not-needed",
  maxRetries: 0,
  timeout: 60_000,
});
const model = process.env.MODEL;

const chat = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Name three French cities." }],
  max_tokens: 8,
  temperature: 0,
});

const chunks = [];
let streamedText = "";
let finishReason = null;
let usage = null;
const stream = await client.completions.create({
  model,
  prompt: "The capital of France is",
  max_tokens: 8,
  temperature: 0,
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  chunks.push(chunk);
  for (const choice of chunk.choices) {
    streamedText += choice.text;
    if (choice.finish_reason) finishReason = choice.finish_reason;
  }
  if (chunk.usage) usage = chunk.usage;
}
const whole = await client.completions.create({
  model,
  prompt: "The capital of France is",
  max_tokens: 8,
  temperature: 0,
});

let notFound = null;
try {
  await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
} catch (error) {
  notFound = { status: error.status, code: error.code, param: error.param, type: error.type };
}

console.log(JSON.stringify({
  sdkVersion: VERSION,
  chat: { object: chat.object, content: chat.choices[0].message.content, finish: chat.choices[0].finish_reason,
          usage: chat.usage },
  stream: { chunks: chunks.length, text: streamedText, finish: finishReason, usage,
            ids: [...new Set(chunks.map((c) => c.id))].length },
  whole: { text: whole.choices[0].text, finish: whole.choices[0].finish_reason },
  notFound,
}));
