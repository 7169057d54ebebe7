"""The training loop's decisions, in this process (the loop itself runs in every training test)."""

from __future__ import annotations


def test_progress_reaches_ray_train_at_most_once_per_controller_poll(monkeypatch):
    """ray.train.report blocks while the controller has not taken the last report (it polls every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a progress report goes to Ray Train only 1.5 polls after the
    last one; the loop sends evaluations regardless."""
    import ray.train

    from raykit.train.loop import _RayReports

    sent = []
    monkeypatch.setattr(ray.train, "report", sent.append)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")
    now = [0.0]
    reports = _RayReports(clock=lambda: now[0])
    due = []
    for step in range(1, 13):  # steps of 0.5 s, a progress report at each
        now[0] = step * 0.5
        due.append(reports.due())
        if due[-1]:
            reports.report({"step": step})
    assert [m["step"] for m in sent] == [1, 7] and due.count(True) == 2  # at 0.5 s, then 3 s later
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    assert abs(_RayReports().every - 0.15) < 1e-9  # as the controller is set to poll


class _HostWaits:
    """What raykit's own code calls during a block that, on a GPU, would make the host wait for the
    device's queued work: a value read back (`float(t)`, `.item()`, a tensor's truth, `.tolist()`,
    `.cpu()`), a tensor built from host data (`torch.tensor`, `as_tensor`, `from_numpy`), a blocking
    copy (`.to()` without non_blocking), or a factory with no device (a host tensor mixed in). A
    torch function mode sees every call, torch's own included; a call counts where raykit's code
    makes it itself (Tensor's Python methods, such as __float__, and the mode's dispatch skipped)."""

    READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"}
    FROM_HOST = {"tensor", "as_tensor", "from_numpy"}
    FACTORIES = {"arange", "zeros", "ones", "empty", "full", "rand", "randn", "eye"}

    def __init__(self):
        import sys
        from pathlib import Path

        from torch.overrides import TorchFunctionMode

        import raykit

        mine, found = str(Path(raykit.__file__).parent), []
        dispatch = {str(Path(__import__("torch").__file__).parent / name) for name in ("overrides.py", "_tensor.py")}

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename in dispatch:
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_filename.startswith(mine) and (
                        name in _HostWaits.READS or name in _HostWaits.FROM_HOST
                        or (name in _HostWaits.FACTORIES and "device" not in kwargs)
                        or (name == "to" and not kwargs.get("non_blocking") and _to_a_device(args[1:], kwargs))):
                    found.append(f"{name} at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
                return func(*args, **kwargs)

        self.mode, self.found = Mode(), found


def _to_a_device(args, kwargs) -> bool:
    """Whether a `.to(...)` names a device (a copy), not only a dtype."""
    import torch

    return "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)


def test_a_training_step_never_waits_for_its_device(tiny_model):
    """On a GPU the host queues a step's kernels while the device runs the last ones, unless the step
    reads a value back or builds a tensor from host data: each waits for all the GPU's queued work.
    raykit's step does neither (the rows' ids and teacher scores come prepared with the tokens, the
    gradient norm stays on the device until a report reads it), for in-batch and hard negatives with
    Matryoshka and L2-SP, for distillation, whole and in gradient-caching chunks. Checked here on a
    CPU, where the same calls show (the GPU check counts the waits themselves: bench/gpu_check.py)."""
    import numpy as np
    import torch

    from raykit.encoder import Encoder
    from raykit.jobfile import load_job
    from raykit.strategies import build_trainee
    from raykit.train.feed import prepare
    from raykit.train.loop import training_step

    rows = 4
    batch = {"query_id": np.arange(rows), "positive_id": np.arange(rows) + 100, "negative_id_0": np.arange(rows) + 200,
             "query": [f"query {i}" for i in range(rows)], "positive": [f"document {i} about pumps" for i in range(rows)],
             "negative_0": [f"another document {i}" for i in range(rows)],
             "positive_score": np.linspace(5, 8, rows), "negative_score_0": np.linspace(1, 2, rows)}
    cpu = torch.device("cpu")
    for extra in (["loss.matryoshka_dims=[16,32]", "train.l2sp=0.01"], ["loss.name=margin_mse", "loss.mini_batch_size=3"]):
        job = load_job(None, [f"model.name={tiny_model}", "data.train=unused.jsonl", "model.max_seq_length=16", "lora.rank=4",
                              f"train.batch_size={rows}", *extra])
        trainee = build_trainee(Encoder.load(job.model), job, total_steps=4, device=cpu, bf16=False)
        prepared = prepare(trainee.encoder.tokenizing(), batch, job.loss.mini_batch_size, cpu)
        watch = _HostWaits()
        with watch.mode:
            loss, norm, _ = training_step(trainee, prepared, job, cpu)
        assert watch.found == [], extra
        assert torch.isfinite(loss) and float(norm) > 0
