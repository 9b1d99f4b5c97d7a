"""Teachers at full strength: SmolLM2 (LLaMA architecture, GGUF), pooling options, 8/4-bit
bitsandbytes, teacher-written answers, and clear failures (no Ray)."""

import numpy as np
import pytest

from cube.teachers import HFTeacher, TeacherConfig, TeacherError, load_teacher

QUESTIONS = ["What is the capital of France?", "Why do leaves change colour in autumn?"]


@pytest.fixture(scope="module")
def smollm2():
    return HFTeacher(TeacherConfig(name="smollm2", max_length=64))


def test_smollm2_gguf_loads_as_llama_and_embeds(smollm2):
    assert type(smollm2.model).__name__ == "LlamaModel"  # the same code path as LLaMA-3-8B
    out = smollm2.embed(QUESTIONS + ["word " * 200])
    assert out.vectors.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, rtol=1e-5)
    assert out.truncated.tolist() == [False, False, True]


def test_last_token_pooling_differs_from_mean(smollm2):
    last = HFTeacher.__new__(HFTeacher)
    last.__dict__.update(smollm2.__dict__, cfg=TeacherConfig(name="smollm2", pooling="last", max_length=64))
    mean_vec, last_vec = smollm2.embed(QUESTIONS).vectors, last.embed(QUESTIONS).vectors
    assert (mean_vec * last_vec).sum(1).max() < 0.99
    # padding must not leak into the pooled vector: the same text alone and in a batch agree
    np.testing.assert_allclose(last.embed(QUESTIONS[:1]).vectors[0], last_vec[0], atol=1e-4)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantised_smollm2_embeds_close_to_fp32(smollm2, mode):
    quant = HFTeacher(TeacherConfig(name="smollm2", max_length=64, quantize=mode))
    assert quant.model.get_memory_footprint() < 0.7 * smollm2.model.get_memory_footprint()
    cos = (quant.embed(QUESTIONS).vectors * smollm2.embed(QUESTIONS).vectors).sum(1)
    assert cos.min() > 0.9, cos


def test_teacher_written_answer():
    from cube.teachers.generate import AnswerWriter, GeneratorConfig

    writer = AnswerWriter(GeneratorConfig(name="smollm2", max_new_tokens=24))
    answers = writer.answer(QUESTIONS[:1])
    assert "paris" in answers[0].lower(), answers
    assert writer.answer(QUESTIONS[:1]) == answers  # greedy: reproducible


def test_vllm_backend_without_vllm_is_an_error_not_a_fallback():
    with pytest.raises(TeacherError, match="vllm"):
        load_teacher(TeacherConfig(backend="vllm"))


def test_broken_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(TeacherError, match="did not load"):
        HFTeacher(TeacherConfig(name=str(bad)))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        HFTeacher(TeacherConfig(name=str(tmp_path / "nope.gguf")))
