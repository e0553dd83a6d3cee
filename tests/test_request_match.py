"""The request-match feature (model/request_match.py) against a plain loop, in a model's cached and
full forwards, and in checkpoints."""

import dataclasses
import random

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from hybridchat.core.errors import UserError
from hybridchat.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from hybridchat.infra import checkpoint
from hybridchat.infra.build import request_markers
from hybridchat.model.config import ModelConfig
from hybridchat.model.lm import HybridLM
from hybridchat.model.request_match import RequestMarkers, request_match
from hybridchat.training.runs import load_run
from tests.conftest import random_model

# Every tokenizer trained here reserves the first ids for SPECIAL_TOKENS, in order.
USER_START, USER_END = SPECIAL_TOKENS.index("<|user_start|>"), SPECIAL_TOKENS.index("<|user_end|>")
QUERY_START, QUERY_END = SPECIAL_TOKENS.index("<|query_start|>"), SPECIAL_TOKENS.index("<|query_end|>")
MARKERS = RequestMarkers(starts=(USER_START, QUERY_START), ends=(USER_END, QUERY_END))


def reference(ids: list[int], markers: RequestMarkers = MARKERS) -> list[bool]:
    """Token by token: a start opens a new request, an end closes it; outside, a token is marked when
    the latest request holds it."""
    marked, inside, request = [], False, set()
    for t in ids:
        if t in markers.starts:
            inside, request = True, set()
            marked.append(False)
        elif t in markers.ends:
            inside = False
            marked.append(t in request)
        elif inside:
            request.add(t)
            marked.append(False)
        else:
            marked.append(t in request)
    return marked


def test_a_hand_made_conversation():
    ids = [0, USER_START, 20, 21, 22, USER_END, 5, 7, 30, 21, 31, 22, 8, 6, 3, 21, QUERY_START, 40, 21, QUERY_END,
           40, 22, 21]
    want = [0] * 9 + [1, 0, 1, 0, 0, 0, 1] + [0] * 4 + [1, 0, 1]  # after the query, 22 is no longer asked for
    assert request_match(torch.tensor([ids]), MARKERS).int().tolist() == [want]
    assert reference(ids) == [bool(w) for w in want]


def test_random_sequences_match_the_plain_loop():
    rng = random.Random(0)
    markers = [USER_START, USER_END, QUERY_START, QUERY_END]
    rows = [[rng.choice(markers) if rng.random() < 0.12 else rng.randrange(16, 24) for _ in range(60)]
            for _ in range(40)]  # stray ends, starts twice, requests left open: all in here
    got = request_match(torch.tensor(rows), MARKERS).tolist()
    assert got == [reference(r) for r in rows]
    assert 0.05 < sum(map(sum, got)) / (40 * 60) < 0.8


@pytest.mark.parametrize("pattern", ["MAMA", "AAAA", "MMMM"])
@pytest.mark.parametrize("pointer", [True, False])
def test_cached_chunks_and_decode_equal_the_full_forward(pattern, pointer):
    model = random_model(pattern, 4, 48, torch.float64, 0, 0.3, pointer=pointer, request_match=True)
    ids = torch.tensor([[0, USER_START, 20, 21, 22, USER_END, 5, 7, 30, 21, 31, 22, 8, 6, 3, 21, QUERY_START, 40,
                         21, QUERY_END, 40, 22, 21]] * 2)
    full = model(ids)
    cache = model.allocate_cache(2, 32)
    parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:15], cache=cache)]
    parts += [model(ids[:, t:t + 1], cache=cache) for t in range(15, ids.size(1))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-10)


def test_the_feature_changes_the_output_and_a_zero_vector_is_the_model_without_it():
    on = random_model("MAMA", 4, 48, torch.float64, 0, 0.3, pointer=True, request_match=True)
    off = random_model("MAMA", 4, 48, torch.float64, 0, 0.3, pointer=True)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if not k.startswith("request_match")})
    ids = torch.tensor([[0, USER_START, 20, 21, USER_END, 30, 21, 31, 20]])
    assert (on(ids) - off(ids)).abs()[0, 6:].max() > 1e-3  # 21 and 20 are marked after the request
    torch.testing.assert_close(on(ids)[0, :6], off(ids)[0, :6])  # nothing marked before: the same
    with torch.no_grad():
        on.request_match.weight.zero_()
    torch.testing.assert_close(on(ids), off(ids))


def test_checkpoints_record_it_load_it_back_and_refuse_a_mismatch(tmp_path):
    model = random_model("MAMA", 4, 300, torch.float32, 0, 0.3, pointer=True, request_match=True)
    tokenizer = Tokenizer.train(["some text"], 300)
    meta = {"config": {"model": dataclasses.asdict(model.config)}, "tokenizer": tokenizer.fingerprint}
    path = checkpoint.save(tmp_path / "run", 1, model, [], meta, keep=1, tokenizer=tokenizer)
    assert checkpoint.read_meta(path)["architecture"]["request_match"] is True
    loaded = load_run(path).model
    ids = torch.tensor([[0, USER_START, 20, 21, USER_END, 30, 21, 31, 20]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(UserError, match="request_match: checkpoint True vs config False"):
        checkpoint.load(path, random_model("MAMA", 4, 300, torch.float32, 0, 0.0, pointer=True))


def test_the_markers_are_a_tokenizer_of_ours_reserved_ids():
    """What the model was built with before the ids were passed in: a tokenizer trained here, and a
    model run on token ids alone (tokenizer None), get the same reserved ids."""
    assert request_markers(Tokenizer.train(["some text"], 300)) == MARKERS
    assert request_markers(None) == MARKERS


def test_the_markers_are_read_from_the_tokenizer_and_a_tokenizer_without_them_is_one_line():
    """The special tokens in another order: the markers follow the tokenizer's ids, and the mask follows
    the markers (no id is built in). A ChatML vocabulary, or one of neither format, has no markers."""
    shuffled = list(reversed(SPECIAL_TOKENS))
    vocab = {t: i for i, t in enumerate(shuffled + list("abcdefgh"))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="a"))
    hf.add_special_tokens(shuffled)
    markers = request_markers(Tokenizer(hf))
    assert markers == RequestMarkers(starts=(shuffled.index("<|user_start|>"), shuffled.index("<|query_start|>")),
                                     ends=(shuffled.index("<|user_end|>"), shuffled.index("<|query_end|>")))
    rng = random.Random(2)
    rows = [[rng.choice(markers.starts + markers.ends) if rng.random() < 0.12 else rng.randrange(16, 24)
             for _ in range(40)] for _ in range(10)]
    assert request_match(torch.tensor(rows), markers).tolist() == [reference(r, markers) for r in rows]
    for specials in (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<|endoftext|>"]):
        hf = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(specials + ["a"])}, unk_token="a"))
        hf.add_special_tokens(specials)
        with pytest.raises(UserError, match=r"model.request_match=true needs hybridchat's chat tokens"):
            request_markers(Tokenizer(hf))


