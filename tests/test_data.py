import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import QUICKSTART, upload_dir

from raykit.config import Columns, DataConfig
from raykit.data import load_beir, load_training_set, load_validation_set, negative_count
from raykit.errors import DataError


def write_beir(root, corpus, queries, qrels, split="train"):
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return root


def small_beir(root):
    corpus = [{"_id": f"d{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(4)]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(3)]
    return write_beir(root, corpus, queries, [("q0", "d0", 1), ("q0", "d1", 1), ("q1", "d2", 1), ("q2", "d3", 0)])


def test_beir_pairs_keep_only_relevant_judgements(tmp_path):
    table = load_training_set(DataConfig(train=str(small_beir(tmp_path))), seed=0)
    assert table.num_rows == 3  # q2-d3 has score 0
    rows = {(r["query"], r["positive"]) for r in table.to_pylist()}
    assert rows == {("query 0", "T0 text 0"), ("query 0", "T1 text 1"), ("query 1", "T2 text 2")}
    # the two pairs of q0 share a query id, so the loss won't use one as the other's negative
    q0 = [r["query_id"] for r in table.to_pylist() if r["query"] == "query 0"]
    assert q0[0] == q0[1]


def test_validation_split_is_held_out_of_training():
    cfg = DataConfig(train=str(QUICKSTART), val_queries=30, val_corpus=100)
    full = load_beir(str(QUICKSTART), "train")
    val = load_validation_set(cfg, seed=3)
    assert len(val.queries) == len(val.qrels) == 30 and set(val.qrels) <= set(full.qrels)
    # none of the held-out queries is trained on
    trained = set(load_training_set(cfg, seed=3)["query"].to_pylist())
    assert not trained & {full.queries[q] for q in val.queries}
    assert len(trained) == len(full.qrels) - 30
    # the validation corpus: every judged document of those queries plus random others, 100 in all
    judged = {d for docs in val.qrels.values() for d in docs}
    assert judged <= set(val.corpus) and len(val.corpus) == 100
    # the same seed holds out the same queries; val_corpus 0 keeps the whole corpus
    assert load_validation_set(cfg, seed=3).queries == val.queries
    assert len(load_validation_set(DataConfig(train=str(QUICKSTART), val_queries=30), seed=3).corpus) == len(full.corpus)
    assert load_validation_set(DataConfig(train=str(QUICKSTART)), seed=3) is None


def test_validation_split_needs_beir_and_queries_left(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    with pytest.raises(DataError, match="data.val_queries: needs data.train to be a BEIR folder"):
        load_training_set(DataConfig(train=str(pairs), val_queries=5), seed=0)
    with pytest.raises(DataError, match="leaves none to train on"):
        load_training_set(DataConfig(train=str(small_beir(tmp_path / "b")), val_queries=3), seed=0)


def test_quickstart_data_counts():
    beir = load_beir(str(QUICKSTART), "test")
    assert (len(beir.corpus), len(beir.queries)) == (240, 90)
    assert load_training_set(DataConfig(train=str(QUICKSTART)), seed=0).num_rows == 450


def test_pair_files_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n")
    pq.write_table(pa.table({"query": ["q2"], "positive": ["p2"], "negative": ["n2"]}), tmp_path / "b.parquet")
    table = load_training_set(DataConfig(train=str(tmp_path)), seed=0)
    assert table.num_rows == 2
    assert {"query", "positive", "negative_0", "query_id", "positive_id", "negative_id_0"} <= set(table.column_names)


def test_several_negatives_and_teacher_scores(tmp_path):
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}a", f"n{i}b", f"n{i}c"],
             "positive_score": 5.0, "negative_scores": [1.0, 2.0, 3.0]} for i in range(3)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = load_training_set(DataConfig(train=str(tmp_path), num_negatives=2), seed=0)
    assert negative_count(table.column_names) == 2
    row = table.slice(0, 1).to_pylist()[0]
    i = row["query"][1:]
    assert (row["negative_0"], row["negative_1"]) == (f"n{i}a", f"n{i}b")
    assert (row["positive_score"], row["negative_score_0"], row["negative_score_1"]) == (5.0, 1.0, 2.0)
    rows[1]["negatives"] = ["only one"]
    rows[1]["negative_scores"] = [0.0]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"t.jsonl:line 2: 1 negatives, data.num_negatives asks 2"):
        load_training_set(DataConfig(train=str(tmp_path), num_negatives=2), seed=0)
    with pytest.raises(DataError, match=r"rows have 1 to 3 negatives; set data.num_negatives"):
        load_training_set(DataConfig(train=str(tmp_path)), seed=0)
    rows[1]["negative_scores"] = [0.0, 1.0]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"t.jsonl:line 2: 'negative_scores' must give one score per negative"):
        load_training_set(DataConfig(train=str(tmp_path)), seed=0)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: (p / "x.jsonl").write_text('{"query": "q"}\n'), r"x.jsonl:line 1: column 'positive' is missing"),
        (lambda p: (p / "x.jsonl").write_text('{"query": "q", "positive": "p"}\n{"query": "", "positive": "p"}\n'),
         r"x.jsonl:line 2: column 'query' is not a non-empty string"),
        (lambda p: (p / "x.jsonl").write_text(""), r"x.jsonl: empty file"),
        (lambda p: (p / "x.jsonl").write_text('{"query": "q", "positive": "p"}\nnot json\n'), r"x.jsonl:2: not valid JSON"),
        (lambda p: (p / "x.jsonl").write_bytes('{"query": "q", "positive": "p"}\n{"query": "café", "positive": "p"}\n'.encode("latin-1")),
         r"x.jsonl:2: not UTF-8 \(byte 0xe9; a latin-1 or cp1252 file\?\); save it as UTF-8"),
        (lambda p: (p / "x.jsonl").write_text('{"query": "q", "positive": "p"}\n{"query": "a\\ud800b", "positive": "p"}\n'),
         r"x.jsonl:2: a lone surrogate \(\\ud800\) in a string; it is not valid Unicode"),
        (lambda p: pq.write_table(pa.table({"query": ["q"], "pos": ["p"]}), p / "x.parquet"),
         r"x.parquet:row 1: column 'positive' is missing"),
    ],
)
def test_bad_pair_files_name_file_and_line(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_training_set(DataConfig(train=str(tmp_path)), seed=0)


def test_bad_beir_names_file_and_id(tmp_path):
    corpus = [{"_id": "d0", "text": "a"}, {"_id": "d1", "text": "b"}]
    queries = [{"_id": "q0", "text": "x"}]
    root = write_beir(tmp_path / "a", corpus, queries, [("q0", "d9", 1)])
    with pytest.raises(DataError, match=r"qrels/train.tsv:2: corpus-id 'd9' is not in .*corpus.jsonl"):
        load_training_set(DataConfig(train=str(root)), seed=0)
    root = write_beir(tmp_path / "b", corpus, queries, [("q7", "d0", 1)])
    with pytest.raises(DataError, match=r"qrels/train.tsv:2: query-id 'q7' is not in .*queries.jsonl"):
        load_training_set(DataConfig(train=str(root)), seed=0)
    root = write_beir(tmp_path / "c", corpus + [{"_id": "d0", "text": "again"}], queries, [("q0", "d0", 1)])
    with pytest.raises(DataError, match=r"corpus.jsonl:3: duplicate _id 'd0' \(first on line 1\)"):
        load_training_set(DataConfig(train=str(root)), seed=0)
    with pytest.raises(DataError, match=r"qrels/dev.tsv: no such qrels file"):
        load_training_set(DataConfig(train=str(root), split="dev"), seed=0)
    with pytest.raises(DataError, match=r"no such file or folder"):
        load_training_set(DataConfig(train=str(tmp_path / "nowhere")), seed=0)


def test_max_examples_and_seeded_shuffle(tmp_path):
    cfg = DataConfig(train=str(QUICKSTART), max_examples=10)
    a, b = load_training_set(cfg, seed=1), load_training_set(cfg, seed=1)
    assert a.num_rows == 10 and a.equals(b)
    assert not a.equals(load_training_set(cfg, seed=2))


def test_reads_beir_and_pairs_from_s3(s3_server, tmp_path):
    bucket = s3_server()
    uri = upload_dir(s3_server.client, QUICKSTART, bucket, "quickstart")
    assert load_training_set(DataConfig(train=uri), seed=0).num_rows == 450
    assert len(load_beir(uri, "test").queries) == 90
    (tmp_path / "p.jsonl").write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    s3_server.client.upload_file(str(tmp_path / "p.jsonl"), bucket, "pairs/p.jsonl")
    assert load_training_set(DataConfig(train=f"s3://{bucket}/pairs"), seed=0).num_rows == 1
    with pytest.raises(DataError, match="no such file or folder"):
        load_training_set(DataConfig(train=f"s3://{bucket}/missing"), seed=0)
    # a CSV file, and a Hugging Face dataset folder, in s3
    import datasets

    (tmp_path / "p.csv").write_text("q,p\nq1,p1\nq2,p2\n")
    s3_server.client.upload_file(str(tmp_path / "p.csv"), bucket, "csv/p.csv")
    assert load_training_set(DataConfig(train=f"s3://{bucket}/csv/p.csv", columns=Columns(query="q", positive="p")), seed=0).num_rows == 2
    datasets.Dataset.from_dict({"query": ["a", "b", "c"], "positive": ["x", "y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    ds = upload_dir(s3_server.client, tmp_path / "ds", bucket, "ds")
    assert load_training_set(DataConfig(train=ds), seed=0).num_rows == 3


def test_csv_tsv_and_a_hugging_face_dataset_in_their_own_columns(tmp_path):
    """data.columns maps the user's names; CSV and TSV keep a query of digits as text; a dataset saved
    with save_to_disk is read by its split."""
    import datasets

    columns = Columns(query="question", positive="answer", negatives="hard_neg")
    (tmp_path / "a.csv").write_text('question,answer,hard_neg\n"what, exactly?",an answer,a wrong one\n12345,"two\nlines",n\n')
    (tmp_path / "b.tsv").write_text("question\tanswer\thard_neg\nq3\tp3\tn3\n")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"question": ["q4"], "answer": ["p4"], "hard_neg": ["n4"]}),
                          "test": datasets.Dataset.from_dict({"question": ["t"], "answer": ["t"], "hard_neg": ["t"]})}
                         ).save_to_disk(str(tmp_path / "hf"))
    def rows(path: str) -> list[tuple]:
        table = load_training_set(DataConfig(train=path, columns=columns), seed=0)
        return sorted(zip(table["query"].to_pylist(), table["positive"].to_pylist(), table["negative_0"].to_pylist()))

    assert rows(str(tmp_path)) == [("12345", "two\nlines", "n"), ("q3", "p3", "n3"), ("what, exactly?", "an answer", "a wrong one")]
    assert rows(str(tmp_path / "hf")) == [("q4", "p4", "n4")]  # its train split (data.split)

    with pytest.raises(DataError, match=r"hf: no split 'dev' in this dataset \(it has train, test\); set data.split"):
        load_training_set(DataConfig(train=str(tmp_path / "hf"), split="dev", columns=columns), seed=0)
    (tmp_path / "a.csv").write_text("question,answer\nq,p\nq2,\n")
    with pytest.raises(DataError, match=r"a.csv:line 3: column 'answer' is missing; every row needs question, answer \(data.columns\)"):
        load_training_set(DataConfig(train=str(tmp_path / "a.csv"), columns=columns), seed=0)
    with pytest.raises(DataError, match=r"^hf:raykit-test/nowhere: cannot load this dataset from the hub \(.*\); save it with save_to_disk"):
        load_training_set(DataConfig(train="hf:raykit-test/nowhere"), seed=0)


