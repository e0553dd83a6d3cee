"""Mid-training: the chat format. Conversations rendered with the special tokens; loss only on what
the assistant writes. Data: the world's closed-book chats about its training entities, a little
identity and small talk, and your own conversations (stage.conversations=file.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from hybridchat.core.errors import UserError
from hybridchat.core.metrics import exact_match
from hybridchat.core.seeds import SPLIT, python_rng
from hybridchat.data.chat import ChatRenderer, collate, example_batches
from hybridchat.data.conversations import read_conversations
from hybridchat.infra.config import StageConfig
from hybridchat.rag.answer import Answerer
from hybridchat.training.stages import Stage, registered

# Who the assistant is, in a few exchanges: each is repeated so it is not drowned by the world's chats.
SMALL_TALK = (
    ("Hello!", "Hello! Ask me a question and I will look it up in my documents."),
    ("Hi, who are you?", "I am hybridchat, a small language model that answers from retrieved documents."),
    ("What can you do?", "I answer questions from the documents I retrieve, and I cite them."),
    ("Thanks!", "You are welcome."),
    ("Are you a person?", "No, I am a small language model."),
)
SMALL_TALK_COPIES = 10


@dataclass
class MidConfig(StageConfig):
    """Chat format: conversations rendered with the special tokens, loss on assistant tokens."""
    name: str = "mid"
    source: Optional[str] = "pretrain"
    world_conversations: bool = True   # the world's closed-book chats about its training entities
    conversations: Optional[str] = None  # your JSONL of {"messages": [{"role", "content"}, ...]}
    val_fraction: float = 0.05         # share of conversations held out for validation
    eval_questions: int = 100          # closed-book questions answered at each evaluation


@registered
class MidStage(Stage):
    name = "mid"
    config_class = MidConfig

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.config
        self.renderer = ChatRenderer(ctx.tokenizer)
        self.max_len = cfg.model.sequence_len + 1
        chats = []
        if self.config.world_conversations:
            chats += ctx.world.conversations("train")
            chats += [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                      for q, a in SMALL_TALK] * SMALL_TALK_COPIES
        if self.config.conversations:
            chats += read_conversations(self.config.conversations)
        if not chats:
            raise UserError("stage=mid has no conversations: set stage.world_conversations=true or "
                            "stage.conversations=<file.jsonl>")
        if not 0 < self.config.val_fraction < 1:
            raise UserError(f"stage.val_fraction={self.config.val_fraction} must be in (0, 1)")
        python_rng(cfg.seed, SPLIT, "conversations").shuffle(chats)
        n_val = max(1, round(len(chats) * self.config.val_fraction))
        self.val_chats, self.train_chats = chats[:n_val], chats[n_val:]
        if len(self.train_chats) < cfg.gpu.micro_batch:
            raise UserError(f"stage=mid: {len(self.train_chats)} training conversations do not fill one batch of "
                            f"gpu.micro_batch={cfg.gpu.micro_batch}")

    def _example(self, chat):
        ids, mask = self.renderer.render(chat)
        return ids[:self.max_len], mask[:self.max_len]  # a long chat loses its end, never its start

    def train_batches(self, start, rank, world_size):
        return example_batches(len(self.train_chats), lambda i, epoch: self._example(self.train_chats[i]),
                               self.ctx.config.gpu.micro_batch, self.ctx.config.seed, self.renderer.pad_id,
                               start, rank, world_size, self.width_limit, self.config.length_grouping)

    @cached_property
    def _val(self):
        size = self.ctx.config.gpu.micro_batch
        examples = [self._example(c) for c in self.val_chats][:size * self.config.eval_batches]
        return [collate(examples[i:i + size], self.renderer.pad_id) for i in range(0, len(examples), size)]

    def val_batches(self):
        return self._val

    def _questions(self):
        """First turns of the validation chats: facts the model was trained on, asked closed-book."""
        return [(c[0]["content"], c[1]["content"]) for c in self.val_chats][:self.config.eval_questions]

    def evaluate(self, model):
        metrics = super().evaluate(model)
        questions = self._questions()
        if questions and self.ctx.runtime.is_main:
            answers = self._answerer(model).answer([q for q, _ in questions])
            metrics["val/closed_book_em"] = sum(exact_match(a.reply, [gold]) for a, (_, gold)
                                                in zip(answers, questions)) / len(questions)
        return metrics

    def _answerer(self, model):
        return Answerer(model, self.ctx.tokenizer, self.ctx.config.model.sequence_len)

    def samples(self, model):
        questions = self._questions()[:3]
        return [(q, a.reply) for (q, _), a in zip(questions, self._answerer(model).answer([q for q, _ in questions]))]
