"""The answer bank a served run searches, as an artefact of its own:

    RUN/bank/part-*.parquet     text, vector (fixed-size list of float32 or float16)

Written once at the end of training from the split dataset (every distinct answer of every
split), streamed; read by each Serve replica from the run's path or URI, with no copy of the run.
One matrix of raw vectors serves both searches: the cube's (in its centred space) and the
identity baseline's (raw), through per-answer norms. Search is exact top-k, in blocks, or
through a faiss IVF index that training builds once beside the bank:

    RUN/bank/_ivf.faiss, _ivf.json   the index and what it was built for ('_': Parquet skips them)

A replica loads that index when it fits the bank it serves (rows, lists, answer mean), and
otherwise builds its own, saying so in the log: at a million answers that takes minutes.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from cube.data.qa import SPLITS, text_hash
from cube.data.split import SplitData, filesystem, vectors

log = logging.getLogger("cube.bank")
ROWS_PER_PART = 100_000
DTYPES = {"float32": (pa.float32(), np.float32), "float16": (pa.float16(), np.float16)}
SEARCH_BLOCK = 262_144  # answers scored at once per query batch: bounds the score matrix
INDEX_FILE, INDEX_INFO = "_ivf.faiss", "_ivf.json"  # beside the bank's parts; discovery skips '_' files


class BankError(RuntimeError):
    """A bank that is missing or does not fit the run it is served with."""


@dataclass(frozen=True)
class SearchConfig:
    """How the cube's predictions are searched in the bank. `exact` scores every answer (in
    blocks); `ivf` is faiss's inverted-file index over the centred, normalised answers (`lists`
    k-means cells, 0 = 4·√answers; `probes` cells searched a query), for banks where exact
    search is too slow (docs/serving.md has recall@10 against exact). The identity baseline's
    raw search stays exact."""

    kind: str = "exact"  # exact | ivf (needs faiss-cpu: pip install -e '.[ann]')
    lists: int = 0
    probes: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "ivf"):
            raise ValueError(f"search.kind must be exact or ivf, got {self.kind!r}")
        if self.lists < 0 or self.probes < 1:
            raise ValueError(f"search.lists must be >= 0 and search.probes >= 1, got {self.lists}, {self.probes}")

    def lists_for(self, answers: int) -> int:
        """IVF cells for a bank of `answers`: `lists`, or 4·√answers with at least 39 answers a cell."""
        return self.lists or max(1, min(answers // 39, int(4 * answers**0.5)))


def _faiss():
    try:
        import faiss
    except ImportError:
        raise BankError("search.kind=ivf needs faiss: pip install -e '.[ann]' (faiss-cpu)") from None
    return faiss


@dataclass
class Answer:
    answer: str
    score: float  # cosine between the prediction and the chosen answer, in the search's space


def _bank_table(texts: list[str], vecs: np.ndarray, dtype: str) -> pa.Table:
    arrow_type, np_type = DTYPES[dtype]
    flat = pa.array(np.ascontiguousarray(vecs, dtype=np_type).reshape(-1), type=arrow_type)
    return pa.table({"text": pa.array(texts, pa.string()),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1])})


class BankWriter:
    """Writes a bank folder part by part, skipping answers it has already written. What it keeps
    between parts is the sorted 64-bit keys of the answers written: 8 bytes each."""

    def __init__(self, target: str, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise BankError(f"bank dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.fs, self.path = filesystem(target)
        self.fs.create_dir(self.path, recursive=True)
        self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
        self.dtype, self.seen = dtype, np.zeros(0, np.uint64)
        self.texts: list[str] = []
        self.vecs: list[np.ndarray] = []
        self.rows = 0

    def add(self, texts: list[str], vecs: np.ndarray) -> None:
        keys = text_hash(texts)
        first = np.sort(np.unique(keys, return_index=True)[1])  # each key's first row in this batch
        at = np.minimum(np.searchsorted(self.seen, keys[first]), max(len(self.seen) - 1, 0))
        written = self.seen[at] == keys[first] if len(self.seen) else np.zeros(len(first), bool)
        keep = first[~written].tolist()
        self.seen = np.union1d(self.seen, keys[keep])
        self.texts += [texts[i] for i in keep]
        self.vecs.append(vecs[keep])
        if len(self.texts) >= ROWS_PER_PART:
            self.flush()

    def flush(self) -> None:
        if self.texts:
            table = _bank_table(self.texts, np.concatenate(self.vecs), self.dtype)
            with self.fs.open_output_stream(f"{self.path}/part-{uuid.uuid4().hex}.parquet") as f:
                pq.write_table(table, f)
            self.rows += len(self.texts)
        self.texts, self.vecs = [], []

    def close(self) -> int:
        self.flush()
        return self.rows


def write_bank_from_split(split: SplitData, target: str, dtype: str = "float32") -> int:
    """Every distinct answer of the split dataset (all splits) with its vector, into `target`;
    returns how many. Memory: one read batch and 8 bytes per distinct answer."""
    writer = BankWriter(target, dtype)
    for name in SPLITS:
        for batch in split.batches(name, ["answer", "a_vec"]):
            writer.add(batch.column("answer").to_pylist(), vectors(batch.column("a_vec")))
    return writer.close()


class AnswerBank:
    """Candidate answers with their raw teacher vectors, searched two ways: in the cube's centred
    space (the cube's prediction against answer − a_mean), and in the raw space (the identity
    baseline: the question's own embedding against the raw answers, as `cube eval` scores it)."""

    def __init__(self, texts: list[str], vecs: np.ndarray | torch.Tensor, a_mean: torch.Tensor) -> None:
        if len(texts) != len(vecs) or not len(texts):
            raise BankError(f"an answer bank needs one vector per text and at least one text, got "
                            f"{len(texts)} / {len(vecs)}")
        self.texts = texts
        # (P, E); a read-only array from Parquet is copied once, so that torch may share it
        self.vectors = vecs if torch.is_tensor(vecs) else torch.from_numpy(np.require(vecs, requirements=["W", "C"]))
        self.a_mean = a_mean.detach().float().cpu()
        raw_norm, centred_norm = [], []
        for block in self.vectors.split(SEARCH_BLOCK):
            v = block.float()
            raw_norm.append(v.norm(dim=-1))
            centred_norm.append((v - self.a_mean).norm(dim=-1))
        self.raw_norm = torch.cat(raw_norm).clamp_min(1e-12)  # (P,)
        self.centred_norm = torch.cat(centred_norm).clamp_min(1e-12)
        self.index = None  # a faiss index of the centred keys, once `index_with` builds one

    def index_with(self, search: SearchConfig, seed: int = 0, prebuilt: str | None = None) -> AnswerBank:
        """Set up the search `search` asks for; returns self. For `ivf`: the index saved at
        `prebuilt` (a bank folder, see write_index) when it was built for this bank, else one
        built here, which the log names (at a million answers it takes minutes on a few cores).

        Raises:
            BankError: faiss is not installed."""
        if search.kind == "exact":
            self.index = None
            return self
        faiss = _faiss()
        lists = search.lists_for(len(self))
        index, why = self._read_index(prebuilt, lists) if prebuilt else (None, "no bank folder given")
        if index is None:
            log.warning("building an IVF index of %s answers in this process (%s); `bank_index.kind=ivf` "
                        "at training builds it once beside the bank", f"{len(self):,}", why)
            index = self._build_index(faiss, lists, seed)
        index.nprobe = search.probes
        self.index = index
        return self

    def _build_index(self, faiss, lists: int, seed: int):
        dim, n = self.vectors.shape[1], len(self.texts)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, 256 * lists)]
        index.train(self._keys(sample).numpy())
        for start in range(0, n, SEARCH_BLOCK):
            index.add(self._keys(torch.arange(start, min(n, start + SEARCH_BLOCK))).numpy())
        return index

    def _fingerprint(self, lists: int) -> dict:
        """What a saved index must match: the answers it holds and the centring of its keys."""
        return {"rows": len(self), "lists": lists, "a_mean_sum": round(float(self.a_mean.double().sum()), 6),
                "dim": int(self.vectors.shape[1])}

    def write_index(self, target: str, search: SearchConfig, seed: int = 0) -> int:
        """Build the IVF index of `search` and save it into the bank folder `target` (path or
        URI), where `index_with(prebuilt=target)` finds it; returns its size in bytes."""
        faiss = _faiss()
        lists = search.lists_for(len(self))
        data = faiss.serialize_index(self._build_index(faiss, lists, seed))
        fs, path = filesystem(target)
        with fs.open_output_stream(f"{path}/{INDEX_FILE}") as f:
            f.write(data.tobytes())
        with fs.open_output_stream(f"{path}/{INDEX_INFO}") as f:
            f.write(json.dumps(self._fingerprint(lists)).encode())
        return int(data.nbytes)

    def _read_index(self, target: str, lists: int):
        """(index, None) when `target` holds one built for this bank, else (None, why not)."""
        fs, path = filesystem(target)
        try:
            with fs.open_input_stream(f"{path}/{INDEX_INFO}") as f:
                saved = json.loads(f.read())
        except (FileNotFoundError, OSError):
            return None, f"none saved in {target}"
        if saved != self._fingerprint(lists):
            return None, f"the saved one was built for {saved}, this bank is {self._fingerprint(lists)}"
        with fs.open_input_stream(f"{path}/{INDEX_FILE}") as f:
            data = np.frombuffer(f.read(), dtype=np.uint8)
        return _faiss().deserialize_index(data), None

    def _keys(self, rows: torch.Tensor) -> torch.Tensor:
        """Centred, normalised float32 keys of `rows` (what the cube's search compares with)."""
        return F.normalize(self.vectors[rows].float() - self.a_mean, dim=-1).contiguous()

    @classmethod
    def read(cls, target: str, a_mean: torch.Tensor) -> AnswerBank:
        """A bank folder (path or URI) into memory, as written (float16 stays float16)."""
        fs, path = filesystem(target)
        try:
            table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
        except (FileNotFoundError, OSError) as e:
            raise BankError(f"no answer bank at {target} ({e}); a run trained before banks existed needs "
                            "`cube train` again") from None
        col = table.column("vector").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)  # flatten: slice-aware
        return cls(table.column("text").to_pylist(), flat, a_mean)

    def extended(self, texts: list[str], vecs: np.ndarray) -> AnswerBank:
        """This bank plus answers it does not hold yet (texts already in it are skipped)."""
        known = set(self.texts)
        keep = [i for i, t in enumerate(texts) if t not in known]
        if not keep:
            return self
        more = torch.as_tensor(np.asarray(vecs)[keep]).to(self.vectors.dtype)
        return AnswerBank(self.texts + [texts[i] for i in keep], torch.cat([self.vectors, more]), self.a_mean)

    def __len__(self) -> int:
        return len(self.texts)

    @torch.no_grad()
    def top(self, pred: torch.Tensor, k: int, raw: bool = False) -> list[list[Answer]]:
        """(B, E) queries → for each, the k best answers by cosine, best first: a centred
        prediction of the cube, or (`raw`) a raw question embedding."""
        q = F.normalize(pred.float(), dim=-1)  # (B, E)
        if self.index is not None and not raw:
            scores, rows = self.index.search(q.contiguous().numpy(), min(k, len(self.texts)))
            return [[Answer(self.texts[i], float(s)) for i, s in zip(row_i, row_s) if i >= 0]
                    for row_i, row_s in zip(rows.tolist(), scores.tolist())]
        shift = None if raw else q @ self.a_mean  # (B,): q·(v − m) = q·v − q·m
        norms = self.raw_norm if raw else self.centred_norm
        k = min(k, len(self.texts))
        best_s = torch.full((len(q), 0), -torch.inf)
        best_i = torch.zeros((len(q), 0), dtype=torch.long)
        for start in range(0, len(self.texts), SEARCH_BLOCK):
            v = self.vectors[start : start + SEARCH_BLOCK].float()
            s = q @ v.T  # (B, block)
            if shift is not None:
                s = s - shift[:, None]
            s = (s / norms[start : start + len(v)]).nan_to_num(nan=-torch.inf)
            s_k, i_k = s.topk(min(k, s.shape[1]), dim=1)
            best_s, order = torch.cat([best_s, s_k], 1).topk(min(k, best_s.shape[1] + s_k.shape[1]), dim=1)
            best_i = torch.cat([best_i, i_k + start], 1).gather(1, order)
        return [[Answer(self.texts[i], float(s)) for i, s in zip(row_i, row_s)]
                for row_i, row_s in zip(best_i.tolist(), best_s.tolist())]

    def nearest(self, pred: torch.Tensor) -> list[Answer]:
        return [row[0] for row in self.top(pred, 1)]
