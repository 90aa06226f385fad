"""Runs the fine-tuned MiniLM name tagger (``person_model.py``): a name probability per character span.

Name lists and spelling cannot tell that "trump" or "Shaq" is a person, or that "hang out with X" makes
X one; a pretrained transformer can. all-MiniLM-L6-v2 already ships for retrieval (so nothing new is
downloaded or installed), is small (22M parameters) and runs a chat message in a few milliseconds on a
CPU. The base model is always the embedded one, never a retrieval-tuned copy: the shipped layers were
fine-tuned on top of its word embeddings, and a fingerprint of those is checked at load.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import PrivacyError

if TYPE_CHECKING:
    from bot.privacy.person_model import PersonModel

WINDOW = 254  # sub-words per forward pass, plus [CLS] and [SEP]: MiniLM is trained at 256 and below
# Sub-words encoded per text. Every sub-word covers at least one character, so this covers all of one of
# the engine's 2,000-character chunks (prose is about 500 sub-words, random bytes 1,500): no name goes
# unencoded, and time per chunk stays bounded. Longer texts (callers other than the engine) are cut here.
MAX_SUBWORDS = 8 * WINDOW
RETRAIN = "retrain it with python -m bot.privacy.train_names"


def base_dir() -> Path:
    from retrieval.embedder import embedded_model_dir

    return embedded_model_dir()


def fingerprint(bert: Any) -> str:
    """What the fine-tuned layers depend on: the frozen embeddings and the architecture (a transformers
    BertModel, or the plain reader's ``PlainBert`` before any weights are replaced)."""
    if hasattr(bert, "config"):
        config = bert.config
        shape = (config.hidden_size, config.num_hidden_layers, config.vocab_size)
        words, positions = bert.embeddings.word_embeddings.weight, bert.embeddings.position_embeddings.weight
    else:
        shape = (bert.hidden, bert.num_layers, bert.vocab_size)
        words, positions = (bert.tensors[f"embeddings.{n}.weight"] for n in ("word_embeddings", "position_embeddings"))
    digest = hashlib.sha256("/".join(map(str, shape)).encode())
    for weight in (words, positions):
        digest.update(weight.detach()[::97].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_fit(shapes: dict[str, tuple[int, ...]], tensors: dict[str, np.ndarray], layers: int) -> None:
    """The shipped tensors against the encoder's own (``encoder.*`` and ``head.*`` names with shapes):
    the shipped layers must be the top ones, whole."""
    shipped = [n for n in range(layers) if any(k.startswith(f"encoder.layer.{n}.") for k in tensors)]
    skip = min(shipped) if shipped else layers  # below the shipped layers the base model's stay
    own = {k: v for k, v in shapes.items() if not any(k.startswith(f"encoder.layer.{n}.") for n in range(skip))}
    missing = sorted(set(own) - set(tensors))
    wrong = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k])]
    extra = sorted(set(tensors) - set(own))
    if missing or wrong or extra:
        raise PrivacyError(
            f"the name model does not fit the encoder (missing {missing[:3]}, wrong shape {wrong[:3]}, "
            f"unknown {extra[:3]}): {RETRAIN}"
        )


def load_base(model_dir: Path | None = None) -> tuple[Any, Any]:
    """(tokenizer, BertModel) of the embedded MiniLM; imports torch and transformers."""
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a chat adapter's terminal is not the place for one
        hf_logging.set_verbosity_error()
        model_dir = model_dir or base_dir()
        return AutoTokenizer.from_pretrained(str(model_dir)), AutoModel.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001 - whatever stops the model loading, names can't be found
        raise PrivacyError(f"the name encoder could not be loaded from {model_dir}: {err}") from err


class TokenTagger:
    """The torch module: MiniLM plus a one-unit head giving a name logit per sub-word."""

    def __init__(self, bert: Any) -> None:
        import torch

        self.bert = bert
        self.head = torch.nn.Linear(bert.config.hidden_size, 1)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> Any:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden)[..., 0]

    def _tensors(self, skip_layers: int = 0) -> dict[str, Any]:
        out = {
            f"encoder.{k}": v
            for k, v in self.bert.encoder.state_dict().items()
            if not any(k.startswith(f"layer.{n}.") for n in range(skip_layers))
        }
        out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return out

    def trained_tensors(self, skip_layers: int = 0) -> dict[str, np.ndarray]:
        """What training changed (the upper transformer layers and the head), in fp16; the embeddings
        and the lowest ``skip_layers`` layers stay the embedded MiniLM's."""
        return {
            k: v.detach().float().numpy().astype(np.float16) for k, v in self._tensors(skip_layers).items()
        }

    def load_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        import torch

        own = self._tensors()
        check_fit({k: tuple(v.shape) for k, v in own.items()}, tensors, self.bert.config.num_hidden_layers)
        with torch.no_grad():
            for key in tensors:
                own[key].copy_(torch.from_numpy(np.asarray(tensors[key], dtype=np.float32)))


