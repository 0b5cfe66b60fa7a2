"""torch.save files for the pretrained-weights tests (training/tests/pretrained.rs).

  open-clip-folder CHECKPOINT_DIR OUT_DIR
      From one of our checkpoints (model.safetensors + model_config.json): an open_clip Hugging
      Face folder OUT_DIR/hf (open_clip_config.json = {model_cfg, preprocess_cfg},
      open_clip_pytorch_model.bin = torch.save(state_dict)) and an open_clip training checkpoint
      OUT_DIR/epoch_1.pt ({"epoch", "name", "state_dict" with DDP's "module." prefixes,
      "optimizer": None}).
  views OUT_DIR
      OUT_DIR/views.pt: tensors that share one storage (a slice, a strided view, a transpose),
      fp16, bf16, int64 and bool; OUT_DIR/views.safetensors: the same, contiguous.
  evil OUT_DIR
      OUT_DIR/evil.pt: a torch.save zip whose pickle calls os.system("touch OUT_DIR/pwned") when
      unpickled (torch.load(weights_only=False) runs it; a safe reader must refuse it).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def write_open_clip_formats(state, model_cfg, out, name="test"):
    """`state` as open_clip users get it: OUT/hf (open_clip_config.json + a torch.save .bin) and
    OUT/epoch_1.pt (an open_clip_train checkpoint with DDP's "module." prefixes)."""
    hf = os.path.join(out, "hf")
    os.makedirs(hf, exist_ok=True)
    with open(os.path.join(hf, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                              "std": [0.26862954, 0.26130258, 0.27577711]}}, f)
    torch.save(state, os.path.join(hf, "open_clip_pytorch_model.bin"))
    ddp = {"module." + k: v for k, v in state.items()}
    torch.save({"epoch": 1, "name": name, "state_dict": ddp, "optimizer": None},
               os.path.join(out, "epoch_1.pt"))


def open_clip_folder(ckpt, out):
    state = load_file(os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "model_config.json")) as f:
        cfg = json.load(f)
    write_open_clip_formats(state, cfg, out)


def views(out):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    tensors = {
        "base": base,
        "slice": base[2:5],
        "strided": base[1:, ::3],
        "transposed": base.t(),
        "half": torch.randn(3, 5, generator=g).half(),
        "bf16": torch.randn(4, generator=g).bfloat16(),
        "long": torch.arange(-3, 9).view(3, 4),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
    }
    torch.save(tensors, os.path.join(out, "views.pt"))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, os.path.join(out, "views.safetensors"))


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def evil(out):
    torch.save({"visual.proj": Evil(os.path.join(out, "pwned"))}, os.path.join(out, "evil.pt"))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"open-clip-folder": open_clip_folder, "views": views, "evil": evil}[cmd](*args)
