"""Checkpoint round trip, teacher-mismatch refusal, and the embedding store (no Ray)."""

import json

import numpy as np
import pytest
import torch

from cube.data import store
from cube.model import CellularCube, CubeConfig
from cube.teachers import TeacherConfig
from cube.train.checkpoint import CheckpointError, load_checkpoint, load_train_state, save_checkpoint, save_train_state
from cube.train.optim import OptimConfig, make_optimizer, restore_training_state, training_state

CFG = CubeConfig(width=5, height=4, depth=3, channels=4, hidden=8, io_channels=2, steps=3)
TEACHER = TeacherConfig().identity()


def trained_model():
    model = CellularCube(CFG, 10)
    model.set_centering(torch.randn(10), torch.randn(10))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_round_trip_is_exact(tmp_path):
    model = trained_model().eval()
    save_checkpoint(tmp_path, model, TEACHER, {"split_seed": 7, "epoch": 3})
    loaded, config = load_checkpoint(tmp_path, expected_teacher=TEACHER)
    q = torch.randn(3, 10)
    torch.testing.assert_close(loaded.predict(q), model.predict(q))
    assert config["split_seed"] == 7 and config["teacher"] == TEACHER
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_teacher_mismatch_is_refused(tmp_path):
    save_checkpoint(tmp_path, trained_model(), TEACHER, {})
    other = TeacherConfig(name="smollm2", pooling="last").identity()
    with pytest.raises(CheckpointError, match=r"name: checkpoint='minilm' vs requested='smollm2'.*pooling"):
        load_checkpoint(tmp_path, expected_teacher=other)


def test_missing_or_foreign_folder(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path)


def test_optimizer_scheduler_round_trip(tmp_path):
    model = trained_model()
    opt, sched = make_optimizer(model, OptimConfig(epochs=2), steps_per_epoch=5)
    for _ in range(3):
        model(torch.randn(4, 10)).pred.sum().backward()
        opt.step()
        sched.step()
    save_train_state(tmp_path, *training_state(opt, sched, {"epoch": 1}))
    opt2, sched2 = make_optimizer(model, OptimConfig(epochs=2), steps_per_epoch=5)
    tensors, meta = load_train_state(tmp_path)
    restore_training_state(opt2, sched2, tensors, meta)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    for a, b in zip(opt.state.values(), opt2.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])


def test_store_adds_only_new_ids_and_refuses_other_teachers(tmp_path):
    from cube.data.qa import text_hash

    folder = store.open_store(tmp_path / "s", TEACHER)
    v = np.random.rand(3, 4).astype(np.float32)
    store.write_part(folder, store.to_table(["x", "y", "z"], v, np.zeros(3, bool), TEACHER))
    assert store.keys(folder).tolist() == sorted(text_hash(["x", "y", "z"]).tolist())
    np.testing.assert_allclose(store.vectors_for(folder, ["y", "x"]), v[[1, 0]])
    with pytest.raises(store.StoreError, match="1 texts have no vector"):
        store.vectors_for(folder, ["x", "never embedded"])
    assert not list(folder.glob(".*tmp"))  # no temporary leftovers
    with pytest.raises(store.StoreError, match="holds embeddings made with teacher"):
        store.open_store(folder, TeacherConfig(pooling="last").identity())
    meta = store.read_all(folder).schema.metadata[store.TEACHER_KEY]
    assert json.loads(meta) == TEACHER
