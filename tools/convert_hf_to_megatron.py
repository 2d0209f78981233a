#!/usr/bin/env python
"""Hugging Face checkpoint -> Megatron distributed checkpoint (torch_dist, loads at any TP/PP).

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-Math-7B --output-dir ckpt/qwen7b --tp 2
    torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --hf-dir ... --output-dir ...

Streams one layer at a time; under torchrun the ranks share the layers. See --help and
`megarl.checkpoint.convert`.
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # required: Megatron's checkpointing can start spawn-method helpers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a plain checkout
    from megarl.checkpoint.convert import main_hf_to_megatron, run_tool

    sys.exit(run_tool(main_hf_to_megatron))
