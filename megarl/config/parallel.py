"""`parallel`: how the trainer ranks are split into tensor, pipeline, context, expert and data
parallel groups. Data parallelism is what is left of the world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError, check_positive


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: ranks that split each layer's weights (and the vocabulary)."""

    pp: int = 1
    """Pipeline-parallel size: ranks that split the layers into stages."""

    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved schedule); null for none. Needs pp > 1."""

    cp: int = 1
    """Context-parallel size: ranks that split each sequence."""

    ep: int = 1
    """Expert-parallel size (mixture-of-experts models only)."""

    sequence_parallel: bool = False
    """Shard activations along the sequence inside tensor-parallel regions. Needs tp > 1."""

    timeout_minutes: int = 30
    """Time-out of trainer collectives before a hung rank fails the run."""

    def validate(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "timeout_minutes"):
            check_positive("parallel", name, getattr(self, name))
        if self.vpp is not None:
            check_positive("parallel", "vpp", self.vpp)
            if self.pp == 1:
                raise ConfigError("parallel.vpp", f"{self.vpp} needs parallel.pp > 1 (pp is 1)")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel", "true needs parallel.tp > 1 (tp is 1)")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp
