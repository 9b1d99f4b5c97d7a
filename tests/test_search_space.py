"""Unit tier for tuning: search-space files, trial configs and the sweep report (no Ray)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from cube.job_config import TrainConfig, TuneConfig
from jobs.search_space import SpaceError, load_space, trial_config
from jobs.sweep_report import importances, pareto_front, write_report


def space_file(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_space_loads():
    files = sorted((ROOT / "tune_spaces").glob("*.yaml"))
    assert {f.name for f in files} >= {"nca.yaml", "cube_sizes.yaml", "training.yaml"}
    for f in files:
        assert load_space([f], TrainConfig), f


@pytest.mark.parametrize("text, message", [
    ("cube.nope: {distribution: int, low: 1, high: 2}", "unknown key 'nope'"),
    ("cube.steps: {distribution: gaussian, low: 1, high: 2}", "unknown distribution 'gaussian'"),
    ("cube.steps: {distribution: int, low: 9, high: 3}", "low (9) must be below high (3)"),
    ("optim.lr: {distribution: loguniform, low: 0, high: 1}", "loguniform needs low > 0"),
    ("cube.steps: {distribution: uniform, low: 1, high: 3}", "is an integer; use distribution: int"),
    ("cube.perception: {distribution: choice, values: [learned, fourier]}", "'fourier' is not one of"),
    ("cube.hidden: {distribution: choice, values: []}", "values must be a non-empty list"),
    ("cube.steps: {distribution: int, low: 1, high: 3, sigma: 2}", "unknown ['sigma']"),
    ("cube.steps: 12", "must be a mapping with a 'distribution'"),
])
def test_bad_spaces_fail_naming_the_file_and_key(tmp_path, text, message):
    path = space_file(tmp_path, text)
    with pytest.raises(SpaceError) as e:
        load_space([path], TrainConfig)
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_key_in_two_files_and_a_missing_file_are_errors(tmp_path):
    a = space_file(tmp_path, "cube.steps: {distribution: int, low: 4, high: 8}", "a.yaml")
    b = space_file(tmp_path, "cube.steps: {distribution: int, low: 5, high: 9}", "b.yaml")
    with pytest.raises(SpaceError, match="already searched"):
        load_space([a, b], TrainConfig)
    with pytest.raises(SpaceError, match="does not exist"):
        load_space([tmp_path / "missing.yaml"], TrainConfig)


def test_trial_config_applies_draws_like_set_and_keeps_the_configs_rules():
    base = {"cube": {"depth": 4, "steps": 4}, "optim": {"epochs": 2}}
    cfg = trial_config(TrainConfig, base, {"cube.hidden": np.int64(8), "optim.lr": np.float64(0.004)})
    assert cfg.cube.hidden == 8 and isinstance(cfg.cube.hidden, int) and cfg.optim.lr == 0.004
    assert cfg.cube.depth == 4 and cfg.optim.epochs == 2
    with pytest.raises(ValueError, match="would never reach the back face"):
        trial_config(TrainConfig, base, {"cube.depth": 12})


def test_tune_settings_are_checked():
    with pytest.raises(ValueError, match="scheduler"):
        TuneConfig(scheduler="hyperband")
    with pytest.raises(ValueError, match="whole GPU"):
        TuneConfig(workers_per_trial=2, gpus_per_trial=0.5)


def test_pareto_front_keeps_only_undominated_points():
    params = np.array([10, 20, 30, 40, 50.0])
    mrr = np.array([0.5, 0.4, 0.7, 0.6, 0.9])
    assert pareto_front(params, mrr).tolist() == [0, 2, 4]


def test_report_files_and_importances(tmp_path):
    space = load_space(
        [
            space_file(
                tmp_path,
                "cube.hidden: {distribution: choice, values: [8, 16]}\n"
                "optim.lr: {distribution: loguniform, low: 1.0e-3, high: 1.0e-1}",
            )
        ],
        TrainConfig,
    )
    rng = np.random.default_rng(0)
    lr = 10 ** rng.uniform(-3, -1, 12)
    table = pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(12)],
            "cube.hidden": rng.choice([8, 16], 12),
            "optim.lr": lr,
            "val_mrr": 0.9 - (np.log10(lr) + 2) ** 2 / 10,
            "status": "finished",
            "epochs_run": 3,
            "trial_epochs": 3,
            "params": 1000.0,
            "latency_ms": 1.0,
            "error": "",
        }
    )
    table.loc[11, ["val_mrr", "status", "error"]] = [np.nan, "errored", "ValueError: steps=2 < depth-1=3"]
    imp = importances(table, space)
    assert max(imp, key=imp.get) == "optim.lr"  # MRR depends on lr only
    md = write_report(tmp_path, table, space, {"mlp": 0.85}, {"search": "tpe", "scheduler": "asha"})
    for name in ("results.csv", "results.md", "pareto.png", "importance.png", "history.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    saved = pd.read_csv(tmp_path / "results.csv")
    assert saved["val_mrr"].is_monotonic_decreasing or saved["val_mrr"].iloc[:-1].is_monotonic_decreasing
    assert saved["status"].iloc[-1] == "errored" and "steps=2" in saved["error"].iloc[-1]
    assert "36 trial-epochs" in md.read_text()