def test_columns_come_from_the_job():
    from raykit.jobfile import load_job

    job = load_job(None, ["data.columns.query=question", "data.columns.negatives=hard_negs"])
    assert (job.data.columns.query, job.data.columns.positive, job.data.columns.negatives) == ("question", "positive", "hard_negs")


def test_pair_files_are_read_by_ray_tasks_into_the_table_the_workers_get(ray_cluster, tmp_path):
    """training_set: one Ray task per pair file reads and validates it; the driver holds references and
    counts. A worker's table (TrainingSet.table) is load_training_set's, row for row; a bad row there
    is the same one line, naming its file and line."""
    import ray

    from raykit.data import training_set

    for i in range(3):
        rows = [{"query": f"q{i}-{j}", "positive": f"p{i}-{j}", "negatives": [f"n{i}-{j}a", f"n{i}-{j}b"],
                 "positive_score": 1.0, "negative_scores": [0.5, 0.25]} for j in range(5)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"part-{i}.parquet")
    cfg = DataConfig(train=str(tmp_path), num_negatives=1, max_examples=12)
    training = training_set(cfg, seed=3)
    assert all(isinstance(b, ray.ObjectRef) for b in training.blocks) and len(training.blocks) == 3
    assert (training.num_rows, training.negatives, training.scored) == (12, 1, True)
    every_row = ray.remote(lambda t: t.table().take(list(range(t.num_rows))).to_pylist())
    assert ray.get(every_row.remote(training)) == load_training_set(cfg, seed=3).to_pylist()

    (tmp_path / "part-1.parquet").unlink()
    (tmp_path / "part-1.jsonl").write_text('{"query": "q", "positive": "p", "negatives": ["a", "b"]}\n{"query": "q2"}\n')
    with pytest.raises(DataError, match=r"part-1.jsonl:line 2: column 'positive' is missing"):
        training_set(cfg, seed=3)


def test_the_workers_pairs_are_load_training_sets_rows_read_through_its_order():
    """What a worker (and a tokenizer actor) reads, TrainingSet.table(): the blocks as stored and
    the seeded order, not a shuffled copy; the same rows, lengths and batches as the table itself."""
    import numpy as np

    from raykit.data import Pairs, training_set
    from raykit.train.batches import row_lengths, take

    cfg = DataConfig(train=str(QUICKSTART), max_examples=100)
    pairs, table = training_set(cfg, seed=3).table(), load_training_set(cfg, seed=3)
    assert isinstance(pairs, Pairs) and pairs.num_rows == table.num_rows == 100
    rows = np.array([5, 0, 99, 42])
    assert {k: v.tolist() for k, v in take(pairs, rows).items()} == {k: v.tolist() for k, v in take(table, rows).items()}
    assert np.array_equal(row_lengths(pairs), row_lengths(table))
