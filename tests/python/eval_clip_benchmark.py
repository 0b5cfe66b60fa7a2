"""CLIP_benchmark side of hq-eval's parity tests (tests/tests/eval_parity.rs).

Evaluates webdataset folders (DataComp / CLIP_benchmark layout) with clip_benchmark 1.6.2's own
code: `build_dataset("wds/...")` for reading, `zeroshot_classification.evaluate` (amp=False, as
DataComp runs it) and `zeroshot_retrieval.evaluate(recall_k_list=[1, 5, 10])` plus DataComp's
`mean_recall@1`. Writes one JSON object {dir: metrics}.

  linear PROJ.safetensors OUT.json DIR...
      A model-free "CLIP": image embedding = W_img @ flatten(open_clip eval preprocess(image)),
      text embedding = sum over token positions of E[token id] (open_clip's tokenizer). PROJ holds
      `w_img` [D, 3*S*S], `e_txt` [vocab, D] and `image_size` (S). Same on the Rust side, so the
      data path and the metrics are compared without a transformer.
  openclip CONFIG.json SEED CKPT_OUT.safetensors OUT.json DIR...
      Random-initialise open_clip's CLIP from the config (torch.manual_seed(SEED)), save its state
      dict to CKPT_OUT (hq-train loads it), evaluate it.
  pretrained EXPORT_DIR NAME OUT.json DIR...
      Load a trained model the way a user loads an `hq-export --format open_clip` folder:
      `open_clip.add_model_config(EXPORT_DIR/NAME.json)`, `create_model(NAME,
      pretrained=EXPORT_DIR/open_clip_model.safetensors)`, and evaluate it.
  topk IN.safetensors OUT.json
      `torch.topk(m, k, dim=1)` indices (every k in 1, 2, 5, 10 up to the width) and
      `m.argmax(dim=1)` of every matrix in IN, on the CPU: {name: {"argmax": [...], "k": [[...]]}}.

  Scores of identical inputs are made identical before CLIP_benchmark ranks them (see
  `equalise`): a classifier column bit-identical to an earlier one (duplicate class names) gets
  that column's logits, an image or a caption whose model input equals an earlier one's gets that
  one's scores. A float32 GEMM need not round identical columns alike (MKL's non-Intel and SSE4.2
  paths do not, measured 1-8 ulps), so without this the tie sets would test MKL's blocking instead
  of the tie order; with it CLIP_benchmark's own topk, argmax and balanced accuracy still decide
  every metric, on any CPU.

  The modes that evaluate also write "_ties": {DIR: rows whose best scores tie exactly} and
  "_rows": {DIR: rows ranked}, counted on the logits / retrieval scores CLIP_benchmark ranked (a
  row counts when two of its best min(6, width) scores are equal; retrieval counts its text and
  its image rows once each), so a test of tie handling can require the designed count;
  "_equalised": {DIR: scores that `equalise` changed} (0 where the GEMM happened to round
  duplicates alike); and "_slack": {DIR: {metric: bound}}, how much a metric can move when scores closer than
  NEAR (see there; "_near_eps" holds it) swap order - what two float32 implementations of one trained
  model may legitimately disagree on (see `instrument`).
  aro CONFIG.json|linear CKPT.safetensors|PROJ.safetensors OUT.json ARO_DIR KIND[,KIND...]
      (ARO_DIR may be a comma-separated list too, one folder per kind)
      ARO's procedure (dataset_zoo/aro_datasets.py + the authors' notebook) on an ARO-layout folder
      with the open_clip model: PIL crop to bbox, normalised embeddings, argmax over
      [false, true], macro accuracy over relations (minus the symmetric list) or attribute pairs
      (>= 25 cases; KIND attribution_min1 counts every pair). Each kind's result also has
      "_slack" ({metric: bound, "_near_eps": NEAR}): the share of cases whose true-vs-false margin,
      computed with a float64 copy of the model, is within NEAR (ARO's argmax could go either way).
"""

