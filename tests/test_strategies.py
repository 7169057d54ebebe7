import pytest
import torch
from helpers import QUICKSTART

from raykit.config import DataConfig, DeepSpeedConfig, LoraConfig, ModelConfig, TrainConfig
from raykit.encoder import Encoder
from raykit.errors import ConfigError
from raykit.strategies.full import deepspeed_config
from raykit.strategies.lora import apply_lora, export_lora

TEXTS = ["lora adapters", "a frozen base model with a longer sentence"]


def test_lora_trains_only_adapters_of_the_targets(tiny_model):
    encoder = Encoder.load(ModelConfig(name=tiny_model))
    apply_lora(encoder, LoraConfig(rank=4, alpha=8, target_modules=("query", "value")))
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable, "no trainable parameters"
    assert all(("lora_A" in n or "lora_B" in n) for n in trainable)
    assert all((".query." in n or ".value." in n) for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x {query, value} x {A, B}
    # Every base weight is still there, and frozen.
    base = [n for n, p in encoder.named_parameters() if "lora_" not in n]
    assert len(base) == len(list(Encoder.load(ModelConfig(name=tiny_model)).parameters()))
    assert not any(p.requires_grad for n, p in encoder.named_parameters() if "lora_" not in n)


def test_lora_with_zero_b_equals_the_base_model(tiny_model):
    base = Encoder.load(ModelConfig(name=tiny_model)).eval()
    expected = base.encode(TEXTS, role="document")
    encoder = Encoder.load(ModelConfig(name=tiny_model)).eval()
    apply_lora(encoder, LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=("query", "key", "value", "dense")))
    torch.testing.assert_close(encoder.encode(TEXTS, role="document"), expected)  # peft initializes B = 0


def test_lora_typo_lists_the_module_names(tiny_model):
    encoder = Encoder.load(ModelConfig(name=tiny_model))
    with pytest.raises(ConfigError) as e:
        apply_lora(encoder, LoraConfig(target_modules=("q_proj",)))
    assert "'q_proj' matches no Linear layer" in str(e.value)
    for name in ("query", "key", "value", "dense"):
        assert name in str(e.value)


