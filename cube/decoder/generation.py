"""The honest generation table: on held-out questions, text written by the decoder from several
embeddings, against the teacher answering by itself and against retrieval.

    true        the decoder fed the true answer's embedding (the upper bound of reconstruction)
    cube        the decoder fed the cube's predicted answer embedding
    BASELINE    the decoder fed the strongest baseline's prediction (the run's eval.json names it)
    chat        the decoder's LM answering the question itself, with its chat template
    retrieval   the nearest answer of the test pool to the cube's prediction (what /v1/answer does)
    shuffled    the decoder fed another question's true answer embedding (the control)

Each row gives ROUGE-L F1 against the true answer, the teacher-embedding cosine between the text
and the true answer, recall@1 and MRR of the text among the pool's answers (ranked by the
teacher's embedding of the text, centred like the cube's predictions), and tokens/s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cube.data.rundir import RunDir
from cube.decoder.model import EmbeddingDecoder, load_decoder
from cube.eval.metrics import HeldOut, retrieval_metrics, top_k

log = logging.getLogger("cube.eval")
Writer = Callable[[list[int]], tuple[list[str], int]]  # rows of the sample → (texts, tokens written)


def rouge_l(texts: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (Google's rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, t)["rougeL"].fmeasure for t, r in zip(texts, references)) / max(len(texts), 1)


def score_texts(texts: list[str], test: HeldOut, embed: Callable[[list[str]], torch.Tensor],
                a_mean: torch.Tensor) -> dict[str, float]:
    """ROUGE-L, cosine to the true answer, and retrieval metrics of the texts' embeddings."""
    truth = test.pool[test.target]
    vecs = embed(texts)
    cosine = F.cosine_similarity(vecs, truth, dim=-1).mean()
    ranked = retrieval_metrics(vecs - a_mean, test.pool, test.target, offset=a_mean)
    return {"rouge_l": rouge_l(texts, [test.answers[int(i)] for i in test.target]), "cosine": float(cosine),
            "recall_at_1": ranked["recall@1"], "mrr": ranked["mrr"]}


def decoder_writer(decoder: EmbeddingDecoder, z: torch.Tensor, centred: bool, max_new_tokens: int,
                   batch_size: int) -> Writer:
    def write(rows: list[int]) -> tuple[list[str], int]:
        texts, tokens = [], 0
        for start in range(0, len(rows), batch_size):
            part, n = decoder.generate(z[rows[start : start + batch_size]], max_new_tokens, centred=centred)
            texts, tokens = texts + part, tokens + n
        return texts, tokens

    return write