import copy
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import open_clip  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from clip_benchmark.datasets.builder import build_dataset  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification as zsc  # noqa: E402
from clip_benchmark.metrics import zeroshot_retrieval as zsr  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
BATCH = 64


class LinearClip(torch.nn.Module):
    def __init__(self, w_img, e_txt):
        super().__init__()
        self.w_img = w_img
        self.e_txt = e_txt

    def encode_image(self, images):
        return images.reshape(images.shape[0], -1).to(self.w_img.dtype) @ self.w_img.T

    def encode_text(self, tokens):
        return self.e_txt[tokens].sum(dim=1)


def clean(v):
    if isinstance(v, float) and (v != v):
        return None
    return v


TIES = {}
ROWS = {}
EQUALISED = {}
SLACK = {}
# Scores closer than NEAR (in cosine similarity; x100 for the logits) may come out in either
# order from two float32 implementations of the same model. NEAR is measured where a float64
# copy of the model is available (SHADOW, modes `openclip` and `pretrained`): 4 x (the largest L2 error of a
# normalised float32 image embedding + that of a text embedding, against float64), which bounds
# the error of a cosine twice over (ours and the reference's); never below NEAR_FLOOR, the
# rounding of a float32 dot product.
NEAR_FLOOR = 1e-6
SHADOW = None


def near_from(err_image, err_text):
    """NEAR from the largest L2 errors of normalised float32 image and text embeddings."""
    return max(NEAR_FLOOR, 4 * (err_image + err_text))


def tied_rows(scores):
    """Rows of `scores` with two equal values among their best min(6, width)."""
    top = scores.float().topk(min(6, scores.shape[1]), dim=1)[0]
    return int(((top[:, 1:] == top[:, :-1]).any(dim=1)).sum())


def first_of_equal(rows):
    """For each row of a 2-D tensor, the index of the first row bit-identical to it."""
    first, seen = [], {}
    for i, r in enumerate(rows):
        key = r.contiguous().numpy().tobytes()
        first.append(seen.setdefault(key, i))
    return first


def equalise(scores, row_first, col_first):
    """`scores` with each column j replaced by column col_first[j] and then each row i by row
    row_first[i] (the first of its identical inputs), and how many values that changed."""
    out = scores.clone()
    cols = torch.tensor(col_first)
    out = out[:, cols]
    out = out[torch.tensor(row_first)]
    changed = int((~((out == scores) | (out.isnan() & scores.isnan()))).sum())
    return out, changed


def flippable(values, best, k, eps):
    """Rows whose hit/miss at top-k turns on a margin <= eps: `best` is the row's best positive
    score; a hit is near when it leads the (k+1)-th best score by <= eps, a miss when it trails
    the k-th by <= eps."""
    top = values.topk(min(k + 1, values.shape[1]), dim=1)[0]
    kth = top[:, k - 1]
    if top.shape[1] > k:
        margin = torch.where(best >= kth, best - top[:, k], kth - best)
    else:  # every candidate is in the top k: always a hit
        margin = torch.full_like(best, float("inf"))
    return margin <= eps


def ap_column(scores, truth):
    order = torch.sort(scores, 0, True)[1]
    t = truth[order]
    prec = t.cumsum(0) / torch.arange(1, len(t) + 1, dtype=torch.float64)
    return float(prec[t.bool()].sum() / max(float(t.sum()), 1))


