#!/usr/bin/env node
// Greedy generation through transformers.js (@huggingface/transformers) from a prompt holding an image or an audio
// clip, for a local Gemma 4 ONNX directory with its encoders: Gemma4ForConditionalGeneration loads embed_tokens,
// decoder_model_merged, vision_encoder and audio_encoder, runs the encoder and writes its features over the
// placeholder tokens' embeddings, as it does for an app.
//
// Usage:
//   node multimodal.mjs <model_dir> <dtype> <inputs.json> <max_new_tokens>
//
// inputs.json: {"input_ids": [...], and either
//   "pixel_values": {"dims": [1, N, P], "data": [...]}, "image_position_ids": {"dims": [1, N, 2], "data": [...]}
// or
//   "input_features": {"dims": [1, T, M], "data": [...]}, "input_features_mask": {"dims": [1, T], "data": [0|1...]}}
// (the processors' outputs, given as they are so that the comparison is of the model, not of image resizing).
//
// stdout: one JSON line {"tokens": [...new token ids...]}. stderr: diagnostics. Exit 0 ok, 1 error, 2 bad usage.

import fs from 'node:fs';
import path from 'node:path';

console.log = (...a) => console.error(...a);
console.info = (...a) => console.error(...a);
process.on('unhandledRejection', (e) => {
  console.error(`transformers.js failed (unhandled rejection): ${e?.name ?? 'Error'}: ${e?.message ?? e}`);
  process.exit(1);
});

const { env, LogLevel, Gemma4ForConditionalGeneration, Tensor } = await import('@huggingface/transformers');

const argv = process.argv.slice(2);
if (argv.length !== 4) {
  console.error('usage: node multimodal.mjs <model_dir> <dtype> <inputs.json> <max_new_tokens>');
  process.exit(2);
}
const [dir, dtype, inputsFile, nArg] = argv;
const maxNewTokens = Number(nArg);
const inputs = JSON.parse(fs.readFileSync(inputsFile, 'utf8'));

env.allowRemoteModels = false;
env.allowLocalModels = true;
env.useFSCache = false;
env.useBrowserCache = false;
env.logLevel = LogLevel.WARNING;

const ids = inputs.input_ids;
const feeds = {
  input_ids: new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]),
  attention_mask: new Tensor('int64', new BigInt64Array(ids.length).fill(1n), [1, ids.length]),
};
if (inputs.pixel_values) {
  feeds.pixel_values = new Tensor('float32', Float32Array.from(inputs.pixel_values.data), inputs.pixel_values.dims);
  feeds.image_position_ids = new Tensor('int64', BigInt64Array.from(inputs.image_position_ids.data.map(BigInt)),
    inputs.image_position_ids.dims);
}
if (inputs.input_features) {
  feeds.input_features = new Tensor('float32', Float32Array.from(inputs.input_features.data),
    inputs.input_features.dims);
  feeds.input_features_mask = new Tensor('bool', Uint8Array.from(inputs.input_features_mask.data),
    inputs.input_features_mask.dims);
}

let model;
try {
  model = await Gemma4ForConditionalGeneration.from_pretrained(path.resolve(dir), {
    dtype, device: 'cpu', local_files_only: true,
    session_options: process.env.G4_THREADS ? { intraOpNumThreads: Number(process.env.G4_THREADS) } : {},
  });
} catch (e) {
  console.error(`transformers.js failed to load ${dir}: ${e?.name ?? 'Error'}: ${e?.message ?? e}`);
  process.exit(1);
}
console.error(`sessions: ${Object.keys(model.sessions).join(', ')}`);
const out = await model.generate({ ...feeds, max_new_tokens: maxNewTokens, min_new_tokens: maxNewTokens,
  do_sample: false });
const all = Array.from(out.data, (x) => Number(x));
process.stdout.write(JSON.stringify({ tokens: all.slice(ids.length) }) + '\n');
