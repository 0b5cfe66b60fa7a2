"""Pieces of open_clip_train's training step that the reference benchmarks share
(train_step_bench.py, gpu_train_step.py, dp_scaling_openclip.py)."""


def decay_excluded(name, p):
    """open_clip_train's rule: no weight decay on gains, biases, norms and the logit scale."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(named):
    """AdamW groups as open_clip_train builds them: weight decay 0.2 except where excluded."""
    decay = [p for n, p in named if not decay_excluded(n, p) and p.requires_grad]
    plain = [p for n, p in named if decay_excluded(n, p) and p.requires_grad]
    return [{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}]


def image_size(model):
    """The square side of an open_clip model's image input."""
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size