def instrument(d, model):
    """Wrap the model's encoders (to record its inputs) and CLIP_benchmark's `run_classification`,
    `accuracy`, `average_precision_per_class` and `batchify` (retrieval) to see the scores it
    ranks: give identical inputs identical scores (`equalise`, counted in EQUALISED), count rows
    with exactly tied best scores (TIES, of ROWS), and bound per metric how far two float32
    implementations may differ through near-ties (SLACK: the sum of the metric's weights of the
    samples whose outcome turns on a margin <= NEAR)."""
    orig = (zsc.accuracy, zsc.average_precision_per_class, zsr.batchify,
            zsc.run_classification)
    slack = SLACK.setdefault(d, {})
    calls = [0]
    err = {"image": 0.0, "text": 0.0}
    # Every model input in call order, so `equalise` can tell identical images and captions.
    inputs = {"image": [], "text": []}
    firsts = {}
    encoders = {}
    for kind in ("image", "text"):
        name = f"encode_{kind}"
        encoders[name] = getattr(model, name)

        def recorded(x, _name=name, _kind=kind):
            inputs[_kind].append(x.detach().reshape(x.shape[0], -1).clone())
            out = encoders[_name](x)
            if SHADOW is not None:
                x64 = x.double() if x.is_floating_point() else x
                exact = F.normalize(getattr(SHADOW, _name)(x64), dim=-1)
                diff = (F.normalize(out.double(), dim=-1) - exact).norm(dim=-1).max()
                err[_kind] = max(err[_kind], float(diff))
            return out
        setattr(model, name, recorded)

    def first_of_inputs(kind):
        if kind not in firsts:
            firsts[kind] = first_of_equal(torch.cat(inputs[kind]))
        return firsts[kind]

    def run_classification(model_, classifier, dataloader, device, amp=True):
        inputs["image"].clear()
        logits, target = orig[3](model_, classifier, dataloader, device, amp=amp)
        logits, changed = equalise(logits, first_of_inputs("image"), first_of_equal(classifier.T))
        EQUALISED[d] = EQUALISED.get(d, 0) + changed
        return logits, target

    def near_eps():
        eps = near_from(err["image"], err["text"])
        slack["_near_eps"] = eps
        return eps

    def accuracy(output, target, topk=(1,)):
        TIES[d] = TIES.get(d, 0) + tied_rows(output)
        ROWS[d] = ROWS.get(d, 0) + output.shape[0]
        lg = output.double()
        n, classes = lg.shape
        t = lg[torch.arange(n), target]
        for k in topk:
            near = flippable(lg, t, k, near_eps() * 100)
            slack[f"acc{k}"] = float(near.sum()) / n
            if k == 1:
                counts = torch.bincount(target, minlength=classes).double()
                present = float((counts > 0).sum())
                slack["mean_per_class_recall"] = float((1.0 / (present * counts[target]))[near].sum())
        return orig[0](output, target, topk)

    def average_precision_per_class(scores, targets):
        # Per class: AP with each run of near-equal scores ordered positives-first vs -last.
        total = 0.0
        for k in range(scores.shape[1]):
            s = scores[:, k].double()
            order = torch.sort(s, 0, True)[1]
            sv, tv = s[order], targets[order, k].double()
            group = torch.cat([torch.zeros(1), ((sv[:-1] - sv[1:]) > near_eps() * 100).double()]).cumsum(0)
            best = torch.argsort(group * 2 - tv * 1e-3, stable=True)
            worst = torch.argsort(group * 2 + tv * 1e-3, stable=True)
            total += ap_column(-torch.arange(len(sv)).double(), tv[best]) - \
                ap_column(-torch.arange(len(sv)).double(), tv[worst])
        slack["mean_average_precision"] = total / scores.shape[1]
        return orig[1](scores, targets)

    def batchify(func, X, Y, batch_size, device, *args, **kwargs):
        # zeroshot_retrieval.evaluate calls: for each k, image retrieval (rows = texts), then
        # text retrieval (rows = images).
        k = kwargs["k"]
        name = "image" if calls[0] % 2 == 0 else "text"
        calls[0] += 1
        # Image retrieval ranks images per text, text retrieval texts per image.
        rows, cols = ("text", "image") if name == "image" else ("image", "text")
        row_first, col_first = first_of_inputs(rows), first_of_inputs(cols)
        if tuple(X.shape) != (len(row_first), len(col_first)):
            sys.exit(f"{d}: {name} retrieval scores {tuple(X.shape)} do not match the "
                     f"{len(row_first)} {rows} and {len(col_first)} {cols} inputs recorded")
        X, changed = equalise(X, row_first, col_first)
        if k == 1:
            EQUALISED[d] = EQUALISED.get(d, 0) + changed
            TIES[d] = TIES.get(d, 0) + tied_rows(X)
            ROWS[d] = ROWS.get(d, 0) + X.shape[0]
        x = X.double()
        best = torch.where(Y, x, torch.full_like(x, -float("inf"))).max(dim=1)[0]
        near = flippable(x, best, min(k, x.shape[1]), near_eps())
        slack[f"{name}_retrieval_recall@{k}"] = float(near.sum()) / x.shape[0]
        if k == 1 and name == "text":
            slack["mean_recall@1"] = 0.5 * (slack["image_retrieval_recall@1"] + slack["text_retrieval_recall@1"])
        return orig[2](func, X, Y, batch_size, device, *args, **kwargs)

    (zsc.accuracy, zsc.average_precision_per_class, zsr.batchify,
     zsc.run_classification) = accuracy, average_precision_per_class, batchify, run_classification

    def restore():
        (zsc.accuracy, zsc.average_precision_per_class, zsr.batchify,
         zsc.run_classification) = orig
        for name in encoders:
            delattr(model, name)
    return restore


