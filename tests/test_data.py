"""Reading user Q&A files: every problem names file, row and what is wrong (no Ray)."""

import json

import pandas as pd
import pytest

from cube.data.qa import SHIPPED_DATASET, DataConfig, DataError, load_qa, split_pairs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_dataset_is_large_and_varied():
    df = load_qa(SHIPPED_DATASET)
    assert len(df) >= 600 and df["topic"].nunique() >= 20
    assert (df["answer"].str.split().str.len() >= 8).all()  # answers are sentences, not words


def test_jsonl_csv_parquet_with_renamed_columns(tmp_path):
    rows = [{"q": f"question {i}?", "a": f"answer number {i}."} for i in range(5)]
    cfg = DataConfig(question_col="q", answer_col="a")
    write_jsonl(tmp_path / "d.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        df = load_qa(tmp_path / name, cfg)
        assert df["question"].tolist() == [r["q"] for r in rows]


@pytest.mark.parametrize("rows, match", [
    ([{"question": "q1?", "answer": "a1."}, {"question": "q2?"}], r"row 2 has no 'answer' column"),
    ([{"question": "q1?", "answer": "   "}], r"row 1 column 'answer' is empty"),
    ([{"question": "q1?", "answer": "a."}, {"question": "q1?", "answer": "a."}], r"row 2 repeats the pair at row 1"),
    ([{"question": 5, "answer": "a."}], r"row 1 column 'question' must be text"),
])
def test_bad_rows(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=match) as e:
        load_qa(path)
    assert str(path) in str(e.value)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("question,answer\nok?,fine.\ncaf\xe9?,yes.\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"line 3 is not valid UTF-8"):
        load_qa(path)


def test_empty_file_and_bad_extension(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        load_qa(tmp_path / "e.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported extension"):
        load_qa(tmp_path / "x.txt")


def test_splits_are_deterministic_disjoint_by_question_and_sized():
    df = load_qa(SHIPPED_DATASET)
    a, b = split_pairs(df, DataConfig(seed=3)), split_pairs(df, DataConfig(seed=3))
    assert a["split"].tolist() == b["split"].tolist()
    assert split_pairs(df, DataConfig(seed=4))["split"].tolist() != a["split"].tolist()
    counts = a["split"].value_counts(normalize=True)
    assert abs(counts["train"] - 0.8) < 0.02 and abs(counts["test"] - 0.1) < 0.02


def test_same_question_never_in_two_splits():
    df = pd.DataFrame({"question": ["same?"] * 3 + [f"q{i}?" for i in range(40)],
                       "answer": [f"a{i}." for i in range(43)], "topic": "", "row": range(43)})
    out = split_pairs(df, DataConfig())
    assert out[out["question"] == "same?"]["split"].nunique() == 1


def test_split_keeps_pairs_that_share_an_answer_or_a_question_together():
    """No answer text (and no question) of val or test appears in train: pairs linked through a
    shared answer or question form one group, and a group lands in one split."""
    rows = []
    for g in range(60):  # 60 groups: two questions share an answer, a third shares the second's question
        rows += [(f"g{g} first?", f"answer {g}."), (f"g{g} second?", f"answer {g}."), (f"g{g} second?", f"other {g}.")]
    rows += [(f"lone {i}?", f"lone answer {i}.") for i in range(40)]
    df = pd.DataFrame(rows, columns=["question", "answer"]).assign(topic="")
    out = split_pairs(df, DataConfig(seed=1))
    train, held = out[out["split"] == "train"], out[out["split"] != "train"]
    assert not set(train["answer"]) & set(held["answer"]) and not set(train["question"]) & set(held["question"])
    assert held["question"].nunique() >= 30  # the held-out splits still get their share
    for g in range(60):
        assert out[out["question"].str.startswith(f"g{g} ")]["split"].nunique() == 1


def test_folders_of_parquet_and_file_uris(tmp_path):
    from cube.data.qa import Source, scan

    folder = tmp_path / "corpus"
    folder.mkdir()
    for part in range(2):
        pd.DataFrame({"question": [f"q{part}-{i}?" for i in range(30)],
                      "answer": [f"a{part}-{i}." for i in range(30)]}).to_parquet(folder / f"part-{part}.parquet")
    for spec in (folder, f"file://{folder}", f"file://{folder / 'part-1.parquet'}"):
        assert Source.of(spec).format == "parquet"
    assert len(scan(folder)) == 60 and len(scan(f"file://{folder}")) == 60
    bad = pd.DataFrame({"question": ["q?", "  "], "answer": ["a.", "b."]})
    bad.to_parquet(folder / "part-2.parquet")
    with pytest.raises(DataError, match=r"part-2.parquet: row 2 column 'question' is empty"):
        scan(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .parquet files"):
        Source.of(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file"):
        Source.of(f"file://{tmp_path}/missing.parquet")


def test_bring_your_own_embeddings_are_detected(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cube.data.qa import Source

    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(3 * 8, np.float32)), 8)
    pq.write_table(pa.table({"question": ["a?", "b?", "c?"], "answer": ["x.", "y.", "z."],
                             "question_embedding": vectors, "answer_embedding": vectors}), tmp_path / "byo.parquet")
    assert Source.of(tmp_path / "byo.parquet").embedding_dim(DataConfig()) == 8
    pq.write_table(pa.table({"question": ["a?"], "answer": ["x."], "question_embedding": vectors[:1]}),
                   tmp_path / "half.parquet")
    with pytest.raises(DataError, match="only one of"):
        Source.of(tmp_path / "half.parquet").embedding_dim(DataConfig())
    assert Source.of(tmp_path / "half.parquet").embedding_dim(DataConfig(question_embedding_col="none")) is None