def test_a_model_built_without_markers_is_sized_but_refuses_to_run():
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=4, n_kv_head=2, block_pattern="A", request_match=True)
    model = HybridLM(cfg, vocab_size=64)
    assert model.request_match.weight.numel() == 32
    with pytest.raises(ValueError, match="request markers"):
        model(torch.tensor([[0, USER_START, 20, USER_END, 20]]))


def test_the_last_positions_alone_equal_the_whole_mask():
    rng = random.Random(1)
    markers = [USER_START, USER_END, QUERY_START, QUERY_END]
    ids = torch.tensor([[rng.choice(markers) if rng.random() < 0.12 else rng.randrange(16, 24) for _ in range(50)]
                        for _ in range(8)])
    whole = request_match(ids, MARKERS)
    for new in (1, 7, 50):
        assert torch.equal(request_match(ids, MARKERS, new), whole[:, -new:])


def test_the_module_alone_init_scale_cache_ids_and_default_position():
    """RequestMatch outside a model (mutmut's survivors): init_weights draws N(0, std); the decoding
    cache holds token ids exactly (int64: ids past 2^24 stay distinct, which float32 would merge) on
    the device asked for, also under another default device; forward's default position is 0."""
    from hybridchat.model.request_match import RequestMatch

    module = RequestMatch(4096, MARKERS)
    torch.manual_seed(0)
    module.init_weights(0.02)
    assert module.weight.std().item() == pytest.approx(0.02, rel=0.05) and abs(module.weight.mean()) < 0.002
    with torch.device("meta"):
        cache = module.allocate_cache(1, 8, device=torch.device("cpu"))
    assert cache.ids.device == torch.device("cpu") and cache.ids.shape == (1, 8)
    # 2^24 + 1 rounds to 2^24 in float32: the asked id and a different one would match.
    big, other = 2**24 + 1, 2**24
    ids = torch.tensor([[USER_START, big, USER_END, other, big]])
    x = torch.zeros(1, 5, 4096, dtype=torch.float64)
    out = module(x, ids, cache)  # no pos: the tokens are the first ones
    assert cache.ids[0, :5].tolist() == ids[0].tolist() and cache.ids[0, 5:].tolist() == [0, 0, 0]
    marked = (out != 0).all(-1)[0].tolist()
    assert marked == reference(ids[0].tolist()) == [False, False, False, False, True]


def test_the_mask_needs_no_default_device_and_the_module_keeps_the_input_dtype_and_its_messages():
    """request_match makes every tensor on the ids' device (under another default device too); the
    module adds its vector (not subtracts) in the embeddings' dtype, fills its cache up to max_len
    exactly and refuses one token more, and says what a model built without markers lacks."""
    from hybridchat.model.request_match import RequestMatch

    ids = [0, USER_START, 20, 21, USER_END, 21, 22, QUERY_START, 22, QUERY_END, 20, 22]
    with torch.device("meta"):
        got = request_match(torch.tensor([ids], device="cpu"), MARKERS)
    assert got.device == torch.device("cpu") and got[0].tolist() == reference(ids)
    module = RequestMatch(8, MARKERS)
    module.init_weights(1.0)
    x = torch.randn(1, len(ids), 8).to(torch.bfloat16)
    out = module(x, torch.tensor([ids]))
    assert out.dtype == torch.bfloat16
    want = x + torch.tensor(reference(ids))[None, :, None] * module.weight.detach().to(torch.bfloat16)
    assert torch.equal(out.detach(), want)
    cache = module.allocate_cache(1, len(ids))
    module(x[:, :4], torch.tensor([ids[:4]]), cache, pos=0)
    module(x[:, 4:], torch.tensor([ids[4:]]), cache, pos=4)  # exactly full
    assert cache.ids[0].tolist() == ids
    with pytest.raises(ValueError, match=r"^request-match cache is full: 12 cached \+ 1 new tokens > max_len=12$"):
        module(x[:, :1], torch.tensor([[20]]), cache, pos=12)
    with pytest.raises(ValueError, match=r"^request-match cache is full: 2 cached \+ 11 new tokens > max_len=12$"):
        module(x[:, :11], torch.tensor([ids[:11]]), cache, pos=2)
    with pytest.raises(ValueError, match=r"^model\.request_match needs the tokenizer's request markers: build the "
                                         r"model with HybridLM\(\.\.\., request_markers=\.\.\.\)$"):
        RequestMatch(8, None)(x, torch.tensor([ids]))