def evaluate_dir(model, preprocess, tokenizer, d):
    restore = instrument(d, model)
    try:
        return evaluate_dir_inner(model, preprocess, tokenizer, d)
    finally:
        restore()


def evaluate_dir_inner(model, preprocess, tokenizer, d):
    type_file = os.path.join(d, "dataset_type.txt")
    retrieval = os.path.exists(type_file) and open(type_file).read().strip().lower() == "retrieval"
    task = "zeroshot_retrieval" if retrieval else "zeroshot_classification"
    ds = build_dataset(dataset_name="wds/eval", root=d, transform=preprocess, split="test",
                       task=task)
    loader = torch.utils.data.DataLoader(ds.batched(BATCH), batch_size=None, shuffle=False,
                                         num_workers=0)
    if retrieval:
        m = zsr.evaluate(model, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
        m["mean_recall@1"] = 0.5 * (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"])
    else:
        m = zsc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, device="cpu", amp=False)
    return {k: clean(float(v)) for k, v in m.items()}


def eval_transform(size):
    # open_clip's eval transform (Resize shortest side bicubic, CenterCrop, ToTensor, Normalize).
    return open_clip.image_transform(size, is_train=False)


def main():
    global SHADOW
    mode = sys.argv[1]
    if mode == "linear":
        proj, out, dirs = sys.argv[2], sys.argv[3], sys.argv[4:]
        p = load_file(proj)
        model = LinearClip(p["w_img"], p["e_txt"])
        size = int(p["image_size"].item())
        tok = open_clip.get_tokenizer("ViT-B-32")
        res = {d: evaluate_dir(model, eval_transform(size), tok, d) for d in dirs}
    elif mode == "openclip":
        cfg, seed, ckpt, out, dirs = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:]
        open_clip.add_model_config(cfg)
        name = os.path.splitext(os.path.basename(cfg))[0]
        torch.manual_seed(seed)
        model = open_clip.create_model(name, device="cpu", precision="fp32").eval()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, ckpt)
        tok = open_clip.get_tokenizer(name)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        global SHADOW
        SHADOW = copy.deepcopy(model).double()
        with torch.no_grad():
            res = {d: evaluate_dir(model, eval_transform(size), tok, d) for d in dirs}
    elif mode == "pretrained":
        export_dir, name, out, dirs = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
        open_clip.add_model_config(os.path.join(export_dir, name + ".json"))
        weights = os.path.join(export_dir, "open_clip_model.safetensors")
        model = open_clip.create_model(name, pretrained=weights, device="cpu",
                                       precision="fp32").eval()
        tok = open_clip.get_tokenizer(name)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        SHADOW = copy.deepcopy(model).double()
        with torch.no_grad():
            res = {d: evaluate_dir(model, eval_transform(size), tok, d) for d in dirs}
    elif mode == "topk":
        inp, out = sys.argv[2], sys.argv[3]
        res = {}
        for name, m in load_file(inp).items():
            ks = [k for k in (1, 2, 5, 10) if k <= m.shape[1]]
            res[name] = {"argmax": m.argmax(dim=1).tolist()}
            res[name].update({str(k): m.topk(k, dim=1)[1].tolist() for k in ks})
    elif mode == "aro":
        cfg, ckpt, out, d, kinds = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
        # KIND may be a comma-separated list (one process, one model load): {kind: metrics}.
        # ARO_DIR likewise (one folder per kind, or one for all).
        kinds, dirs = kinds.split(","), d.split(",")
        dirs = dirs if len(dirs) == len(kinds) else dirs[:1] * len(kinds)
        res = {k: aro(cfg, ckpt, dd, k) for k, dd in zip(kinds, dirs)}
    else:
        sys.exit(f"unknown mode {mode}")
    if mode in ("linear", "openclip", "pretrained"):
        res["_ties"] = TIES
        res["_rows"] = ROWS
        res["_equalised"] = EQUALISED
        res["_slack"] = SLACK
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


