#!/usr/bin/env python
"""Megatron distributed checkpoint -> Hugging Face safetensors (one process, any training layout).

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/qwen7b \
        --output-dir qwen7b-rl --hf-config-dir Qwen2.5-Math-7B

Config and tokenizer files come from --hf-config-dir. See --help and
`megarl.checkpoint.convert`.
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # required: Megatron's checkpointing can start spawn-method helpers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a plain checkout
    from megarl.checkpoint.convert import main_megatron_to_hf, run_tool

    sys.exit(run_tool(main_megatron_to_hf))
