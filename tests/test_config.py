"""Typed configs: YAML + key=value overrides, strict about keys and types; every YAML loads."""

from pathlib import Path

import pytest
import yaml

from cube.config import load_config, save_config, to_dict
from cube.job_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cube:\n  steps: 14\noptim:\n  lr: 0.002\n")
    cfg = load_config(TrainConfig, path, ["optim.epochs=3", "teacher=smollm2", "loss.surface=0", "cube.residual=false"])
    assert cfg.cube.steps == 14 and cfg.optim.lr == 0.002 and cfg.optim.epochs == 3
    assert cfg.teacher.name == "smollm2" and cfg.loss.surface == 0.0 and cfg.cube.residual is False
    assert cfg.cube.width == 15  # untouched default


def test_string_fields_keep_strings():
    assert load_config(TrainConfig, None, ["teacher.name=123"]).teacher.name == "123"


@pytest.mark.parametrize("override, match", [
    ("optim.epoch=3", "unknown key 'epoch'"),
    ("optim.epochs=three", "optim.epochs: expected an integer"),
    ("cube.residual=maybe", "expected true/false"),
    ("cube=3", "is a section"),
    ("epochs", "key=value"),
    ("cube.steps=2", "never reach the back"),
    ("teacher.pooling=max", "teacher.pooling"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(TrainConfig, None, [override])


def test_unknown_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cube:\n  stepz: 14\n")
    with pytest.raises(ValueError, match=r"cube\.stepz"):
        load_config(TrainConfig, path)


def test_round_trip(tmp_path):
    cfg = load_config(TrainConfig, None, ["optim.epochs=4", "cube.depth=5", "cube.steps=6"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(TrainConfig, tmp_path / "out.yaml") == cfg


def test_every_yaml_in_the_repo_parses():
    files = [p for p in ROOT.rglob("*.y*ml") if ".venv" not in p.parts and "runs" not in p.parts]
    where = {p.relative_to(ROOT).parent.as_posix() for p in files} | {p.name for p in files if p.parent == ROOT}
    expected = {"configs", "tune_spaces", "cluster", "cluster/kuberay", "serve", "ray_cluster.yaml"}
    assert expected <= where, f"no YAML found in {sorted(expected - where)}"
    for path in files:
        # safe_load takes one document: every file here is one (kubectl takes the kuberay ones one by one)
        assert yaml.safe_load(path.read_text()) is not None, path


def test_shipped_configs_are_valid_train_or_serve_configs():
    from serve.settings import load_settings

    paths = sorted((ROOT / "configs").glob("*.yaml"))
    serve = [p for p in paths if p.name.startswith("serve_")]
    assert serve, "configs/serve_laptop.yaml is missing"
    for path in serve:
        load_settings(path)  # raises on an unknown key or a wrong type
    for path in sorted(set(paths) - set(serve)):
        cfg = load_config(TrainConfig, path)
        assert to_dict(cfg)["cube"]["steps"] >= cfg.cube.depth - 1


def test_pipeline_threads_share_the_node_between_actors():
    from cube.job_config import PipelineOptions

    assert PipelineOptions().threads(node_cpus=2) == 2  # one actor reserving 1 CPU still uses both cores
    assert PipelineOptions(concurrency=4).threads(node_cpus=16) == 4
    assert PipelineOptions(concurrency=4, cpus_per_actor=6).threads(node_cpus=16) == 6  # never below the reservation
    assert PipelineOptions(threads_per_actor=3).threads(node_cpus=16) == 3
    with pytest.raises(ValueError, match="threads_per_actor"):
        PipelineOptions(threads_per_actor=-1)


def test_embed_flags_are_shorthands_for_overrides():
    from jobs.embed import build_parser, config_from_cli

    args = build_parser().parse_args(
        [
            "qa.jsonl",
            "--output",
            "out",
            "--teacher",
            "smollm2",
            "--quantize",
            "8bit",
            "--pooling",
            "last",
            "--threads-per-actor",
            "2",
            "--set",
            "teacher.max_length=64",
        ]
    )
    cfg = config_from_cli(args)
    assert (cfg.teacher.name, cfg.teacher.quantize, cfg.teacher.pooling, cfg.teacher.max_length) == (
        "smollm2",
        "8bit",
        "last",
        64,
    )
    assert cfg.pipeline.threads_per_actor == 2 and not cfg.generate_answers


def test_default_yaml_writes_out_every_default():
    path = ROOT / "configs" / "default.yaml"
    assert load_config(TrainConfig, path) == TrainConfig()
    assert yaml.safe_load(path.read_text()) == to_dict(TrainConfig())  # every key, not just the ones that load