def quantize(bert: Any) -> None:
    """Dynamic int8 for the transformer's linear layers (weights int8, activations quantized per call).

    The linear layers are most of the encoder's time on a CPU; ``bench/privacy_latency.py`` measures
    int8 against fp32 in one run, with the share of training messages whose masks stay the same. It
    moves the name probabilities, so the threshold must be chosen by cross-validation through this same
    path (``train_names`` scores its folds in int8 unless ``--fp32``). The head stays fp32: one unit."""
    import warnings

    import torch

    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the eager API still works in this torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.ao.quantization.quantize_dynamic(bert, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (the decode engine's probe)."""
    from model.engine import native_bf16 as probe

    return probe()


class TokenEncoder:
    """``vectors(text, spans)``: per character span, the mean name probability over its sub-words.

    ``prefetch(text)`` starts the encoding on the encoder's own thread. The engine calls it for each
    piece before spaCy reads that piece: the two are independent, each mostly one core's work
    (torch's matrix products and spaCy's thinc layers release the GIL), so on two cores a message costs
    about the slower of them instead of their sum. ``forget`` drops what nobody asked for."""

    width = 1

    def __init__(
        self,
        model: PersonModel,
        model_dir: Path | None = None,
        threads: int = 0,
        cache_size: int = 0,
        int8: bool = False,
        bf16: bool = False,
    ) -> None:
        import torch

        self._torch = torch
        self.model = model  # held, so that shared_encoder's key (its id) stays unique
        self.int8 = int8
        self.bf16 = bf16 and not int8 and native_bf16()
        # Without transformers where it can (retrieval/bert.py: a process that anonymizes starts seconds
        # sooner); dynamic int8 quantizes transformers' Linear modules, so int8 keeps them.
        self.plain, self.head = (None, None) if int8 else self._plain(model, model_dir)
        if self.plain is not None:
            self._cls, self._sep = (self.plain.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))
        else:
            self.tokenizer, bert = load_base(model_dir)
            self._cls, self._sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
            self._check_base(fingerprint(bert))
            self.tagger = TokenTagger(bert)
            self.tagger.load_tensors(model.tensors)
            bert.eval()
            if int8:
                quantize(bert)
            elif self.bf16:
                bert.to(torch.bfloat16)
                self.tagger.head.to(torch.bfloat16)
        if threads:
            torch.set_num_threads(threads)
        self._cache: OrderedDict[str, tuple[list[tuple[int, int]], np.ndarray]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pending: dict[str, Future[tuple[list[tuple[int, int]], np.ndarray]]] = {}
        self._pending_lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self._worker_pid = 0

    def _check_base(self, found: str) -> None:
        if found != self.model.base:
            raise PrivacyError(
                f"the name model was trained on another base encoder (fingerprint {self.model.base}, "
                f"the embedded MiniLM is {found}): {RETRAIN}"
            )

    def _plain(self, model: PersonModel, model_dir: Path | None) -> tuple[Any, Any]:
        """(MiniLM with the shipped layers on ``PlainBert``, the head's weight and bias); (None, None)
        where that reader does not apply."""
        torch = self._torch
        from retrieval.bert import PlainBert, Unsupported

        try:
            bert = PlainBert(model_dir or base_dir())
        except Unsupported:
            return None, None
        except Exception as err:  # noqa: BLE001 - whatever stops the model loading, names can't be found
            raise PrivacyError(f"the name encoder could not be loaded from {model_dir or base_dir()}: {err}") from err
        self._check_base(fingerprint(bert))
        shapes = {k: tuple(v.shape) for k, v in bert.tensors.items() if k.startswith("encoder.")}
        check_fit({**shapes, "head.weight": (1, bert.hidden), "head.bias": (1,)}, model.tensors, bert.num_layers)
        shipped = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in model.tensors.items()}
        head = (shipped.pop("head.weight"), shipped.pop("head.bias"))
        bert.replace(shipped)
        if self.bf16:
            bert.cast(torch.bfloat16)
            head = tuple(t.to(torch.bfloat16) for t in head)
        return bert, head

    def _logits(self, window: list[int]) -> Any:
        torch = self._torch
        if self.plain is None:
            return self.tagger.logits(torch.tensor([window]))[0]
        ids = torch.tensor([window])
        hidden = self.plain.forward(ids, torch.ones_like(ids))[0]
        return torch.nn.functional.linear(hidden, *self.head)[..., 0]

    def prefetch(self, text: str) -> None:
        with self._pending_lock:
            if text in self._pending:
                return
            if self._worker is None or self._worker_pid != os.getpid():
                # A forked child inherits the executor but not its thread: a fresh one, or it would wait forever.
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="name-encoder")
                self._worker_pid = os.getpid()
            self._pending[text] = self._worker.submit(self._encode, text)

    def forget(self, text: str) -> None:
        with self._pending_lock:
            self._pending.pop(text, None)

    def _states(self, text: str) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Sub-word character offsets and their name probabilities (n_subwords x 1)."""
        with self._pending_lock:
            pending = self._pending.pop(text, None)
        if pending is not None:
            return pending.result()
        return self._encode(text)

    def _encode(self, text: str) -> tuple[list[tuple[int, int]], np.ndarray]:
        with self._lock:
            found = self._cache.get(text)
            if found is not None:
                return found
            # Under the lock: the fast tokenizer's settings change on its first call, which is not
            # thread-safe. Long text is run in windows below, so its length warning does not apply.
            if self.plain is not None:
                plain = self.plain.tokenizer.encode(text, add_special_tokens=False)
                encoded = {"input_ids": plain.ids, "offset_mapping": plain.offsets}
            else:
                encoded = self.tokenizer(
                    text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
                )
        ids: list[int] = encoded["input_ids"][:MAX_SUBWORDS]
        offsets = [tuple(o) for o in encoded["offset_mapping"][:MAX_SUBWORDS]]
        states = np.zeros((len(ids), 1), dtype=np.float32)
        torch = self._torch
        with self._lock, torch.inference_mode():
            for start in range(0, len(ids), WINDOW):
                window = [self._cls, *ids[start : start + WINDOW], self._sep]
                logits = self._logits(window)[1:-1]
                states[start : start + len(window) - 2, 0] = torch.sigmoid(logits.float()).numpy()
        result = (offsets, states)  # type: ignore[assignment]
        if self._cache_size:  # cross-validation scores each row at every threshold
            with self._lock:
                self._cache[text] = result  # type: ignore[assignment]
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result  # type: ignore[return-value]

    def vectors(self, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """One probability per span (n x 1), and whether the span was encoded (see ``MAX_SUBWORDS``)."""
        out = np.zeros((len(spans), 1), dtype=np.float32)
        covered = np.zeros(len(spans), dtype=bool)
        if not spans:
            return out, covered
        offsets, states = self._states(text)
        if not offsets:
            return out, covered
        # Sub-word offsets are in reading order: the ones inside [start, end) are a slice, found by bisection.
        starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
        ends = np.fromiter((b for _, b in offsets), dtype=np.int64, count=len(offsets))
        for row, (start, end) in enumerate(spans):
            first = int(np.searchsorted(ends, start, side="right"))
            last = int(np.searchsorted(starts, end, side="left"))
            if last > first:
                out[row] = states[first:last].mean(axis=0)
                covered[row] = end <= ends[-1]
        return out, covered


_shared: dict[Any, TokenEncoder] = {}
_shared_lock = threading.Lock()


def shared_encoder(
    model: PersonModel,
    model_dir: Path | None = None,
    threads: int = 0,
    int8: bool = False,
    bf16: bool = False,
) -> TokenEncoder:
    """One encoder per process, name model, base folder and precision (``load_person_model`` caches the
    model)."""
    with _shared_lock:
        key = (id(model), model_dir, threads, int8, bf16)
        encoder = _shared.get(key)
        if encoder is None:
            encoder = _shared[key] = TokenEncoder(model, model_dir, threads, int8=int8, bf16=bf16)
        return encoder
