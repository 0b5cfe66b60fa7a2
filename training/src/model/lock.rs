//! Locked towers for fine-tuning, with open_clip's semantics (`--lock-image`,
//! `--lock-image-unlocked-groups`, `--lock-text`, `--lock-text-unlocked-layers`; LiT when the image
//! tower is locked whole).
//!
//! Locking a tower freezes all of its parameters, then unfreezes its last `unlocked` groups, where
//! the groups are open_clip's (`VisionTransformer.lock`, `transformer.lock_text_tower`):
//! - image: `[conv1, class_embedding, positional_embedding, ln_pre]`, one group per residual block
//!   but the last, `[last block, ln_post]`, `[proj]`;
//! - text: `[token_embedding, positional_embedding, cls_emb]`, one group per block but the last,
//!   `[last block, ln_final]`, `[text_projection]`.
//!
//! A ModifiedResNet image tower locks whole (open_clip has no groups for it, [`check`]); its
//! BatchNorm statistics keep updating unless `lock_image_freeze_bn_stats` is set, as open_clip's
//! `--lock-image-freeze-bn-stats`.
//!
//! Parameters outside those groups (an attention-pooling head, say) stay frozen with their tower,
//! as in open_clip; `logit_scale` and `logit_bias` belong to neither tower and stay trainable.
//! Frozen parameters get `requires_grad = false` and are left out of the optimizer (no update, no
//! weight decay, no moments in the checkpoint), as open_clip_train's optimizer groups skip
//! parameters that do not require gradients.

use crate::model::{ClipConfig, NamedTensors};

/// Which towers are locked, and how many of their last groups stay trainable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TowerLocks {
    /// `Some(k)`: the image tower is locked but for its last `k` groups.
    pub image: Option<usize>,
    /// `Some(k)`: the text tower is locked but for its last `k` groups.
    pub text: Option<usize>,
}

/// The index of residual block `i` in `name` after `prefix` (`transformer.resblocks.<i>.`).
fn block(name: &str, prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    rest.split('.').next()?.parse().ok()
}

/// The group of an image-tower parameter (`name` without `visual.`), out of `layers + 2`.
fn image_group(name: &str, layers: usize) -> Option<usize> {
    if name.starts_with("conv1.")
        || name == "class_embedding"
        || name == "positional_embedding"
        || name.starts_with("ln_pre.")
    {
        return Some(0);
    }
    if let Some(i) = block(name, "transformer.resblocks.") {
        return Some((i + 1).min(layers));
    }
    if name.starts_with("ln_post.") {
        return Some(layers);
    }
    (name == "proj").then_some(layers + 1)
}

/// The group of a text-tower parameter, out of `layers + 2`; `None` for parameters of neither
/// group (and for names that are not the text tower's).
fn text_group(name: &str, layers: usize) -> Option<usize> {
    if name.starts_with("token_embedding.") || name == "positional_embedding" || name == "cls_emb" {
        return Some(0);
    }
    if let Some(i) = block(name, "transformer.resblocks.") {
        return Some((i + 1).min(layers));
    }
    if name.starts_with("ln_final.") {
        return Some(layers);
    }
    (name == "text_projection" || name.starts_with("text_projection.")).then_some(layers + 1)
}

/// Whether `name` belongs to the text tower (everything outside `visual.` except the logit scale
/// and bias, and heads of ours such as the STC head).
fn in_text_tower(name: &str) -> bool {
    !name.starts_with("visual.")
        && !name.starts_with("logit_")
        && !name.starts_with(crate::model::stc::STC_PREFIX)
}

