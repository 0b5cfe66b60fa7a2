#!/usr/bin/env python3
"""Reference checks for ONNX models written or run from Rust (tests/tests/export_onnx.rs, runtime_ort.rs).

Subcommands:
  make-model PATH
      Writes a tiny model with the official `onnx.helper` API: y = x @ W + b with x [batch, 3],
      W [3, 2], b [2], plus metadata_props {"source": "onnx_check.py"}. Prints JSON with W and b so
      the Rust test computes its reference from the same numbers. A model not written by hq-export
      means the runtime test cannot pass merely because writer and reader share a mistake.
  check PATH [--inputs JSON_FILE]
      Runs onnx.checker.check_model(full_check=True) (structure plus strict shape inference), then
      evaluates the model with onnxruntime's Python API on the CPU provider. Prints JSON:
      {"ir_version", "opsets": {domain: version}, "metadata": {key: value},
       "inputs": [{"name", "elem_type", "shape": [int or symbolic name]}], "outputs": [...],
       "results": {output name: {"shape": [...], "data": [flat floats]}}}.
      The inputs file is {"name": {"shape": [...], "data": [flat floats]}}; without it only the
      checks run and "results" is empty.

Errors go to stderr with a non-zero exit code; stdout carries only the JSON.
"""

import argparse
import json
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _dims(value_info):
    t = value_info.type.tensor_type
    out = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _io(values):
    return [
        {
            "name": v.name,
            "elem_type": TensorProto.DataType.Name(v.type.tensor_type.elem_type),
            "shape": _dims(v),
        }
        for v in values
    ]


def make_model(path):
    w = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=np.float32)
    b = np.array([0.1, -0.2], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["y"], name="add"),
        ],
        "py_affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx_check.py"
    )
    model.ir_version = 10
    helper.set_model_props(model, {"source": "onnx_check.py"})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    print(json.dumps({"W": w.tolist(), "b": b.tolist()}))


def check(path, inputs_file):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    report = {
        "ir_version": model.ir_version,
        "opsets": {o.domain: o.version for o in model.opset_import},
        "metadata": {p.key: p.value for p in model.metadata_props},
        "inputs": _io(model.graph.input),
        "outputs": _io(model.graph.output),
        "results": {},
    }
    if inputs_file:
        import onnxruntime as ort

        with open(inputs_file) as f:
            spec = json.load(f)
        feed = {
            name: np.asarray(v["data"], dtype=np.float32).reshape(v["shape"])
            for name, v in spec.items()
        }
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for name, value in zip(names, sess.run(names, feed)):
            value = np.asarray(value)
            report["results"][name] = {
                "shape": list(value.shape),
                "data": [float(v) for v in value.astype(np.float64).ravel()],
            }
    print(json.dumps(report))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("path")
    c = sub.add_parser("check")
    c.add_argument("path")
    c.add_argument("--inputs")
    a = p.parse_args()
    try:
        if a.cmd == "make-model":
            make_model(a.path)
        else:
            check(a.path, a.inputs)
    except Exception as e:  # report any failure as a clean non-zero exit for the Rust test
        print(f"onnx_check.py {a.cmd} failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
