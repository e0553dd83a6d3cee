"""The model built for its tokenizer: a new one to train, or one to load a checkpoint's weights into.

Beyond the vocabulary size, the model reads one thing from the tokenizer: with model.request_match,
the ids of the tokens around a request (model/request_match.py), which the tokenizer's chat format
names (data/chat.py). The model itself knows no token by name.
"""

from __future__ import annotations

from hybridchat.core.errors import UserError
from hybridchat.data.chat import ChatFormat
from hybridchat.data.tokenizer import Tokenizer
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.model.request_match import RequestMarkers


def request_markers(tokenizer: Tokenizer | None) -> RequestMarkers:
    """The tokenizer's request markers (None: a tokenizer trained here), or one line saying it has none."""
    try:
        chat = ChatFormat.ours() if tokenizer is None else ChatFormat.for_tokenizer(tokenizer)
    except ValueError:  # neither chat format, so no request tokens either
        chat = None
    if chat is None or chat.request_markers is None:
        raise UserError("model.request_match=true needs hybridchat's chat tokens (<|user_start|>, <|query_start|>, "
                        "...); this tokenizer has its own: set it false")
    return RequestMarkers(*chat.request_markers)


def build_model(config: ModelConfig, vocab_size: int, tokenizer: Tokenizer | None = None,
                ssm_backend: str = "torch") -> HybridLM:
    """HybridLM(config, vocab_size) with what it reads from `tokenizer`; weights not initialised.
    tokenizer None: one trained here, for a model run on token ids alone (benchmarks, tests)."""
    markers = request_markers(tokenizer) if config.request_match else None
    return HybridLM(config, vocab_size, ssm_backend=ssm_backend, request_markers=markers)