ARO_SYMMETRIC = ['adjusting', 'attached to', 'between', 'bigger than', 'biting', 'boarding', 'brushing', 'chewing', 'cleaning', 'climbing', 'close to', 'coming from', 'coming out of', 'contain', 'crossing', 'dragging', 'draped over', 'drinking', 'drinking from', 'driving', 'driving down', 'driving on', 'eating from', 'eating in', 'enclosing', 'exiting', 'facing', 'filled with', 'floating in', 'floating on', 'flying', 'flying above', 'flying in', 'flying over', 'flying through', 'full of', 'going down', 'going into', 'going through', 'grazing in', 'growing in', 'growing on', 'guiding', 'hanging from', 'hanging in', 'hanging off', 'hanging over', 'higher than', 'holding onto', 'hugging', 'in between', 'jumping off', 'jumping on', 'jumping over', 'kept in', 'larger than', 'leading', 'leaning over', 'leaving', 'licking', 'longer than', 'looking in', 'looking into', 'looking out', 'looking over', 'looking through', 'lying next to', 'lying on top of', 'making', 'mixed with', 'mounted on', 'moving', 'on the back of', 'on the edge of', 'on the front of', 'on the other side of', 'opening', 'painted on', 'parked at', 'parked beside', 'parked by', 'parked in', 'parked in front of', 'parked near', 'parked next to', 'perched on', 'petting', 'piled on', 'playing', 'playing in', 'playing on', 'playing with', 'pouring', 'reaching for', 'reading', 'reflected on', 'riding on', 'running in', 'running on', 'running through', 'seen through', 'sitting behind', 'sitting beside', 'sitting by', 'sitting in front of', 'sitting near', 'sitting next to', 'sitting under', 'skiing down', 'skiing on', 'sleeping in', 'sleeping on', 'smiling at', 'sniffing', 'splashing', 'sprinkled on', 'stacked on', 'standing against', 'standing around', 'standing behind', 'standing beside', 'standing in front of', 'standing near', 'standing next to', 'staring at', 'stuck in', 'surrounding', 'swimming in', 'swinging', 'talking to', 'topped with', 'touching', 'traveling down', 'traveling on', 'tying', 'typing on', 'underneath', 'wading in', 'waiting for', 'walking across', 'walking by', 'walking down', 'walking next to', 'walking through', 'working in', 'working on', 'worn on', 'wrapped around', 'wrapped in', 'by', 'of', 'near', 'next to', 'with', 'beside', 'on the side of', 'around']


