"""The data plane without Ray: the split dataset read as a stream, the answer bank's exact
search in blocks, the embedding store under two writers at once, and Optuna told the truth."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cube.data import store
from cube.data.bank import AnswerBank, write_bank_from_split
from cube.data.qa import SPLITS
from cube.data.split import SplitData
from cube.teachers import TeacherConfig

E = 8


def write_split(root, rows: dict[str, int], seed: int = 0, files: int = 3) -> dict[str, np.ndarray]:
    """A split dataset as jobs/dataset.py writes it: hive folders, fixed-size float32 lists."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in rows.items():
        q = rng.normal(size=(n, E)).astype(np.float32)
        a = (q + 0.1 * rng.normal(size=(n, E))).astype(np.float32)
        out[name] = q
        folder = root / f"split={name}"
        folder.mkdir(parents=True)
        for i, idx in enumerate(np.array_split(np.arange(n), files)):
            pq.write_table(pa.table({
                "question": [f"{name} q{j}?" for j in idx], "answer": [f"{name} a{j // 2}." for j in idx],
                "topic": [""] * len(idx),
                "q_vec": pa.FixedSizeListArray.from_arrays(pa.array(q[idx].reshape(-1)), E),
                "a_vec": pa.FixedSizeListArray.from_arrays(pa.array(a[idx].reshape(-1)), E)}), folder / f"{i}.parquet")
    return out


def test_the_split_streams_shuffles_every_epoch_and_covers_each_row_once(tmp_path):
    q = write_split(tmp_path, {"train": 1000, "val": 60, "test": 60})
    split = SplitData(str(tmp_path))
    assert [split.count(s) for s in SPLITS] == [1000, 60, 60] and split.dim() == E
    m = split.moments()
    np.testing.assert_allclose(m.q_mean, q["train"].mean(0), rtol=1e-5, atol=1e-6)
    epochs = split.shuffled("train", batch_size=32, seed=0, buffer=200)
    seen = [torch.cat([b[0] for b in epochs(e)]) for e in (0, 1)]
    assert all(len(s) == 992 for s in seen)  # 31 full batches; the last partial one dropped
    key = lambda x: sorted(map(tuple, x.numpy().round(5).tolist()))  # noqa: E731
    rows = set(map(tuple, q["train"].round(5).tolist()))
    assert len(set(key(seen[0]))) == 992 and set(key(seen[0])) <= rows  # each row at most once
    assert not torch.equal(seen[0], seen[1])  # a new order every epoch
    assert torch.equal(torch.cat([b[0] for b in epochs(0)]), seen[0])  # ... the same for the same epoch


def test_held_out_samples_questions_but_keeps_the_whole_pool(tmp_path):
    write_split(tmp_path, {"train": 100, "val": 60, "test": 40})
    split = SplitData(str(tmp_path))
    whole = split.held_out("val")
    assert len(whole) == 60 and len(whole.pool) == 30  # two questions an answer
    sample = split.held_out("val", questions=10, seed=3)
    assert len(sample) == 10 and len(sample.pool) == 30
    assert sample.questions == split.held_out("val", questions=10, seed=3).questions
    assert set(sample.questions) != set(split.held_out("val", questions=10, seed=4).questions)
    for i, question in enumerate(sample.questions):
        j = whole.questions.index(question)
        assert sample.answers[int(sample.target[i])] == whole.answers[int(whole.target[j])]


def test_the_bank_holds_each_answer_once_and_searches_exactly_in_blocks(tmp_path, monkeypatch):
    write_split(tmp_path / "split", {"train": 300, "val": 40, "test": 40})
    rows = write_bank_from_split(SplitData(str(tmp_path / "split")), str(tmp_path / "bank"), "float16")
    assert rows == 150 + 20 + 20
    a_mean = torch.randn(E)
    bank = AnswerBank.read(str(tmp_path / "bank"), a_mean)
    assert bank.vectors.dtype == torch.float16 and len(bank) == rows
    pred = torch.randn(5, E)
    keys = torch.nn.functional.normalize(bank.vectors.float() - a_mean, dim=-1)
    want = (torch.nn.functional.normalize(pred, dim=-1) @ keys.T).topk(4, dim=1)
    monkeypatch.setattr("cube.data.bank.SEARCH_BLOCK", 7)  # many blocks
    got = bank.top(pred, 4)
    assert [[bank.texts.index(a.answer) for a in row] for row in got] == want.indices.tolist()
    np.testing.assert_allclose([[a.score for a in row] for row in got], want.values.numpy(), rtol=1e-4, atol=1e-5)
    raw = bank.top(pred, 1, raw=True)[0][0]
    best = (torch.nn.functional.normalize(pred[:1], dim=-1) @ torch.nn.functional.normalize(
        bank.vectors.float(), dim=-1).T).argmax()
    assert raw.answer == bank.texts[int(best)]
    assert len(bank.extended(["brand new.", bank.texts[0]], np.ones((2, E), np.float32))) == rows + 1


