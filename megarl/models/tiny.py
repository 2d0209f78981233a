"""Scaled-down configs of the supported families and random checkpoints of them.

For tests, benchmarks and CPU demos: nothing is downloaded. Each config keeps what makes its
family distinctive (Qwen2.5: q/k/v bias; Qwen3: per-head q/k norm and a head_dim unrelated to
hidden/heads; Llama 3.1: llama3 RoPE scaling), uses grouped-query attention with several query
groups, and a vocabulary (300) that Megatron must pad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)

_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # Qwen2.5-Math-7B: theta 10k; the small Qwen2.5 sizes tie their embeddings.
    "qwen2": dict(rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False),
    # Qwen3-32B: head_dim 128 with hidden 5120 / 64 heads; here 24 with 64 / 4.
    "qwen3": dict(head_dim=24, rope_theta=1000000.0, max_position_embeddings=40960,
                  tie_word_embeddings=False),
    # Llama-3.1-8B: theta 500k, llama3 scaling with factor 8 from an 8192 context.
    "llama": dict(rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def tiny_config(family: str, **overrides: Any):
    """A transformers config of `family` (qwen2, qwen3, llama) at test size."""
    import transformers

    classes = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "llama": transformers.LlamaConfig}
    if family not in classes:
        raise ValueError(f"no tiny config for {family!r}; choose from {sorted(classes)}")
    return classes[family](**{**_COMMON, **_FAMILY_DEFAULTS[family], **overrides})


def random_hf_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers causal LM of `config` with random weights.

    Norm weights and biases are randomised too (HF initialises them to ones and zeros), so
    that a norm or bias put in the wrong place changes the outputs.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param) if "norm" in name
                            else 0.1 * torch.randn_like(param))
    return model.eval()


def save_random_hf_checkpoint(config, out_dir: str | Path, seed: int = 0,
                              dtype: torch.dtype = torch.float32):
    """Save a `random_hf_model` to `out_dir` (safetensors + config); returns the model."""
    model = random_hf_model(config, seed, dtype)
    model.save_pretrained(out_dir)
    return model


CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(alphabet: str | None = None):
    """A character-level fast tokenizer with Qwen-style chat tokens and a chat template.

    Ids: the three special tokens (pad `<|endoftext|>` = 0, `<|im_start|>`, eos `<|im_end|>`),
    then one id per character of `alphabet` (printable ASCII by default), then `<unk>`.
    Built locally, so tests and the CPU demo never need a model hub.
    """
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = alphabet if alphabet is not None else "".join(
        c for c in string.printable if c not in "\x0b\x0c")
    vocab = {tok: i for i, tok in enumerate(CHAT_SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=list(CHAT_SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