def test_merged_export_loads_without_peft_and_matches(tiny_model, tmp_path):
    encoder = Encoder.load(ModelConfig(name=tiny_model)).eval()
    apply_lora(encoder, LoraConfig(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # move the adapters off zero so the merge has something to merge
        for n, p in encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapted = encoder.encode(TEXTS, role="document")
    export_lora(encoder, str(tmp_path / "model"))
    merged = Encoder.load(ModelConfig(name=str(tmp_path / "model"))).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged.encode(TEXTS, role="document"), adapted, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = Encoder.load(ModelConfig(name=tiny_model)).eval().encode(TEXTS, role="document")
    assert not torch.allclose(adapted, base, atol=1e-3)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_is_derived_from_the_train_config(stage):
    train = TrainConfig(strategy="full", batch_size=24, max_grad_norm=0.5, lr=3e-5)
    ds = DeepSpeedConfig(zero_stage=stage, offload_optimizer=True, offload_params=stage == 3)
    cfg = deepspeed_config(train, ds, bf16=True)
    assert cfg["train_micro_batch_size_per_gpu"] == 24
    assert cfg["gradient_accumulation_steps"] == 1
    assert "train_batch_size" not in cfg  # DeepSpeed derives it from micro batch x world size
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in cfg["zero_optimization"]) == (stage == 3)
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours go in as client objects, lr set once
    plain = deepspeed_config(train, DeepSpeedConfig(zero_stage=stage), bf16=False)
    assert plain["bf16"] == {"enabled": False} and "offload_optimizer" not in plain["zero_optimization"]


class _Payload:
    """What a hostile checkpoint could carry: an object whose unpickling runs code."""

    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_lora_state_round_trips_and_loads_no_pickled_code(tiny_model, tmp_path):
    import pickle

    from raykit.config import JobConfig
    from raykit.strategies.lora import LoraTrainee

    job = JobConfig(model=ModelConfig(name=tiny_model), lora=LoraConfig(rank=4, alpha=8))
    trainee = LoraTrainee(Encoder.load(job.model), job, total_steps=10, device=torch.device("cpu"), bf16=False)
    trainee.step(trainee(trainee.encoder.tokenize(TEXTS, role="document")).sum())  # one real step: optimizer state to save
    trainee.save_state(str(tmp_path), rank=0)
    again = LoraTrainee(Encoder.load(job.model), job, total_steps=10, device=torch.device("cpu"), bf16=False)
    again.load_state(str(tmp_path))
    assert again.lr == trainee.lr
    for (name, p), (_, q) in zip(trainee.encoder.named_parameters(), again.encoder.named_parameters()):
        assert torch.equal(p, q), name

    state = torch.load(tmp_path / "lora_state.pt", weights_only=True)
    torch.save({**state, "extra": _Payload()}, tmp_path / "lora_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        again.load_state(str(tmp_path))


def test_deepspeed_state_round_trips_and_loads_no_pickled_code(tiny_model, tmp_path, monkeypatch):
    """ZeRO-2 in fp32 and bf16, in this process (one gloo group for both: DeepSpeed keeps the groups it
    sees for the life of the process). DeepSpeed's own load would unpickle anything."""
    import pickle
    import socket

    import torch.distributed as dist

    from raykit.config import JobConfig
    from raykit.strategies.full import CHECKPOINT_TAG, DeepSpeedTrainee

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for bf16 in (False, True):
            job = JobConfig(model=ModelConfig(name=tiny_model), train=TrainConfig(strategy="full"), deepspeed=DeepSpeedConfig(zero_stage=2))
            trainee = DeepSpeedTrainee(Encoder.load(job.model), job, total_steps=10, device=torch.device("cpu"), bf16=bf16)
            trainee.step(trainee(trainee.encoder.tokenize(TEXTS, role="document")).float().sum())
            trainee.save_state(str(tmp_path / str(bf16)), rank=0)
            again = DeepSpeedTrainee(Encoder.load(job.model), job, total_steps=10, device=torch.device("cpu"), bf16=bf16)
            again.load_state(str(tmp_path / str(bf16)))
            assert again.lr == trainee.lr
            for (name, p), (_, q) in zip(trainee.encoder.named_parameters(), again.encoder.named_parameters()):
                assert torch.equal(p, q), name

            optimizer_file = next((tmp_path / str(bf16) / CHECKPOINT_TAG).glob("*optim_states.pt"))
            state = torch.load(optimizer_file, weights_only=False)
            torch.save({**state, "extra": _Payload()}, optimizer_file)
            with pytest.raises(pickle.UnpicklingError):
                again.load_state(str(tmp_path / str(bf16)))
    finally:
        dist.destroy_process_group()


def test_lora_evaluates_with_the_adapters_merged_and_the_base_restored_bit_for_bit(tiny_model):
    """Evaluation runs the plain model's forward (adapters merged into the weights); after it the frozen
    base is exactly what it was (peft's unmerge alone rounds), and training goes on from the adapters."""
    from peft.tuners.lora import LoraLayer

    from raykit.config import JobConfig
    from raykit.strategies.lora import LoraTrainee

    job = JobConfig(model=ModelConfig(name=tiny_model), lora=LoraConfig(rank=4, alpha=8, dropout=0.0))
    trainee = LoraTrainee(Encoder.load(job.model), job, total_steps=10, device=torch.device("cpu"), bf16=False)
    with torch.no_grad():
        for n, p in trainee.encoder.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    trainee.encoder.eval()
    base = {n: p.detach().clone() for n, p in trainee.encoder.named_parameters() if "lora_" not in n}
    adapted = trainee.encoder.encode(TEXTS, role="document")
    with trainee.evaluating():
        layers = [m for m in trainee.encoder.modules() if isinstance(m, LoraLayer)]
        assert layers and all(m.merged for m in layers)
        torch.testing.assert_close(trainee.encoder.encode(TEXTS, role="document"), adapted, atol=1e-5, rtol=1e-4)
    assert not any(m.merged for m in layers)
    for n, p in trainee.encoder.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    trainee.encoder.train()
    trainee.step(trainee(trainee.encoder.tokenize(TEXTS, role="document")).sum())
    assert all(torch.equal(p, base[n]) for n, p in trainee.encoder.named_parameters() if "lora_" not in n)


def test_a_compiled_encoder_trains_evaluates_and_exports_as_the_eager_one(tiny_model, tmp_path):
    """scaling.compile changes the speed, not the result. LoRA steps through torch.compile (TorchInductor,
    really compiled here) give the eager steps' losses and gradient norms, evaluation with the adapters
    merged gives the eager embeddings, and the export the same weights under the same names. The trace
    has no graph break: one whole graph per mode (training, merged evaluation), not fragments between
    eager ops."""
    import safetensors.torch
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters

    from raykit.data import load_training_set
    from raykit.jobfile import load_job
    from raykit.strategies import build_trainee
    from raykit.train.loop import training_step

    torch._dynamo.reset()
    counters.clear()
    table = load_training_set(DataConfig(train=str(QUICKSTART)), seed=0)
    cpu = torch.device("cpu")
    runs = {}
    # compiled dropout draws from a generator of its own unless it falls back to eager's, as here: then the runs compare
    with torch._inductor.config.patch(fallback_random=True):
        for compile in (False, True):
            job = load_job(None, [f"model.name={tiny_model}", f"data.train={QUICKSTART}", "model.max_seq_length=32",
                                  "lora.rank=4", "train.batch_size=8", f"scaling.compile={compile}"])
            torch.manual_seed(0)
            trainee = build_trainee(Encoder.load(job.model), job, total_steps=10, device=cpu, bf16=False)
            steps = [training_step(trainee, table.slice(8 * i, 8).to_pydict(), job, cpu)[:2] for i in range(3)]
            trainee.encoder.eval()
            with trainee.evaluating():
                embedded = trainee.encoder.encode(TEXTS, role="query")
            trainee.export(str(tmp_path / str(compile) / "model"), rank=0)
            runs[compile] = [(loss.item(), float(norm)) for loss, norm in steps], embedded
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["graph_break"])
    (eager, eager_embedded), (compiled, compiled_embedded) = runs[False], runs[True]
    assert compiled == [pytest.approx(step, rel=1e-5) for step in eager]
    torch.testing.assert_close(compiled_embedded, eager_embedded, atol=1e-6, rtol=1e-5)
    saved = [safetensors.torch.load_file(tmp_path / str(c) / "model" / "model.safetensors") for c in (False, True)]
    assert saved[0].keys() == saved[1].keys()
    for name, weight in saved[0].items():
        torch.testing.assert_close(saved[1][name], weight, atol=1e-6, rtol=1e-5)
