"""Training checkpoints: what one holds, how it is sealed, and how a run gets back to the latest sound one.

A checkpoint folder holds the strategy's state (LoRA adapters and optimizer, or DeepSpeed's shards),
`state.json` (rank 0: step, history, evaluations), one `worker_<rank>.pt` per rank (its RNG state and
the digest of the batches it trained on: what makes a resumed run continue exactly) and one
`files_<rank>.json` per rank: the size and sha256 of every file that rank wrote. Ray Train uploads
each rank's folder into one checkpoint directory and keeps the newest `run.keep_checkpoints`.

On resume every rank checks the latest checkpoint against those lists (the same files, so the same
answer on every rank). A damaged one (a truncated upload, a lost file) costs one warning line, and the
run resumes from the one before it. Everything loads without unpickling code: JSON, and torch files
read with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

STATE_FILE = "state.json"
log = logging.getLogger(__name__)


def save(trainee, state: dict, rank: int, world: int, step: int, metrics: dict, batches_sha256: str,
         export: bool = False, evaluation: dict | None = None) -> None:
    """Save this rank's part of a checkpoint to a local folder and hand it to Ray Train to persist
    (collective: every rank calls it at the same step)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        trainee.save_state(tmp, rank)
        if export:
            trainee.export(os.path.join(tmp, "model"), rank)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps({**state, "world": world}))
            if evaluation:
                Path(tmp, "eval.json").write_text(json.dumps(evaluation, indent=2))
        torch.save({"batches_sha256": batches_sha256, **_rng_state()}, Path(tmp, f"worker_{rank}.pt"))
        _seal(tmp, rank)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            # by step, so the newest sorts last; a resumed attempt's get their own names, so a
            # checkpoint written again at the same step never lands in a folder Ray Train already holds
            checkpoint_dir_name=f"checkpoint_{step:08d}" + (f"-r{len(state['resumed_from'])}" if state.get("resumed_from") else ""),
        )


def resume(trainee, checkpoint, rank: int) -> tuple[dict, str] | None:
    """Load the latest sound checkpoint at or before `checkpoint` into `trainee` and this process's RNG.

    Returns (the run's state, this rank's batch digest), or None when there is nothing to resume. The
    state's `damaged_checkpoints` lists those passed over (run.json keeps the list).
    """
    damaged = []
    for candidate in _newest_first(checkpoint):
        # A folder of this rank's own: Checkpoint.as_directory() shares one download among the node's
        # processes and deletes it when one of them is done, under another still reading (a resumed
        # 2-worker run failed in torch.load with "file read failed" on a checkpoint whose files
        # matched their sha256).
        with tempfile.TemporaryDirectory(prefix=f"raykit-resume-{rank}-") as path:
            candidate.to_directory(path)
            damage = _damage(path)
            if damage:
                damaged.append(f"{_name(candidate)}: {damage}")
                if rank == 0:
                    log.warning(f"checkpoint {_name(candidate)} is damaged ({damage}); resuming from the one before it")
                continue
            trainee.load_state(path)
            state = json.loads(Path(path, STATE_FILE).read_text())
            worker = torch.load(Path(path, f"worker_{rank}.pt"), weights_only=True)
        _set_rng_state(worker)
        state["damaged_checkpoints"] = state.get("damaged_checkpoints", []) + damaged
        return state, worker["batches_sha256"]
    if checkpoint and rank == 0:
        log.warning("no sound checkpoint left: training starts from step 0")
    return None


def latest_kept(folder: str):
    """The newest checkpoint in `folder` (the run's storage_path/name), for when Ray Train hands none:
    its record of the run's checkpoints (a snapshot its controller writes after registering each) may
    not have reached storage before the run died, as when the store went away. Sound or not is
    `resume`'s to check. None when there is none."""
    import pyarrow.fs
    import ray.train

    from raykit import storage

    path, fs = storage.ray_storage(folder)
    fs = fs or pyarrow.fs.LocalFileSystem()
    found = [f.base_name for f in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
             if f.type == pyarrow.fs.FileType.Directory and f.base_name.startswith("checkpoint_")]
    return ray.train.Checkpoint(path=f"{path}/{max(found)}", filesystem=fs) if found else None


def _seal(folder: str, rank: int) -> None:
    files = {str(f.relative_to(folder)): [f.stat().st_size, _sha256(f)] for f in sorted(Path(folder).rglob("*")) if f.is_file()}
    Path(folder, f"files_{rank}.json").write_text(json.dumps(files))


def _damage(folder: str) -> str | None:
    """What is wrong with a checkpoint folder, or None when every rank's files are there and intact."""
    try:
        world = json.loads(Path(folder, STATE_FILE).read_text())["world"]
        lists = [json.loads(Path(folder, f"files_{r}.json").read_text()) for r in range(world)]
    except (OSError, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    for files in lists:
        for name, (size, sha) in files.items():
            f = Path(folder, name)
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
            if _sha256(f) != sha:
                return f"{name} does not match its sha256"
    return None


def _newest_first(checkpoint):
    """`checkpoint`, then the older checkpoints beside it (Ray Train keeps the newest few)."""
    if not checkpoint:
        return
    yield checkpoint
    import pyarrow.fs
    import ray.train

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    siblings = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((s.base_name for s in siblings if s.base_name.startswith("checkpoint_") and s.base_name < name), reverse=True)
    for sibling in older:
        yield ray.train.Checkpoint(path=f"{parent}/{sibling}", filesystem=fs)


def _name(checkpoint) -> str:
    return checkpoint.path.rstrip("/").rsplit("/", 1)[-1]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _rng_state() -> dict:
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(worker: dict) -> None:
    # dropout draws from these: restored, a resumed run's steps are the uninterrupted run's
    torch.set_rng_state(worker["torch_rng"])
    if worker["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(worker["cuda_rng"])
