from pathlib import Path

import pytest

from raykit.config import EmbedJob, JobConfig
from raykit.errors import ConfigError
from raykit.jobfile import load_job

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_dataclass_defaults():
    assert load_job(None) == JobConfig()


def test_overrides_get_the_field_types():
    job = load_job(None, ["train.lr=1e-4", "lora.rank=32", "eval.dims=[64,128]", "lora.target_modules=query",
                          "scaling.use_gpu=true", "output_dir=/tmp/x", "lora.alpha=8"])
    assert job.train.lr == 1e-4
    assert job.lora.rank == 32
    assert job.eval.dims == (64, 128)
    assert job.lora.target_modules == ("query",)
    assert job.scaling.use_gpu is True
    assert job.output_dir == "/tmp/x"
    assert job.lora.alpha == 8.0 and isinstance(job.lora.alpha, float)


def test_override_beats_yaml(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("train:\n  lr: 0.5\n  epochs: 2\n")
    job = load_job(p, ["train.lr=0.25"])
    assert (job.train.lr, job.train.epochs) == (0.25, 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("lr=3", "unknown key 'lr' (did you mean 'train.lr'?)"),
        ("lora.rnak=8", "did you mean 'lora.rank'"),
        ("train.batch_size=abc", "'train.batch_size' must be int, got str 'abc'"),
        ("train.epochs=1.5", "'train.epochs' must be int"),
        ("scaling.use_gpu=3", "'scaling.use_gpu' must be bool"),
        ("model.pooling=max", "model.pooling: 'max' is not one of mean, cls"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("deepspeed.offload_params=true", "needs zero_stage 3"),
        ("eval.dims=[128,64]", "ascending"),
        ("train.strategy=qlora", "train.strategy"),
        ("train.scheduler=step", "train.scheduler: 'step' is not one of cosine, linear, constant"),
        ("train.checkpoint_every=10min", "train.checkpoint_every: '10min' is neither a step count nor a duration; use e.g. 200, 10m or 0"),
        ("train.checkpoint_every=-5", "train.checkpoint_every: '-5' is neither"),
        ("run.max_failures=-2", "run.max_failures: -2 is below -1"),
        ("run.keep_checkpoints=0", "run.keep_checkpoints: 0 must be above 0"),
        ("train.report_to=[comet]", "train.report_to: 'comet' is not one of tensorboard, mlflow, wandb"),
        ("train.lr=.nan", "'train.lr' must be a finite number, got nan"),
        ("train.lr=.inf", "'train.lr' must be a finite number, got inf"),
        ("train.attention_dropout=1", "train.attention_dropout: 1.0 is outside [0, 1); use 0, e.g. 0.1, or -1 (the model's own)"),
        ("trainlr", "expected key=value"),
        ("train=3", "'train' must be a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_job(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_job(p)
    with pytest.raises(ConfigError, match="no such job file"):
        load_job(tmp_path / "missing.yaml")


def test_a_job_file_with_a_key_given_twice_or_not_utf8_is_refused_naming_the_line(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("train:\n  lr: 0.001\n  batch_size: 8\n  lr: 0.002\n")
    with pytest.raises(ConfigError, match=r"job.yaml:4: key 'lr' is given twice \(also at line 2\); keep one$"):
        load_job(p)
    p.write_bytes("train:\n  lr: 0.001  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"job.yaml:2: not UTF-8 \(byte 0xe9\); save it as UTF-8$"):
        load_job(p)


def test_config_is_frozen_and_picklable():
    import pickle

    job = load_job(None, ["lora.rank=4"])
    with pytest.raises(Exception):
        job.lora.rank = 8  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(job)) == job


def test_every_job_yaml_loads_and_shows_its_commands():
    jobs = sorted(p for p in (REPO / "jobs").glob("*.yaml") if p.name != "reembed_scifact.yaml")
    assert len(jobs) == 8, [j.name for j in jobs]  # quickstart, scifact x2, the four combinations, cold start
    embed = load_job(REPO / "jobs" / "reembed_scifact.yaml", ["model=runs/x/model"], EmbedJob)
    assert embed.corpus.endswith("scifact") and "raykit embed jobs/reembed_scifact.yaml" in (REPO / "jobs" / "reembed_scifact.yaml").read_text()
    for path in jobs:
        job = load_job(path)
        header = path.read_text().split("\n\n")[0]
        assert f"raykit train {path.relative_to(REPO)}" in header or path.name == "quickstart.yaml"
        assert "ray job submit" in header, path
        assert (job.data.train or job.synth.corpus) and job.eval.data, path


def test_a_tracker_needs_its_package_and_somewhere_to_write(monkeypatch):
    import importlib.util

    from raykit.train import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb needs the wandb package on every node; pip install wandb"):
        tracking.check(load_job(None, ["train.report_to=[wandb]"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="mlflow with an s3:// output_dir needs a tracking server; set MLFLOW_TRACKING_URI"):
        tracking.check(load_job(None, ["train.report_to=[mlflow]", "output_dir=s3://bucket/run"]))
    tracking.check(load_job(None, ["train.report_to=[tensorboard,mlflow]", "output_dir=runs/x"]))  # local: fine


@pytest.mark.parametrize("every, interval", [("200", (200, 0.0)), ("30s", (0, 30.0)), ("10m", (0, 600.0)), ("1.5h", (0, 5400.0)), ("0", (0, 0.0))])
def test_checkpoint_every_is_steps_or_a_duration(every, interval):
    assert load_job(str(REPO / "jobs" / "quickstart.yaml"), [f"train.checkpoint_every={every}"]).train.checkpoint_interval == interval
