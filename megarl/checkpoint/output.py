"""Checkpoint outputs that appear complete or not at all.

Everything is written into a staging folder next to the output (same file system, so the
final step is a rename) whose name starts with a dot and says `.partial`; only a finished
conversion is renamed to the requested path. A failure removes the staging folder. An
existing output is refused unless `overwrite`, and then replaced only after the new one is
complete.

With `distributed=True` every rank of the default torch.distributed group enters the
context: rank 0 chooses the staging folder and does the renaming, the others write into it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch.distributed as dist


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Raise unless `output` may be written; call before any expensive work."""
    path = Path(output)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    return path


@contextlib.contextmanager
def staged_output(output: str | Path, overwrite: bool, *,
                  distributed: bool = False) -> Iterator[Path]:
    """Yield the staging folder; on success it becomes `output` (module docstring)."""
    path = check_output(output, overwrite).absolute()
    is_writer = not distributed or dist.get_rank() == 0
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    if distributed:
        shared = [str(staging)]
        dist.broadcast_object_list(shared, src=0)
        staging = Path(shared[0])
    if is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    if distributed:
        dist.barrier()
    try:
        yield staging
        if distributed:
            dist.barrier()
        if is_writer:
            _replace(staging, path, overwrite)
    except BaseException:
        if is_writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if distributed:
        dist.barrier()


def _replace(staging: Path, path: Path, overwrite: bool) -> None:
    if not path.exists():
        os.rename(staging, path)
        return
    if not overwrite:  # appeared while we were converting
        raise FileExistsError(f"{path} appeared during the conversion; the result was not kept")
    # Move the old one aside first, so that the output path is never a mix of the two.
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    os.rename(staging, path)
    shutil.rmtree(old)
