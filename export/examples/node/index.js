// Run an exported perception encoder with onnxruntime-node and print its output shapes.
//
//   npm install --onnxruntime-node-install=skip   # CPU build only: skips the CUDA download from nuget.org
//   node index.js ../../../perception/pretrained/air.onnx
//
// The contract: input "image" float32 [N, C, H, W] in [0, 1] (N is free); outputs "slots" [N, K, D],
// "presence" [N, K], "position" [N, K, 2] (x right, y down, -1/+1 at the image edges), then
// "class_probs" [N, K, C] or "masks" [N, K, H, W] when the model has them. onnxruntime-node does
// not expose the file's perception.* metadata; the image shape is the input's static [C, H, W].
'use strict';

const ort = require('onnxruntime-node');

async function main() {
  const path = process.argv[2];
  if (!path) {
    console.error('usage: node index.js ENCODER.onnx');
    process.exit(2);
  }
  const session = await ort.InferenceSession.create(path, { intraOpNumThreads: 1 });
  const [, channels, height, width] = session.inputMetadata[0].shape; // ["batch", C, H, W]
  const n = 4;
  const pixels = new Float32Array(n * channels * height * width);
  for (let i = 0; i < pixels.length; i++) pixels[i] = (i * 7919) % 1000 / 1000; // deterministic, in [0, 1)
  const image = new ort.Tensor('float32', pixels, [n, channels, height, width]);
  const outputs = await session.run({ image });
  for (const name of session.outputNames) {
    console.log(`${name}: [${outputs[name].dims.join(', ')}]`);
  }
  console.log(`presence of image 0: [${Array.from(outputs.presence.data.slice(0, outputs.presence.dims[1]), (p) => p.toFixed(2)).join(', ')}]`);
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