def generation_report(run_path: str | Path, questions: int = 64, max_new_tokens: int = 64, batch_size: int = 16,
                      chat: bool = True, baseline_seeds: int = 1) -> dict[str, Any]:
    """The table above for a run with a trained decoder (RUN/decoder/model), on a seeded sample
    of `questions` test questions ranked against the whole test pool.

    Raises:
        FileNotFoundError: the run has no decoder yet (`cube decoder --run RUN`).
    """
    from cube.eval.baselines import fit_baselines
    from cube.eval.inference import predict
    from cube.eval.report import run_train_data
    from cube.job_config import TrainConfig
    from cube.teachers.hf import HFTeacher
    from cube.train.checkpoint import load_checkpoint

    run = RunDir(run_path)
    run.require("model", "split.json", "teacher.json", "config.yaml", "eval.json")
    decoder = load_decoder(run.path / "decoder" / "model")
    teacher_cfg, _ = run.teacher()
    model, _ = load_checkpoint(run.model_dir, expected_teacher=teacher_cfg.identity())
    cfg = run.config(TrainConfig)
    split = run.split()
    test = split.held_out("test", questions=questions, seed=cfg.data.seed)
    teacher = HFTeacher(teacher_cfg)
    a_mean = model.a_mean.cpu()

    def embed(texts: list[str]) -> torch.Tensor:
        safe = [t if t.strip() else "." for t in texts]  # an empty generation still gets a (poor) vector
        return torch.cat([torch.from_numpy(teacher.embed(safe[i : i + 64]).vectors) for i in range(0, len(safe), 64)])

    best = json.loads((run.path / "eval.json").read_text())["best_baseline"]
    fitted = fit_baselines(run_train_data(run), split.held_out("val", questions=cfg.val_questions, seed=cfg.data.seed),
                           seeds=baseline_seeds, which=best)[best][0]
    cube_pred = predict(model, test.q)
    truth = test.pool[test.target]
    shuffled = truth[torch.roll(torch.arange(len(truth)), 1)]
    rows = list(range(len(test)))
    writers: dict[str, Writer] = {
        "true": decoder_writer(decoder, truth, False, max_new_tokens, batch_size),
        "cube": decoder_writer(decoder, cube_pred, True, max_new_tokens, batch_size),
        best: decoder_writer(decoder, fitted.predict(test.q), fitted.space == "centred", max_new_tokens, batch_size),
        "shuffled": decoder_writer(decoder, shuffled, False, max_new_tokens, batch_size),
    }
    notes: dict[str, str] = {}
    if chat:
        from cube.teachers.generate import AnswerWriter, GeneratorConfig

        try:
            # the decoder's own LM, not a second copy (outside `conditioned` it is the plain LM)
            answerer = AnswerWriter(GeneratorConfig(name=decoder.cfg.lm, max_new_tokens=max_new_tokens),
                                    loaded=(decoder.lm, decoder.tokenizer))

            def chat_writer(rows: list[int]) -> tuple[list[str], int]:
                texts = [t for s in range(0, len(rows), batch_size)
                         for t in answerer.answer([test.questions[i] for i in rows[s : s + batch_size]])]
                return texts, sum(len(answerer.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

            writers["chat"] = chat_writer
        except Exception as e:  # a decoder LM without a chat template (a small LM trained here) cannot chat
            notes["chat"] = f"{decoder.cfg.lm} cannot answer by itself: {type(e).__name__}: {e}"
    nearest = top_k(cube_pred, test.pool, 1, offset=a_mean)[1][:, 0]
    writers["retrieval"] = lambda rows: ([test.answers[int(nearest[i])] for i in rows], 0)
    table: dict[str, dict[str, Any]] = {}
    examples: dict[str, list[str]] = {}
    for name, write in writers.items():
        t0 = time.perf_counter()
        texts, tokens = write(rows)
        seconds = time.perf_counter() - t0
        log.info("generation: %s, %d texts in %.0f s", name, len(texts), seconds)
        table[name] = {**score_texts(texts, test, embed, a_mean),
                       "tokens_per_s": tokens / seconds if tokens else None, "tokens": tokens}
        examples[name] = texts[:5]
    return {"questions": len(test), "pool": len(test.pool), "chance_recall_at_1": 1 / len(test.pool),
            "max_new_tokens": max_new_tokens, "decoder": vars(decoder.cfg), "baseline": best,
            "teacher": teacher_cfg.name, "table": table, "notes": notes,
            "examples": [{"question": test.questions[i], "true_answer": test.answers[int(test.target[i])],
                          **{name: examples[name][i] for name in examples}} for i in range(min(5, len(test)))]}


def format_generation(report: dict[str, Any]) -> str:
    lines = [f"generation on {report['questions']} held-out questions, pool of {report['pool']} answers "
             f"(chance recall@1 {report['chance_recall_at_1']:.3f}); decoder LM {report['decoder']['lm']}, "
             f"teacher {report['teacher']}, at most {report['max_new_tokens']} new tokens",
             f"{'source':<18} {'ROUGE-L':>8} {'cosine':>7} {'R@1':>6} {'MRR':>6} {'tok/s':>7}"]
    for name, m in report["table"].items():
        speed = f"{m['tokens_per_s']:7.1f}" if m["tokens_per_s"] else f"{'-':>7}"
        lines.append(f"{name:<18} {m['rouge_l']:8.3f} {m['cosine']:7.3f} {m['recall_at_1']:6.3f} {m['mrr']:6.3f} "
                     f"{speed}")
    lines += [f"  ({k}: {v})" for k, v in report["notes"].items()]
    for ex in report["examples"][:2]:
        lines += ["", f"Q: {ex['question']}", f"  true:  {ex['true_answer'][:160]}",
                  f"  cube:  {ex['cube'][:160]}"]
    return "\n".join(lines)
