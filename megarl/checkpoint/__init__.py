"""Hugging Face <-> Megatron checkpoints: per-family adapters, TP/PP layout, distributed save/load.

What the rest of megarl calls (every function collective over the trainer ranks):
- `model_io.load_hf_into_model(chunks, hf_dir, ctx)`: HF safetensors straight into live shards;
- `model_io.save_megatron_checkpoint` / `load_megatron_checkpoint`: torch_dist checkpoints of
  the weights, loadable at any TP/PP;
- `export.export_hf_weights(chunks, shape, ctx)` and `export.bucket_by_bytes`: the streaming
  HF-named export used by weight sync (tensors arrive on global rank 0 only);
- `convert.hf_to_megatron` / `convert.megatron_to_hf`: the offline tools;
- `verify`: the `megarl verify-conversion` command.

Inside: `adapters` (one per family, registered by HF model_type) over `transforms` (pure
layout changes), `megatron_layout` (TP split rules, canonical names), `hf_io` (safetensors by
name), `dist_io` (torch_dist written and read a unit at a time), `output` (outputs that are
complete or absent), `manifest` (what a megarl checkpoint holds).
"""