/// Whether parameter `name` of a model of `cfg` is frozen under `locks`.
pub fn is_frozen(name: &str, cfg: &ClipConfig, locks: &TowerLocks) -> bool {
    let unlocked = |group: Option<usize>, layers: usize, k: usize| match group {
        // Groups 0..=layers+1; the last k are trainable.
        Some(g) => k == 0 || g + k < layers + 2,
        None => true,
    };
    if let (Some(rest), Some(k)) = (name.strip_prefix("visual."), locks.image) {
        if cfg.vision_cfg.is_resnet() {
            // open_clip's ModifiedResNet.lock freezes the whole tower (no groups; see `check`).
            return true;
        }
        let layers = cfg.vision_cfg.layers.depth().max(0) as usize;
        return unlocked(image_group(rest, layers), layers, k);
    }
    if let (true, Some(k)) = (in_text_tower(name), locks.text) {
        let layers = cfg.text_cfg.layers.max(0) as usize;
        return unlocked(text_group(name, layers), layers, k);
    }
    false
}

/// Refuses locks the model cannot honour: open_clip's `ModifiedResNet.lock` supports no unlocked
/// groups (it asserts `unlocked_groups == 0`).
pub fn check(cfg: &ClipConfig, locks: &TowerLocks) -> Result<(), crate::TrainError> {
    match locks.image {
        Some(k) if k > 0 && cfg.vision_cfg.is_resnet() => Err(crate::TrainError::ModelConfig {
            field: "model.lock_image_unlocked_groups".into(),
            reason: format!(
                "{k} unlocked groups: a ModifiedResNet image tower locks whole or not at all, \
                 as in open_clip"
            ),
        }),
        _ => Ok(()),
    }
}

/// Freezes the locked parameters (`requires_grad = false`) and returns the trainable rest, in
/// order, with the number frozen.
pub fn apply(params: NamedTensors, cfg: &ClipConfig, locks: &TowerLocks) -> (NamedTensors, usize) {
    let mut frozen = 0;
    let trainable = params
        .into_iter()
        .filter_map(|(name, t)| {
            if is_frozen(&name, cfg, locks) {
                let _ = t.set_requires_grad(false);
                frozen += 1;
                None
            } else {
                Some((name, t))
            }
        })
        .collect();
    (trainable, frozen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_open_clip() {
        let cfg = ClipConfig::hq_tiny(); // 4 + 4 layers
        let l = |image, text| TowerLocks { image, text };
        let frozen = |n: &str, locks| is_frozen(n, &cfg, &locks);
        // Whole tower locked (LiT): every image parameter, nothing else.
        assert!(frozen("visual.conv1.weight", l(Some(0), None)));
        assert!(frozen("visual.proj", l(Some(0), None)));
        assert!(!frozen("logit_scale", l(Some(0), None)));
        assert!(!frozen("token_embedding.weight", l(Some(0), None)));
        // One group unlocked: the projection only.
        assert!(!frozen("visual.proj", l(Some(1), None)));
        assert!(frozen("visual.ln_post.weight", l(Some(1), None)));
        // Two: + the last block with ln_post.
        assert!(!frozen("visual.ln_post.bias", l(Some(2), None)));
        assert!(!frozen(
            "visual.transformer.resblocks.3.mlp.c_fc.weight",
            l(Some(2), None)
        ));
        assert!(frozen(
            "visual.transformer.resblocks.2.mlp.c_fc.weight",
            l(Some(2), None)
        ));
        // All groups (and more than there are).
        assert!(!frozen("visual.conv1.weight", l(Some(6), None)));
        assert!(!frozen("visual.conv1.weight", l(Some(60), None)));
        assert!(frozen("visual.conv1.weight", l(Some(5), None)));
        // Text: the same shape of groups; the STC head is never part of a tower.
        assert!(frozen("token_embedding.weight", l(None, Some(0))));
        assert!(!frozen("text_projection", l(None, Some(1))));
        assert!(frozen("ln_final.weight", l(None, Some(1))));
        assert!(!frozen("ln_final.weight", l(None, Some(2))));
        assert!(!frozen("stc_head.fc1.weight", l(Some(0), Some(0))));
        assert!(!frozen("visual.proj", l(None, Some(0))));
    }
}
