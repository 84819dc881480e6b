#!/usr/bin/env node
// Greedy generation through transformers.js (@huggingface/transformers) for a local
// Gemma 4 ONNX directory, starting from raw prompt token ids (no tokenizer needed).
//
// Usage:
//   node generate.mjs <model_dir> <dtype> '<json list of prompt token ids>' <max_new_tokens>
//
//   <dtype>  one of fp32 fp16 q8 int8 uint8 q4 q4f16 bnb4 q2 q2f16 q1 q1f16 auto,
//            or a JSON per-session map, e.g. '{"embed_tokens":"q4","decoder_model_merged":"q4f16"}'
//
// stdout: exactly one JSON line {"tokens":[...new token ids...]} (the EOS token, if
//         generated, is included: transformers.js stops *after* emitting it).
// stderr: diagnostics. Exit codes: 0 ok, 1 load/run error, 2 bad usage / precheck failure.
//
// Environment knobs (all optional):
//   G4_IGNORE_EOS=1     do not stop at eos_token_id (always produce max_new_tokens tokens)
//   G4_DEBUG=1          log every ONNX session run (input/output names, dtypes, dims,
//                       small int tensors' values) to stderr
//   G4_NO_PRECHECK=1    skip the file/config precheck and let transformers.js fail itself
//   G4_THREADS=N        intra-op threads for onnxruntime-node (default: ORT default)
//   G4_DEVICE=cpu       device passed to from_pretrained (default cpu)
//   G4_TJS_MODULE=path  import this transformers.js entry file instead of the installed package

import fs from 'node:fs';
import path from 'node:path';

// Anything the library prints with console.log (logger.info/debug) must not pollute stdout.
const realStdoutWrite = process.stdout.write.bind(process.stdout);
console.log = (...a) => console.error(...a);
console.info = (...a) => console.error(...a);

// transformers.js reads external-data chunks inside an `async` Promise executor
// (utils/model-loader.js getModelDataFiles), so a missing `*.onnx_data*` file surfaces as an
// *unhandled rejection* that try/catch around from_pretrained cannot see. Report it cleanly.
process.on('unhandledRejection', (e) => {
  console.error(`transformers.js failed (unhandled rejection): ${e?.name ?? 'Error'}: ${e?.message ?? e}`);
  process.exit(1);
});

// G4_TJS_MODULE: optional path to another transformers.js build, e.g.
//   /tmp/g4/tjs/alt/4.1.0/node_modules/@huggingface/transformers/dist/transformers.node.mjs
const TJS_MODULE = process.env.G4_TJS_MODULE || '@huggingface/transformers';
const { env, LogLevel, Gemma4ForCausalLM, Tensor } = await import(TJS_MODULE);

function usage(msg) {
  if (msg) console.error(`error: ${msg}`);
  console.error(
    "usage: node generate.mjs <model_dir> <dtype|json-map> '<json list of prompt token ids>' <max_new_tokens>",
  );
  process.exit(2);
}

const argv = process.argv.slice(2);
if (argv.length !== 4) usage(`expected 4 arguments, got ${argv.length}`);

const modelDir = path.resolve(argv[0]);
let dtype = argv[1];
if (dtype.trim().startsWith('{')) {
  try {
    dtype = JSON.parse(dtype);
  } catch (e) {
    usage(`dtype map is not valid JSON: ${e.message}`);
  }
}
let promptIds;
try {
  promptIds = JSON.parse(argv[2]);
} catch (e) {
  usage(`token id list is not valid JSON: ${e.message}`);
}
if (!Array.isArray(promptIds) || promptIds.length === 0 || !promptIds.every((x) => Number.isInteger(x) && x >= 0)) {
  usage('token id list must be a non-empty JSON array of non-negative integers');
}
const maxNewTokens = Number(argv[3]);
if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) usage('max_new_tokens must be a positive integer');

// --- transformers.js environment: local files only --------------------------------------
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.useFSCache = false; // never read/write the library's file cache
env.useBrowserCache = false;
env.logLevel = process.env.G4_DEBUG ? LogLevel.INFO : LogLevel.WARNING;

// --- precheck: reproduce transformers.js' file resolution to give a clear message --------
const SUFFIX = {
  fp32: '', fp16: '_fp16', int8: '_int8', uint8: '_uint8', q8: '_quantized', q4: '_q4', q2: '_q2',
  q1: '_q1', q4f16: '_q4f16', q2f16: '_q2f16', q1f16: '_q1f16', bnb4: '_bnb4',
};
const SESSIONS = ['embed_tokens', 'decoder_model_merged']; // text-only sessions (session key == file base name)

