import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_two
from torch.nn.parallel import DistributedDataParallel

from raykit.losses import mnr_loss

B, D_IN, D = 4, 12, 8  # per-worker batch; global batch is 2*B


def make_batch(seed=0, negatives=False):
    g = torch.Generator().manual_seed(seed)
    xq, xd, xn = (torch.randn(2 * B, D_IN, generator=g) for _ in range(3))
    qid = torch.arange(2 * B)
    pid = torch.arange(100, 100 + 2 * B)
    # duplicates across the two workers' halves: doc of row 1 is also row 6's positive (same doc text),
    # and row 2 and row 5 are the same query with two different positives.
    xd[6], pid[6] = xd[1], pid[1]
    xq[5], qid[5] = xq[2], qid[2]
    nid = torch.arange(200, 200 + 2 * B)
    return xq, xd, (xn if negatives else None), qid, pid, (nid if negatives else None)


def encoder(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(D_IN, D)


def embed(model, x):
    return F.normalize(model(x), dim=-1)


def _single(negatives):
    xq, xd, xn, qid, pid, nid = make_batch(negatives=negatives)
    model = encoder()
    loss = mnr_loss(embed(model, xq), embed(model, xd), qid, pid, scale=20.0,
                    negatives=embed(model, xn) if xn is not None else None, negative_ids=nid, gather=False)
    loss.backward()
    return loss.detach(), model.weight.grad.clone(), model.bias.grad.clone()


def _worker(rank, out_path):
    """Both cases, pairs and hard negatives, in one pair of processes (each start costs seconds)."""
    results = {}
    for negatives in (False, True):
        xq, xd, xn, qid, pid, nid = make_batch(negatives=negatives)
        part = slice(rank * B, (rank + 1) * B)
        model = DistributedDataParallel(encoder())
        loss = mnr_loss(embed(model, xq[part]), embed(model, xd[part]), qid[part], pid[part], scale=20.0,
                        negatives=embed(model, xn[part]) if xn is not None else None,
                        negative_ids=nid[part] if nid is not None else None, gather=True)
        loss.backward()  # DDP averages the parameter grads over the 2 workers
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[negatives] = (mean_loss / 2, model.module.weight.grad, model.module.bias.grad)
    if rank == 0:
        torch.save(results, out_path)


def test_two_workers_equal_one_process_on_the_concatenated_batch(tmp_path):
    run_two(_worker, str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt")
    for negatives in (False, True):  # pairs, then with hard negatives
        loss2, w2, b2 = results[negatives]
        loss1, w1, b1 = _single(negatives)
        torch.testing.assert_close(loss2, loss1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w2, w1, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b2, b1, atol=1e-5, rtol=1e-4)


def test_matches_plain_cross_entropy_without_duplicates():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(5, D), dim=-1), F.normalize(torch.randn(5, D), dim=-1)
    ids = torch.arange(5)
    expected = F.cross_entropy(20.0 * q @ d.T, torch.arange(5))
    torch.testing.assert_close(mnr_loss(q, d, ids, ids + 10, scale=20.0, gather=False), expected)


def test_a_duplicated_positive_is_not_a_negative():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(3, D), dim=-1), F.normalize(torch.randn(3, D), dim=-1)
    d[2] = d[0]  # the same document twice in the batch
    pid = torch.tensor([7, 8, 7])
    loss = mnr_loss(q, d, torch.arange(3), pid, scale=20.0, gather=False)
    logits = 20.0 * q @ d.T
    # query 0 sees its positive (col 0) and col 1; col 2 is its own document again and is left out
    expected = torch.stack([
        -logits[0, 0] + torch.logsumexp(logits[0, [0, 1]], 0),
        -logits[1, 1] + torch.logsumexp(logits[1, [0, 1, 2]], 0),
        -logits[2, 2] + torch.logsumexp(logits[2, [1, 2]], 0),
    ]).mean()
    torch.testing.assert_close(loss, expected)
    # and a query's second positive is not a negative for its first
    loss_q = mnr_loss(q, d, torch.tensor([1, 1, 2]), torch.tensor([10, 11, 12]), scale=20.0, gather=False)
    expected_q = torch.stack([
        -logits[0, 0] + torch.logsumexp(logits[0, [0, 2]], 0),
        -logits[1, 1] + torch.logsumexp(logits[1, [1, 2]], 0),
        -logits[2, 2] + torch.logsumexp(logits[2, [0, 1, 2]], 0),
    ]).mean()
    torch.testing.assert_close(loss_q, expected_q)