@torch.no_grad()
def aro(cfg, ckpt, d, kind):
    from PIL import Image
    if cfg == "linear":
        # CKPT is the linear model's PROJ file (see `linear`).
        p = load_file(ckpt)
        model = LinearClip(p["w_img"], p["e_txt"])
        shadow = LinearClip(p["w_img"].double(), p["e_txt"].double())
        preprocess = eval_transform(int(p["image_size"].item()))
        tok = open_clip.get_tokenizer("ViT-B-32")
    else:
        open_clip.add_model_config(cfg)
        name = os.path.splitext(os.path.basename(cfg))[0]
        model = open_clip.create_model(name, device="cpu", precision="fp32").eval()
        model.load_state_dict(load_file(ckpt), strict=True)
        shadow = copy.deepcopy(model).double()
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        preprocess = eval_transform(size)
        tok = open_clip.get_tokenizer(name)
    ann = "visual_genome_relation.json" if kind == "relation" else "visual_genome_attribution.json"
    with open(os.path.join(d, ann)) as f:
        data = json.load(f)
    correct, margins, err = [], [], {"image": 0.0, "text": 0.0}
    for i in range(0, len(data), BATCH):
        batch = data[i:i + BATCH]
        imgs = []
        for t in batch:
            image = Image.open(os.path.join(d, "images", t["image_path"])).convert("RGB")
            image = image.crop((t["bbox_x"], t["bbox_y"], t["bbox_x"] + t["bbox_w"], t["bbox_y"] + t["bbox_h"]))
            imgs.append(preprocess(image))
        ie = F.normalize(model.encode_image(torch.stack(imgs)), dim=-1)
        caps = [c for t in batch for c in (t["false_caption"], t["true_caption"])]
        te = F.normalize(model.encode_text(tok(caps)), dim=-1).reshape(len(batch), 2, -1)
        scores = torch.einsum("bd,bkd->bk", ie, te).numpy()[:, None, :]
        preds = np.argmax(np.squeeze(scores, axis=1), axis=-1)
        correct.extend((preds == 1).tolist())
        # The same decisions in float64, and the float32 embeddings' distance from them (NEAR).
        ie64 = F.normalize(shadow.encode_image(torch.stack(imgs).double()), dim=-1)
        te64 = F.normalize(shadow.encode_text(tok(caps)), dim=-1).reshape(len(batch), 2, -1)
        err["image"] = max(err["image"], float((ie.double() - ie64).norm(dim=-1).max()))
        err["text"] = max(err["text"], float((te.double() - te64).norm(dim=-1).max()))
        s64 = torch.einsum("bd,bkd->bk", ie64, te64)
        margins.extend((s64[:, 1] - s64[:, 0]).abs().tolist())
    correct = np.array(correct)
    eps = near_from(err["image"], err["text"])
    near = np.array(margins) <= eps
    if kind == "relation":
        groups = np.array([t["relation_name"] for t in data])
        kept = [g for g in np.unique(groups) if (groups == g).sum() > 0 and g not in ARO_SYMMETRIC]
    else:
        groups = np.array([f"{t['attributes'][0]}_{t['attributes'][1]}" for t in data])
        min_count = 1 if kind == "attribution_min1" else 25
        kept = [g for g in np.unique(groups) if (groups == g).sum() >= min_count]
    records = [(g, correct[groups == g].mean()) for g in kept]
    macro = float(np.mean([a for _, a in records])) if records else None
    # What decisions within float32 noise (margin <= eps) could move, as in `instrument`.
    slack = {"_near_eps": eps, "accuracy": float(near.mean()),
             "macro_accuracy": float(np.mean([near[groups == g].mean() for g in kept])) if kept else 0.0}
    return {"accuracy": float(correct.mean()), "macro_accuracy": macro, "_slack": slack}


if __name__ == "__main__":
    main()
