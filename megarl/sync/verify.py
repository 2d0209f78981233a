"""Checking that every server holds exactly the trainer's weights after a sync.

While the weights stream past, `Fingerprints` records, per tensor, a SHA-256 of its bytes
(compared with the CPU dev server's /dev/weights_checksum, which hashes the same way) and its
first rows as float32 (compared with SGLang's /get_weights_by_name, which returns only the first
rows of a parameter, as float32). Rows of a bfloat16 or float16 tensor convert to float32
exactly, so both comparisons are bitwise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

DEV_SERVER_BACKEND = "megarl-dev-server"


class WeightMismatchError(RuntimeError):
    """A server's weights differ from the trainer's after a sync."""


def tensor_checksum(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes, with its dtype and shape."""
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Fingerprints:
    """Per-tensor checksums and first rows, recorded as the weights stream to the servers."""

    rows: int = 2
    checksums: dict[str, str] = field(default_factory=dict)
    first_rows: dict[str, list] = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.checksums[name] = tensor_checksum(tensor)
        self.first_rows[name] = tensor.detach()[: self.rows].float().cpu().tolist()

    def compare_checksums(self, server: str, theirs: dict[str, str]) -> list[str]:
        """Names whose checksum differs on `server` (or that it lacks)."""
        return [f"{server}: {name}" for name, mine in self.checksums.items()
                if theirs.get(name) != mine]

    def compare_rows(self, server: str, name: str, theirs: Any) -> list[str]:
        mine = self.first_rows[name]
        theirs = theirs[: self.rows] if isinstance(theirs, list) else theirs
        return [] if theirs == mine else [f"{server}: {name} (first {self.rows} rows differ)"]


def verify_servers(admin: Any, infos: list[dict], fingerprints: Fingerprints) -> None:
    """Compare every server with the fingerprints; raise WeightMismatchError listing all
    differences. Dev servers are compared by checksum, SGLang servers by first rows."""
    mismatches: list[str] = []
    if all(info.get("backend") == DEV_SERVER_BACKEND for info in infos):
        names = list(fingerprints.checksums)
        for url, sums in zip(admin.urls, admin.dev_checksums(names)):
            mismatches += fingerprints.compare_checksums(url, sums)
    else:
        for name in fingerprints.first_rows:
            for url, rows in zip(admin.urls, admin.weights_by_name(name, fingerprints.rows)):
                mismatches += fingerprints.compare_rows(url, name, rows)
    if mismatches:
        shown = "\n  ".join(mismatches[:20])
        more = f"\n  ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        raise WeightMismatchError(
            f"{len(mismatches)} weights differ between the trainer and the servers after the "
            f"sync:\n  {shown}{more}")
