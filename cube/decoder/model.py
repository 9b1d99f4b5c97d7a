"""EmbeddingDecoder: an embedding in the teacher's space → k soft-prompt vectors → a causal LM
writes the text.

    z (E) ──centre, L2-normalise──▶ projector (MLP) ──▶ k vectors (k × d_lm) ──▶ LM ──▶ tokens

It is trained by reconstruction: each training answer is written from that answer's own
embedding, so no cube is needed to train it. At answer time the same decoder is fed the cube's
predicted answer embedding (or a baseline's). Only the direction of z matters (it is normalised):
the cube's InfoNCE-trained predictions have no meaningful length. The LM stays frozen unless
`train_lm` (for a small LM trained from scratch), so a large LM is loaded once and never copied.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cube.teachers.base import TeacherConfig
from cube.teachers.hf import load_hf

WEIGHTS, CONFIG = "decoder.pt", "decoder.json"


@dataclass(frozen=True)
class DecoderConfig:
    lm: str = "smollm2"  # the causal LM that writes: a bundled name, a Hugging Face id or a local folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the LM's weights (bfloat16 on a GPU)
    prompt_tokens: int = 8  # soft-prompt vectors the projector writes in front of the text
    hidden: int = 1024  # the projector's hidden width
    max_answer_tokens: int = 64  # answers are cut to this many tokens for training
    train_lm: bool = False  # also train the LM's own weights (a small LM from scratch); False keeps it frozen
    # Also add a projection of the embedding to every token's input vector, not only the prompt: a
    # small LM trained from scratch on a few hundred answers learns to use the embedding only so.
    inject: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_tokens <= 64:
            raise ValueError(f"decoder.prompt_tokens must be in [1, 64], got {self.prompt_tokens}")
        if self.hidden < 1 or self.max_answer_tokens < 4:
            raise ValueError(f"decoder.hidden must be >= 1 and decoder.max_answer_tokens >= 4, "
                             f"got {self.hidden}, {self.max_answer_tokens}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"decoder.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


class Injected(nn.Module):
    """The LM's token embedding plus one vector per sequence (`added`, (B, d)), so that tokens
    generated one at a time get it too."""

    def __init__(self, tokens: nn.Embedding) -> None:
        super().__init__()
        self.tokens = tokens
        self.added: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.tokens(ids)
        return out if self.added is None else out + self.added[:, None, :].to(out.dtype)


class EmbeddingDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, embed_dim: int, a_mean: torch.Tensor, lm: Any, tokenizer: Any) -> None:
        super().__init__()
        self.cfg, self.embed_dim, self.lm, self.tokenizer = cfg, embed_dim, lm, tokenizer
        width = int(lm.config.hidden_size)
        # Each soft-prompt vector is layer-normed with a gain that starts at the size of the LM's own
        # token vectors, where its first layer expects them. A gain, not a fixed factor: under Adam a
        # fixed factor would scale the prompt's learning rate too (by 0.02 for a fresh small LM).
        norm = nn.LayerNorm(width)
        tokens = lm.get_input_embeddings().weight.detach().float()
        nn.init.constant_(norm.weight, float(tokens.pow(2).mean().sqrt()))
        self.projector = nn.Sequential(nn.Linear(embed_dim, cfg.hidden), nn.GELU(),
                                       nn.Linear(cfg.hidden, cfg.prompt_tokens * width),
                                       nn.Unflatten(1, (cfg.prompt_tokens, width)), norm)
        # The answers' mean (the run's centring): z is read as a direction from it, as the cube predicts.
        self.register_buffer("a_mean", a_mean.float().clone())
        lm.requires_grad_(cfg.train_lm)
        if cfg.inject:  # zero at the start: the LM reads its text as before, then learns to use z
            self.injector = nn.Linear(embed_dim, width)
            nn.init.zeros_(self.injector.weight)
            nn.init.zeros_(self.injector.bias)
            lm.set_input_embeddings(Injected(lm.get_input_embeddings()))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @contextlib.contextmanager
    def conditioned(self, z: torch.Tensor, centred: bool = False) -> Iterator[torch.Tensor]:
        """(B, E) embeddings (raw, or already centred) → (B, k, d_lm) soft prompts in the LM's dtype.
        With `inject`, z's vector is added to every token's input inside the block only, so the LM
        is a plain LM again outside it (a chat answer from the same weights, say)."""
        z = z.float().to(self.a_mean.device)
        z = F.normalize(z if centred else z - self.a_mean, dim=-1) * self.embed_dim**0.5  # unit-size coordinates
        tokens_in = self.lm.get_input_embeddings()
        if self.cfg.inject:
            tokens_in.added = self.injector(z)
        try:
            yield self.projector(z).to(tokens_in.weight.dtype)
        finally:
            if self.cfg.inject:
                tokens_in.added = None

    def tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Answers → (ids, mask), each (B, L): cut to max_answer_tokens, then the end-of-text token."""
        eos = self.tokenizer.eos_token_id
        ids = [t[: self.cfg.max_answer_tokens] + [eos]
               for t in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        width = max(len(t) for t in ids)
        out = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, t in enumerate(ids):
            out[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1
        device = self.a_mean.device
        return out.to(device), mask.to(device)

    def loss(self, z: torch.Tensor, texts: list[str], centred: bool = False) -> torch.Tensor:
        """Mean next-token cross-entropy of each text after its embedding's soft prompt."""
        ids, mask = self.tokens(texts)
        with self.conditioned(z, centred) as prompt:
            embeds = torch.cat([prompt, self.lm.get_input_embeddings()(ids)], dim=1)
            k = prompt.shape[1]
            attention = torch.cat([mask.new_ones(len(ids), k), mask], dim=1)
            labels = torch.cat([ids.new_full((len(ids), k), -100), ids.masked_fill(mask == 0, -100)], dim=1)
            return self.lm(inputs_embeds=embeds, attention_mask=attention, labels=labels).loss

    forward = loss  # what DDP calls: training wraps the whole decoder

    @torch.inference_mode()
    def generate(self, z: torch.Tensor, max_new_tokens: int = 64, centred: bool = False) -> tuple[list[str], int]:
        """Greedy text for each embedding, and the number of tokens written. Repeated trigrams are
        barred: a small frozen LM otherwise loops on a phrase."""
        with self.conditioned(z, centred) as prompt:
            attention = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
            out = self.lm.generate(inputs_embeds=prompt, attention_mask=attention, max_new_tokens=max_new_tokens,
                                   do_sample=False, no_repeat_ngram_size=3, pad_token_id=self.tokenizer.pad_token_id,
                                   eos_token_id=self.tokenizer.eos_token_id)
        written = int((out != self.tokenizer.pad_token_id).sum())  # pad is end-of-text: the tokens before it
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)], written

    def load_weights(self, state: dict[str, torch.Tensor], source: str | Path) -> None:
        """Weights saved by `save`: everything but a frozen LM, whose weights are its own files.

        Raises:
            ValueError: they do not fit this decoder's config."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("lm.") for k in missing):
            raise ValueError(f"{source} does not fit its config: missing {missing}, unexpected {unexpected}")

    def save(self, folder: str | Path) -> None:
        """The projector (and the LM's weights only when they were trained), and the config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if self.cfg.train_lm else {k: v for k, v in self.state_dict().items()
                                                              if not k.startswith("lm.")}
        torch.save({k: v.cpu() for k, v in state.items()}, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps({"decoder": asdict(self.cfg), "embed_dim": self.embed_dim}, indent=2))


def build_decoder(cfg: DecoderConfig, embed_dim: int, a_mean: torch.Tensor, device: str = "cpu",
                  seed: int = 0) -> EmbeddingDecoder:
    """A fresh decoder around the named LM (loaded from local files only, like a teacher)."""
    lm, tokenizer = load_hf(TeacherConfig(name=cfg.lm, dtype=cfg.dtype), device, causal_lm=True)
    torch.manual_seed(seed)
    decoder = EmbeddingDecoder(cfg, embed_dim, a_mean, lm, tokenizer).to(device)
    lm.train(cfg.train_lm)
    return decoder


def load_decoder(folder: str | Path, device: str = "cpu") -> EmbeddingDecoder:
    """A decoder saved by `EmbeddingDecoder.save` (RUN/decoder/model).

    Raises:
        FileNotFoundError: the folder holds no decoder; train one with `cube decoder --run RUN`.
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} holds no decoder; train one with `cube decoder --run RUN`")
    meta = json.loads((folder / CONFIG).read_text())
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    decoder = build_decoder(DecoderConfig(**meta["decoder"]), meta["embed_dim"], state["a_mean"], device)
    decoder.load_weights(state, folder / WEIGHTS)
    decoder.eval()
    return decoder