def test_the_bank_writer_keeps_each_answers_first_vector_across_batches(tmp_path):
    from cube.data.bank import BankWriter

    writer = BankWriter(str(tmp_path / "bank"))
    writer.add(["a", "b", "a", "c"], np.arange(8, dtype=np.float32).reshape(4, 2))
    writer.add(["c", "d", "b", "e", "d"], np.arange(10, dtype=np.float32).reshape(5, 2) + 100)
    assert writer.close() == 5 and writer.seen.nbytes == 5 * 8  # its memory: 8 bytes per answer
    bank = AnswerBank.read(str(tmp_path / "bank"), torch.zeros(2))
    assert dict(zip(bank.texts, bank.vectors[:, 0].tolist())) == {"a": 0, "b": 2, "c": 6, "d": 102, "e": 106}


def test_two_writers_share_a_store_without_losing_a_part(tmp_path):
    """Two processes embedding into one store at once (each opening it, as every job does, while
    the other has parts in flight): every part of both survives, and a leftover of a dead
    writer is swept."""
    folder = tmp_path / "store"
    identity = TeacherConfig().identity()
    store.open_store(folder, identity)
    dead = folder / ".part-abc.somehost.999999.tmp"
    dead.write_bytes(b"half")
    old = dead.stat().st_mtime - 2 * store.STALE_S
    import os

    os.utime(dead, (old, old))
    writer = textwrap.dedent(f"""
        import numpy as np
        from cube.data import store
        from cube.teachers import TeacherConfig
        identity = TeacherConfig().identity()
        for i in range(40):
            store.open_store({str(folder)!r}, identity)  # what a new job does first: sweep stale leftovers
            texts = [f"{{tag}}-{{i}}-{{j}}" for j in range(50)]
            store.write_part({str(folder)!r}, store.to_table(texts, np.ones((50, 4), np.float32), np.zeros(50, bool),
                                                            identity))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", f"tag = {tag!r}\n" + writer]) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(store.parts(folder)) == 80 and len(store.keys(folder)) == 80 * 50
    assert not dead.exists() and not list(folder.glob(".*.tmp"))


def test_optuna_learns_only_from_trials_that_ran_their_budget():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from jobs.sweep import BudgetAwareOptuna

    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    ours = BudgetAwareOptuna(space=space, metric="val_mrr", mode="max")
    theirs = OptunaSearch(space=space, metric="val_mrr", mode="max")
    ends = {"full": ({"val_mrr": 0.6, "best_val_mrr": 0.7, "finished": True}, False),
            "stopped": ({"val_mrr": 0.9, "best_val_mrr": 0.9, "finished": False}, False),
            "errored": ({"val_mrr": 0.8, "best_val_mrr": 0.8, "finished": False}, True),
            "nan": ({"val_mrr": float("nan"), "best_val_mrr": float("nan"), "finished": True}, False)}
    for searcher in (ours, theirs):
        for trial_id, (result, error) in ends.items():
            searcher.suggest(trial_id)
            searcher.on_trial_complete(trial_id, result, error=error)
    states = {t.number: (t.state.name, t.value) for t in ours._ot_study.trials}
    assert states == {0: ("COMPLETE", 0.7), 1: ("PRUNED", None), 2: ("FAIL", None), 3: ("FAIL", None)}
    told = [t.state.name for t in theirs._ot_study.trials]
    assert told[:3] == ["COMPLETE", "COMPLETE", "COMPLETE"]  # what Ray's own searcher tells TPE


def test_importances_use_only_trials_that_ran_their_budget():
    import pandas as pd

    from cube.job_config import TrainConfig
    from jobs.search_space import Param
    from jobs.sweep_report import importances

    rng = np.random.default_rng(0)
    lr, hidden = 10 ** rng.uniform(-3, -1, 16), rng.choice([8, 16], 16)
    table = pd.DataFrame({"optim.lr": lr, "cube.hidden": hidden, "val_mrr": 0.9 - (np.log10(lr) + 2) ** 2 / 10,
                          "status": ["finished"] * 8 + ["stopped early"] * 8})
    space = [Param("optim.lr", "loguniform", 1e-3, 1e-1), Param("cube.hidden", "choice", values=(8, 16))]
    assert TrainConfig  # the space's keys are TrainConfig's
    assert importances(table, space)  # eight comparable trials are enough
    table.loc[:, "status"] = ["finished"] * 3 + ["stopped early"] * 13
    assert importances(table, space) == {}  # three are not: stopped trials are never counted


@pytest.mark.parametrize("rows, dim", [(1_000, 384), (2_000_000, 4096)])
def test_train_loop_config_carries_settings_never_data(tmp_path, rows, dim):
    """What every Ray Train worker unpickles stays under 1 MB at any data size: the shard
    streams in through Ray Data, and rank 0 reads its validation sample itself."""
    import pickle

    from cube.config import save_config, to_dict
    from cube.data.rundir import RunDir, write_json
    from cube.data.split import Moments
    from cube.job_config import TrainConfig
    from jobs.trainer import loop_config

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    cfg = TrainConfig()
    save_config(cfg, run.path / "config.yaml")
    write_json(run.path / "teacher.json", {**to_dict(cfg.teacher), "dim": dim})
    means = np.random.default_rng(0).normal(size=dim)
    run.write_split_info(str(run.path / "split"), {"train": rows, "val": rows // 10, "test": rows // 10},
                         Moments(rows, means, means))
    config = loop_config(run, cfg)
    assert len(pickle.dumps(config)) < 2**20
    assert config["steps_per_epoch"] == rows // cfg.workers // cfg.optim.batch_size
    assert not any(isinstance(v, (np.ndarray, torch.Tensor)) for v in config.values())


def test_an_ivf_index_finds_what_exact_search_finds():
    """The approximate index (serve setting search.kind=ivf) against exact search on a bank of
    clustered answers: recall@10 near 1 at the default probes, and the identity search stays exact."""
    from cube.data.bank import SearchConfig

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 16)).astype(np.float32)
    vecs = centres[rng.integers(0, 50, 5000)] + 0.3 * rng.normal(size=(5000, 16)).astype(np.float32)
    a_mean = torch.from_numpy(vecs.mean(0))
    exact = AnswerBank([f"a{i}" for i in range(5000)], vecs, a_mean)
    ivf = AnswerBank([f"a{i}" for i in range(5000)], vecs, a_mean).index_with(SearchConfig(kind="ivf", probes=8))
    assert ivf.index is not None and ivf.index.nlist == min(5000 // 39, int(4 * 5000**0.5))  # 39 points a cell
    pred = torch.from_numpy(vecs[:200] - vecs.mean(0)) + 0.1 * torch.randn(200, 16)
    want = [{a.answer for a in row} for row in exact.top(pred, 10)]
    got = [{a.answer for a in row} for row in ivf.top(pred, 10)]
    recall = np.mean([len(w & g) / 10 for w, g in zip(want, got)])
    assert recall > 0.9, recall
    raw = [r[0].answer for r in ivf.top(pred[:5], 1, raw=True)]
    assert raw == [r[0].answer for r in exact.top(pred[:5], 1, raw=True)]
    with pytest.raises(ValueError, match="search.kind"):
        SearchConfig(kind="hnsw")


def test_an_ivf_index_saved_beside_the_bank_is_loaded_only_for_that_bank(tmp_path, caplog):
    """Training saves the index once (bank_index.kind=ivf); a replica loads it, with no build and the
    same answers as a fresh build, and builds its own, saying why, when the bank it serves differs
    (extra answers at start) or the lists asked for differ."""
    import logging

    from cube.data.bank import INDEX_FILE, BankWriter, SearchConfig

    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(3000, 16)).astype(np.float32)
    texts = [f"a{i}" for i in range(3000)]
    writer = BankWriter(str(tmp_path / "bank"))
    writer.add(texts, vecs)
    writer.close()
    a_mean = torch.from_numpy(vecs.mean(0))
    search = SearchConfig(kind="ivf", probes=4)
    assert AnswerBank.read(str(tmp_path / "bank"), a_mean).write_index(str(tmp_path / "bank"), search) > 0
    assert (tmp_path / "bank" / INDEX_FILE).is_file()
    bank = AnswerBank.read(str(tmp_path / "bank"), a_mean)  # the index files are not read as parts
    assert len(bank) == 3000
    pred = torch.from_numpy(vecs[:50] - vecs.mean(0))
    with caplog.at_level(logging.WARNING, logger="cube.bank"):
        loaded = bank.index_with(search, prebuilt=str(tmp_path / "bank"))
    assert not caplog.records, caplog.text  # loaded, not built
    fresh = AnswerBank(texts, vecs, a_mean).index_with(search)
    assert [[a.answer for a in r] for r in loaded.top(pred, 5)] == [[a.answer for a in r] for r in fresh.top(pred, 5)]
    for other, why in ((bank.extended(["new"], vecs[:1] + 1), "3001"),
                       (AnswerBank.read(str(tmp_path / "bank"), a_mean), "'lists': 7")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cube.bank"):
            other.index_with(SearchConfig(kind="ivf", lists=7 if why.startswith("'lists'") else 0),
                             prebuilt=str(tmp_path / "bank"))
        assert "building an IVF index" in caplog.text and why in caplog.text, caplog.text


def test_vectors_of_a_sliced_column_are_its_own_rows():
    """A record batch read from Parquet holds slices of larger arrays: their vectors must be the
    slice's rows (a fixed-size list's .values is the whole parent's)."""
    from cube.data.split import vectors

    column = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(20, dtype=np.float32)), 4)
    np.testing.assert_array_equal(vectors(column.slice(2, 2)), np.arange(8, 16, dtype=np.float32).reshape(2, 4))
    assert vectors(pa.chunked_array([column.slice(0, 1), column.slice(4, 1)])).tolist() == [[0, 1, 2, 3],
                                                                                            [16, 17, 18, 19]]
