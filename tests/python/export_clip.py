#!/usr/bin/env python3
"""Reference side of the CLIP export tests (tests/tests/export_clip.rs).

Subcommands (stdout carries only JSON; errors go to stderr with a non-zero exit):
  check-onnx MODEL... [--sha256-of FILE]
      onnx.checker.check_model(full_check=True) on each model (structure and strict shape
      inference), then reports per model: opsets, IR version, metadata, inputs and outputs with
      their (symbolic) shapes, operator types used and their counts, node count, whether every node
      has a name, and the operator counts of the graph onnxruntime (CPU) runs after its graph
      optimisations (`ort_optimized_op_counts`: which of its fusions fired).
      With --sha256-of, also the SHA-256 of FILE (to compare with the recorded source hash).
  ort-run MODEL INPUTS OUT
      Runs MODEL with onnxruntime's Python API (CPU) on INPUTS (safetensors: the model's input
      name -> array) and writes every output to OUT (safetensors).
  open-clip-run CONFIG_DIR NAME WEIGHTS INPUTS OUT
      open_clip.add_model_config(CONFIG_DIR); open_clip.create_model(NAME, pretrained=WEIGHTS) on
      the CPU in fp32 (open_clip loads the checkpoint itself, strictly), then writes
      encode_image(images) and encode_text(text) (unnormalised) to OUT as image_embeds/text_embeds.
  hf-run MODEL_DIR INPUTS OUT
      transformers.CLIPModel.from_pretrained(MODEL_DIR) in fp32, then writes get_image_features and
      get_text_features to OUT as image_embeds/text_embeds.
INPUTS for the last two: safetensors with `images` float [N, 3, H, W] and `text` int64 [N, L].
"""

import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _dims(value_info):
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _op_counts(nodes):
    counts = {}
    for n in nodes:
        key = f"{n.domain}:{n.op_type}" if n.domain else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def _ort_optimized_op_counts(path):
    """Operator counts of the graph ONNX Runtime (CPU) runs after all its graph optimisations: shows
    which fusions fired (Gemm from MatMul + Add, com.microsoft:Gelu from the erf pattern, ...).
    Level 2 (extended) is used for the dump because level 3 only adds the CPU-specific NCHWc
    layout, which ONNX Runtime warns against serialising."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.intra_op_num_threads = 1
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return _op_counts(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def check_onnx(paths, sha_of):
    import onnx
    from onnx import TensorProto

    report = {"models": {}}
    for path in paths:
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        nodes = model.graph.node
        report["models"][path] = {
            "ir_version": model.ir_version,
            "opsets": {o.domain: o.version for o in model.opset_import},
            "metadata": {p.key: p.value for p in model.metadata_props},
            "inputs": [
                {"name": v.name, "elem_type": TensorProto.DataType.Name(v.type.tensor_type.elem_type), "shape": _dims(v)}
                for v in model.graph.input
            ],
            "outputs": [
                {"name": v.name, "elem_type": TensorProto.DataType.Name(v.type.tensor_type.elem_type), "shape": _dims(v)}
                for v in model.graph.output
            ],
            "op_types": sorted({n.op_type for n in nodes}),
            "domains": sorted({n.domain for n in nodes}),
            "nodes": len(nodes),
            "all_nodes_named": all(n.name for n in nodes),
            "initializer_types": sorted({TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}),
            "op_counts": _op_counts(nodes),
            "ort_optimized_op_counts": _ort_optimized_op_counts(path),
        }
    if sha_of:
        with open(sha_of, "rb") as f:
            report["sha256"] = hashlib.sha256(f.read()).hexdigest()
    print(json.dumps(report))


def ort_run(model, inputs, out):
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file, save_file

    feed = load_file(inputs)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    results = sess.run(names, feed)
    save_file({n: np.ascontiguousarray(r) for n, r in zip(names, results)}, out)
    print(json.dumps({"outputs": names}))


def open_clip_run(config_dir, name, weights, inputs, out):
    import torch
    import open_clip
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    open_clip.add_model_config(config_dir)
    model = open_clip.create_model(name, pretrained=weights, device="cpu", precision="fp32").eval()
    x = load_file(inputs)
    with torch.no_grad():
        res = {
            "image_embeds": model.encode_image(x["images"]).float().contiguous(),
            "text_embeds": model.encode_text(x["text"]).float().contiguous(),
        }
    save_file(res, out)
    print(json.dumps({"open_clip": open_clip.__version__, "model": name}))


def hf_run(model_dir, inputs, out):
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model = transformers.CLIPModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    x = load_file(inputs)

    def features(r):
        # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
        if isinstance(r, torch.Tensor):
            return r
        return r.pooler_output

    with torch.no_grad():
        res = {
            "image_embeds": features(model.get_image_features(pixel_values=x["images"])).float().contiguous(),
            "text_embeds": features(model.get_text_features(input_ids=x["text"])).float().contiguous(),
        }
    save_file(res, out)
    print(json.dumps({"transformers": transformers.__version__}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check-onnx")
    c.add_argument("models", nargs="+")
    c.add_argument("--sha256-of")
    r = sub.add_parser("ort-run")
    r.add_argument("model")
    r.add_argument("inputs")
    r.add_argument("out")
    o = sub.add_parser("open-clip-run")
    o.add_argument("config_dir")
    o.add_argument("name")
    o.add_argument("weights")
    o.add_argument("inputs")
    o.add_argument("out")
    h = sub.add_parser("hf-run")
    h.add_argument("model_dir")
    h.add_argument("inputs")
    h.add_argument("out")
    a = p.parse_args()
    try:
        if a.cmd == "check-onnx":
            check_onnx(a.models, a.sha256_of)
        elif a.cmd == "ort-run":
            ort_run(a.model, a.inputs, a.out)
        elif a.cmd == "open-clip-run":
            open_clip_run(a.config_dir, a.name, a.weights, a.inputs, a.out)
        else:
            hf_run(a.model_dir, a.inputs, a.out)
    except Exception as e:  # a clean non-zero exit with the reason, for the Rust test's message
        print(f"export_clip.py {a.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
