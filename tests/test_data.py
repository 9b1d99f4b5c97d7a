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
