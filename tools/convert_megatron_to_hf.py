#!/usr/bin/env python
"""Command line of `megarl.checkpoint.convert.megatron_to_hf`; see --help and that module.

Run from a checkout or an installed megarl; under torchrun for several processes where the
converter supports it. The `__main__` guard is required: Megatron's checkpointing starts
helper processes with the spawn method, which re-imports this file.
"""

import sys
from pathlib import Path

# Importable from a plain checkout too (tools/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megarl.checkpoint.convert import main_megatron_to_hf, run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main_megatron_to_hf))
