"""Weight sync: new weights from the trainer to the rollout servers after each optimizer step,
one strategy per transport (broadcast into a weight-update group; colocated CUDA tensors).

What the trainer calls, on every rank:

    sync = make_weight_sync(cfg.sync, servers.server_urls, rank=dist.get_rank())
    sync.connect()
    ... each step: sync.update(export_hf_weights(model), version=str(step))
    sync.close()

`export_hf_weights` stands for any iterator of (hf_name, tensor) pairs, e.g. Megatron's
streaming export; only global rank 0 joins the weight-update group (see `base`).
Names are imported lazily, so `import megarl.sync` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "WeightSync": "base", "DrainWeightSync": "base", "SyncStats": "base",
    "WeightSyncError": "base", "make_weight_sync": "base",
    "BroadcastWeightSync": "broadcast", "ColocatedWeightSync": "colocated",
    "Bucket": "buckets", "iter_buckets": "buckets",
    "WeightMismatchError": "verify", "tensor_checksum": "verify",
    "create_weight_update_group": "group",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megarl.sync' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
