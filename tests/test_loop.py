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