function precheck() {
  const problems = [];
  if (!fs.existsSync(modelDir) || !fs.statSync(modelDir).isDirectory()) {
    return [`model_dir does not exist or is not a directory: ${modelDir}`];
  }
  const cfgPath = path.join(modelDir, 'config.json');
  if (!fs.existsSync(cfgPath)) return [`missing ${cfgPath}`];
  let cfg;
  try {
    cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
  } catch (e) {
    return [`config.json is not valid JSON: ${e.message}`];
  }
  if (cfg.model_type !== 'gemma4') {
    problems.push(
      `config.model_type is ${JSON.stringify(cfg.model_type)}; transformers.js maps only "gemma4" ` +
        `(with a nested text_config) to Gemma4ForCausalLM / Gemma4ForConditionalGeneration`,
    );
  }
  const arch = cfg.architectures?.[0];
  if (arch !== 'Gemma4ForConditionalGeneration') {
    problems.push(
      `config.architectures[0] is ${JSON.stringify(arch)}; it must be "Gemma4ForConditionalGeneration" so that ` +
        `Gemma4ForCausalLM loads the text-only sessions (embed_tokens + decoder_model_merged). ` +
        `Otherwise it is treated as a single-file decoder and looks for onnx/model*.onnx`,
    );
  }
  if (!cfg.text_config || typeof cfg.text_config.num_hidden_layers !== 'number') {
    problems.push('config.text_config.num_hidden_layers is missing (needed to name past_key_values.* inputs)');
  }
  const tjs = cfg['transformers.js_config'] ?? {};
  const dt = dtype ?? tjs.dtype;
  const ext = tjs.use_external_data_format;
  for (const s of SESSIONS) {
    // same resolution as transformers.js utils/dtypes.js selectDtype (device cpu -> default fp32)
    let d = typeof dt === 'string' ? dt : dt?.[s];
    if (d === 'auto') d = (typeof tjs.dtype === 'string' ? tjs.dtype : tjs.dtype?.[s]) || 'fp32';
    if (!d || d === 'auto') d = 'fp32';
    if (!(d in SUFFIX)) {
      problems.push(`unknown dtype ${JSON.stringify(d)} for ${s}; valid: ${Object.keys(SUFFIX).join(', ')}`);
      continue;
    }
    const full = `${s}${SUFFIX[d]}.onnx`;
    const f = path.join(modelDir, 'onnx', full);
    if (!fs.existsSync(f)) problems.push(`missing onnx/${full}`);
    let n = 0;
    if (ext && typeof ext === 'object') n = +(ext[full] ?? ext[s] ?? 0);
    else if (ext) n = +ext;
    for (let i = 0; i < n; ++i) {
      const chunk = `${full}_data${i === 0 ? '' : '_' + i}`;
      if (!fs.existsSync(path.join(modelDir, 'onnx', chunk))) {
        problems.push(`missing onnx/${chunk} (declared by transformers.js_config.use_external_data_format)`);
      }
    }
  }
  return problems;
}

if (!process.env.G4_NO_PRECHECK) {
  const problems = precheck();
  if (problems.length) {
    console.error(`precheck failed for ${modelDir}:`);
    for (const p of problems) console.error(`  - ${p}`);
    console.error('(set G4_NO_PRECHECK=1 to see the raw transformers.js error instead)');
    process.exit(2);
  }
}

// --- debug: wrap session.run to log feeds/fetches --------------------------------------
function describe(t) {
  const dims = JSON.stringify(t.dims);
  let s = `${t.type}${dims}`;
  if ((t.type === 'int64' || t.type === 'int32') && t.size <= 16) {
    s += ' = ' + JSON.stringify(Array.from(t.data, (x) => Number(x)));
  }
  return s;
}
function instrument(model) {
  for (const [name, session] of Object.entries(model.sessions)) {
    const orig = session.run.bind(session);
    let step = 0;
    session.run = async (feeds, ...rest) => {
      const id = step++;
      console.error(`[${name} #${id}] feeds: ` + Object.entries(feeds).map(([k, v]) => `${k}:${describe(v)}`).join(', '));
      const out = await orig(feeds, ...rest);
      console.error(`[${name} #${id}] fetches: ` + Object.entries(out).map(([k, v]) => `${k}:${describe(v)}`).join(', '));
      return out;
    };
  }
}

// --- load + generate ---------------------------------------------------------------------
const sessionOptions = {};
if (process.env.G4_THREADS) sessionOptions.intraOpNumThreads = Number(process.env.G4_THREADS);

let model;
const t0 = performance.now();
try {
  model = await Gemma4ForCausalLM.from_pretrained(modelDir, {
    dtype,
    device: process.env.G4_DEVICE || 'cpu',
    local_files_only: true,
    session_options: sessionOptions,
  });
} catch (e) {
  console.error(`transformers.js failed to load ${modelDir}: ${e?.name ?? 'Error'}: ${e?.message ?? e}`);
  process.exit(1);
}
const t1 = performance.now();
console.error(
  `loaded sessions: ${Object.keys(model.sessions).join(', ')} in ${((t1 - t0) / 1000).toFixed(2)}s`,
);
for (const [name, s] of Object.entries(model.sessions)) {
  console.error(`  ${name}: dtype=${s.config?.dtype} inputs=[${s.inputNames.join(', ')}] outputs=[${s.outputNames.join(', ')}]`);
}
if (process.env.G4_DEBUG) instrument(model);

const n = promptIds.length;
const input_ids = new Tensor('int64', BigInt64Array.from(promptIds, (x) => BigInt(x)), [1, n]);
const attention_mask = new Tensor('int64', new BigInt64Array(n).fill(1n), [1, n]);

const genKwargs = {
  input_ids,
  attention_mask,
  max_new_tokens: maxNewTokens,
  do_sample: false,
  num_beams: 1,
  repetition_penalty: 1.0,
  no_repeat_ngram_size: 0,
  min_length: 0,
  min_new_tokens: null,
};
if (process.env.G4_IGNORE_EOS) genKwargs.eos_token_id = null;

let sequences;
try {
  sequences = await model.generate(genKwargs);
} catch (e) {
  console.error(`generation failed: ${e?.name ?? 'Error'}: ${e?.message ?? e}`);
  process.exit(1);
}
const t2 = performance.now();
const all = sequences.tolist()[0].map((x) => Number(x));
const tokens = all.slice(n);
console.error(
  `generated ${tokens.length} tokens in ${((t2 - t1) / 1000).toFixed(2)}s ` +
    `(${(tokens.length / ((t2 - t1) / 1000)).toFixed(2)} tok/s incl. prefill)`,
);
await model.dispose();
realStdoutWrite(JSON.stringify({ tokens }) + '\n');