def test_k_negatives_per_query_are_extra_candidates():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(4, D), dim=-1), F.normalize(torch.randn(4, D), dim=-1)
    n = F.normalize(torch.randn(4, 3, D), dim=-1)  # 3 hard negatives per query
    ids = torch.arange(4)
    cands = torch.cat([d, n.reshape(-1, D)])  # positives, then every negative
    expected = F.cross_entropy(20.0 * q @ cands.T, torch.arange(4))
    got = mnr_loss(q, d, ids, ids + 10, scale=20.0, negatives=n, negative_ids=torch.arange(100, 112).reshape(4, 3), gather=False)
    torch.testing.assert_close(got, expected)


def test_matryoshka_sums_the_base_loss_over_renormalized_prefixes():
    from raykit.losses import matryoshka_loss

    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(5, D), dim=-1), F.normalize(torch.randn(5, D), dim=-1)
    ids = torch.arange(5)

    def base(a, b, n):
        assert n is None
        return mnr_loss(a, b, ids, ids + 10, gather=False)

    got = matryoshka_loss(base, (q, d, None), dims=(2, 4, D), weights=(1.0, 0.5, 2.0))
    expected = (base(F.normalize(q[:, :2], dim=-1), F.normalize(d[:, :2], dim=-1), None)
                + 0.5 * base(F.normalize(q[:, :4], dim=-1), F.normalize(d[:, :4], dim=-1), None)
                + 2.0 * base(q, d, None))
    torch.testing.assert_close(got, expected)
    # gradients reach the whole embedding, the early dims from every term
    x = torch.randn(5, D, requires_grad=True)
    matryoshka_loss(base, (F.normalize(x, dim=-1), d, None), dims=(2, D)).backward()
    assert x.grad[:, :2].abs().sum() > 0 and x.grad[:, 2:].abs().sum() > 0


def test_margin_mse_and_kl_match_their_definitions():
    from raykit.losses import kl_loss, margin_mse_loss

    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(3, D), dim=-1), F.normalize(torch.randn(3, D), dim=-1)
    n = F.normalize(torch.randn(3, 2, D), dim=-1)
    tp, tn = torch.tensor([5.0, 3.0, 1.0]), torch.tensor([[1.0, 2.0], [0.0, 3.0], [2.0, -1.0]])
    sp = 20 * (q * p).sum(-1)
    sn = 20 * torch.einsum("bd,bkd->bk", q, n)
    expected = (((sp[:, None] - sn) - (tp[:, None] - tn)) ** 2).mean()
    torch.testing.assert_close(margin_mse_loss(q, p, n, tp, tn, scale=20.0), expected)
    s = torch.cat([sp[:, None], sn], 1)
    t = torch.cat([tp[:, None], tn], 1) / 2.0
    expected_kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    torch.testing.assert_close(kl_loss(q, p, n, tp, tn, scale=20.0, temperature=2.0), expected_kl)
    # a student whose margins equal the teacher's has zero MarginMSE
    assert margin_mse_loss(q, p, n, sp.detach(), sn.detach(), scale=20.0) < 1e-8


# --- gradient caching (loss.mini_batch_size) ----------------------------------------------------------

def _cache_batch(rank: int) -> dict:
    """4 rows per worker with one hard negative each; a document shared across the two workers."""
    from helpers import QUICKSTART

    docs = [json.loads(line)["text"] for line in (QUICKSTART / "corpus.jsonl").read_text().splitlines()[:24]]
    rows = range(4 * rank, 4 * rank + 4)
    return {
        "query": [docs[i][:60] for i in rows], "query_id": [i for i in rows],
        "positive": [docs[i] for i in rows], "positive_id": [100 + i for i in rows],
        "negative_0": [docs[8 + i] if i != 5 else docs[1] for i in rows], "negative_id_0": [200 + i if i != 5 else 101 for i in rows],
    }


