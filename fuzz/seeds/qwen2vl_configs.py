"""Writes the JSON configs of a small Qwen2-VL as save_pretrained writes them (the files the
recaptioner's fine-tuning leaves in its model directory): config.json, generation_config.json,
preprocessor_config.json. Usage: python qwen2vl_configs.py OUT_DIR"""
import sys
from pathlib import Path

from transformers import GenerationConfig, Qwen2VLConfig
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
# The shape of recaptioner/finetune_qwen2vl.py's small preset (build_model), ids of its tokenizer.
text = dict(vocab_size=151657, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            tie_word_embeddings=False, eos_token_id=151645, pad_token_id=151643)
vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, in_channels=3,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                    video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                    tie_word_embeddings=False)
cfg.to_json_file(out / "config.json")
GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False).to_json_file(
    out / "generation_config.json")
Qwen2VLImageProcessor(min_pixels=3136, max_pixels=200704).to_json_file(out / "preprocessor_config.json")