STRATEGIES = {"lora": ["lora.rank=4"], "zero2": ["train.strategy=full", "deepspeed.zero_stage=2"]}


def _cache_worker(rank: int, tiny_model: str, out: str) -> None:
    """Both strategies in one pair of processes (each pair costs a few seconds to start)."""
    for name, strategy in STRATEGIES.items():
        _cache_strategy(rank, tiny_model, out, name, strategy)


def _cache_strategy(rank: int, tiny_model: str, out: str, name: str, strategy: list) -> None:
    import os
    from dataclasses import replace

    from helpers import TRAIN_JOB, train_overrides

    from raykit.encoder import Encoder
    from raykit.jobfile import load_job
    from raykit.strategies import build_trainee
    from raykit.train.loop import backward_batch, training_step

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    job = load_job(TRAIN_JOB, train_overrides(tiny_model, out, *strategy, "loss.matryoshka_dims=[16,32]", "train.l2sp=0.1"))
    results = {}
    # the whole batch at once; chunks of 3 texts (4 queries: a chunk of 3, one of 1); chunks of 3 with
    # gradient checkpointing
    for way, chunk, checkpointing in (("whole", 0, False), ("cached", 3, False), ("cached+checkpointed", 3, True)):
        run = replace(job, loss=replace(job.loss, mini_batch_size=chunk),
                      train=replace(job.train, gradient_checkpointing=checkpointing))
        torch.manual_seed(0)
        trainee = build_trainee(Encoder.load(run.model), run, 10, torch.device("cpu"), False)
        assert all(m.training for m in trainee.encoder.modules())
        for module in trainee.encoder.modules():  # no dropout (the ways draw different masks), still training
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if "lora.rank=4" in strategy:  # DDP: the reduced gradients themselves
            loss, _ = backward_batch(trainee, _cache_batch(rank), run, torch.device("cpu"))
            grads = {n: p.grad.clone() for n, p in trainee.encoder.named_parameters() if p.grad is not None}
            results[way] = (loss.detach(), grads)
        else:  # ZeRO-2 partitions its gradients: their global norm, and the weights after the step
            loss, norm, _ = training_step(trainee, _cache_batch(rank), run, torch.device("cpu"))
            results[way] = (loss.detach(), {"norm": torch.tensor(float(norm)),
                                              **{n: p.detach().clone() for n, p in trainee.encoder.named_parameters()}})
    torch.save(results, f"{out}/{name}-rank{rank}.pt")


def test_gradient_caching_gives_the_whole_batchs_loss_and_gradients_on_two_workers(tiny_model, tmp_path):
    """loss.mini_batch_size: each worker embeds its batch 3 texts at a time, without graphs; the loss
    (in-batch negatives gathered across the 2 gloo workers, a hard negative, Matryoshka, L2-SP) is
    taken on all embeddings, then each chunk runs again with its embeddings' gradients. Loss and
    gradients equal the whole batch's at once, and so with gradient checkpointing on: under LoRA (DDP)
    and under ZeRO-2."""
    run_two(_cache_worker, tiny_model, str(tmp_path))
    for name in STRATEGIES:
        for rank in range(2):
            results = torch.load(tmp_path / f"{name}-rank{rank}.pt")
            loss, whole = results["whole"]
            assert any(g.abs().sum() > 0 for g in whole.values()), name
            for way in ("cached", "cached+checkpointed"):
                cached_loss, cached = results[way]
                torch.testing.assert_close(cached_loss, loss, atol=1e-6, rtol=1e-5, msg=f"{name}, {way}: loss")
                assert whole.keys() == cached.keys() and len(whole) > 1
                for param in whole:
                    torch.testing.assert_close(cached[param], whole[param], atol=1e-6, rtol=1e-4, msg=f"{name}, {way}: {param}")
