"""llama_tokenizer.Tokenizer: Meta's Llama 3 file against its published test vectors, sentencepiece against sentencepiece itself,
the converted SmolLM2 vocabulary against the `tokenizers` library (transformers' fast tokenizer)."""
import random
import shutil

import pytest

import llama_tokenizer

SPECIAL_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
               "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009}


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_path):
    return llama_tokenizer.Tokenizer(llama3_tokenizer_path)


def test_reference_vectors(tok):
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13,
                                                                          128001]
    assert tok.encode("Hello, world!") == [9906, 11, 1917, 0]
    assert tok.encode("12345678") == [4513, 10961, 2495]
    assert tok.encode("\n\n") == [271]
    assert [tok.encode(w) for w in ("user", "system", "assistant")] == [[882], [9125], [78191]]
    assert [tok.encode(w) for w in ("left", "down", "right", "up")] == [[2414], [2996], [1315], [455]]  # one each


def test_special_tokens(tok):
    assert tok.n_words == 128256 and len(tok.special_tokens) == 256
    assert {s: tok.special_tokens[s] for s in SPECIAL_IDS} == SPECIAL_IDS
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    assert (tok.bos_id, tok.eos_id) == (128000, 128001) and 128009 in tok.stop_ids
    text = "<|start_header_id|>action<|end_header_id|>"
    as_text = tok.encode(text)  # special-token text in ordinary text stays text
    assert not set(as_text) & set(tok.special_tokens.values()) and tok.decode(as_text) == text
    assert tok.encode(text, allowed_special="all") == [128006, 1335, 128007]
    assert tok.encode(text, allowed_special={"<|start_header_id|>"})[0] == 128006
    assert 128007 not in tok.encode(text, allowed_special={"<|start_header_id|>"})
    assert tok.decode([128000, 9906, 128009]) == "<|begin_of_text|>Hello<|eot_id|>"


def random_unicode(rng, n):
    ranges = [(0x20, 0x7E), (0x0, 0x20), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")
    return "".join(out)


def test_unicode_round_trip(tok):
    rng = random.Random(0)
    for _ in range(300):
        s = random_unicode(rng, rng.randint(0, 60))
        assert tok.decode(tok.encode(s)) == s
    for s in ["", " ", "héllo wörld", "naïve café", "日本語のテキスト", "🙂👍🏽👨‍👩‍👧",
              "\t\r\n \u00a0\u2028",
              "a" * 30000, " " * 30000 + "x", "<|eot_id|>" * 3]:
        assert tok.decode(tok.encode(s)) == s


def test_long_runs_are_cut_like_meta(tok):
    """Meta cuts runs of > 25,000 whitespace or non-whitespace characters before tiktoken: the ids are those
    of the pieces encoded separately."""
    s = "ab" * 20000 + "  \n" + "c" * 10
    pieces = ["ab" * 12500, "ab" * 7500, "  \n", "c" * 10]
    assert tok.encode(s) == [i for p in pieces for i in tok.encode(p)]


def test_found_in_checkpoint_dirs(tmp_path, llama3_tokenizer_path, tok):
    (tmp_path / "a").mkdir()
    shutil.copy(llama3_tokenizer_path, tmp_path / "a" / "tokenizer.model")
    (tmp_path / "b" / "original").mkdir(parents=True)
    shutil.copy(llama3_tokenizer_path, tmp_path / "b" / "original" / "tokenizer.model")
    for d in ("a", "b"):
        assert llama_tokenizer.Tokenizer(tmp_path / d).encode("Hello, world!") == [9906, 11, 1917, 0]
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or original/tokenizer.model"):
        llama_tokenizer.Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        llama_tokenizer.Tokenizer(tmp_path / "nope.model")


def test_save_round_trip(tmp_path, tok):
    tok.save(tmp_path)
    again = llama_tokenizer.Tokenizer(tmp_path)
    text = "<|begin_of_text|>Some text, 1234 — ünïcode 🙂"
    assert again.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert again.special_tokens == tok.special_tokens and again.stop_ids == tok.stop_ids


def test_from_ranks_small_vocabulary(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    for word in (b"ab", b"abc", b" ab"):
        ranks[word] = len(ranks)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    small = llama_tokenizer.Tokenizer.from_ranks(ranks, llama_tokenizer.LLAMA3_PATTERN, specials)
    assert small.special_tokens == {"<|begin_of_text|>": 259, "<|end_of_text|>": 260, "<|eot_id|>": 261}
    assert (small.bos_id, small.eos_id, small.n_words) == (259, 260, 262)
    assert small.encode("abc ab", bos=True) == [259, 257, 258]
    assert small.encode("<|eot_id|>", allowed_special="all") == [261]
    small.save(tmp_path)
    again = llama_tokenizer.Tokenizer(tmp_path / "tokenizer.model")
    assert again.encode("abc ab<|eot_id|>", bos=True, allowed_special="all") == [259, 257, 258, 261]
    assert again.decode(again.encode("zz abcab")) == "zz abcab"


def test_sentencepiece_model_trained_here(tmp_path):
    """A Llama 2 style sentencepiece tokenizer.model is detected by content and behaves like sentencepiece."""
    import sentencepiece as spm
    rng = random.Random(0)
    words = ["frozen", "lake", "agent", "reward", "left", "right", "up", "down", "goal", "hole", "the", "a"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    (tmp_path / "ckpt").mkdir()
    shutil.copy(tmp_path / "sp.model", tmp_path / "ckpt" / "tokenizer.model")
    tok = llama_tokenizer.Tokenizer(tmp_path / "ckpt")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    text = "the agent reached the goal, ünseen wörds 🙂"
    assert tok.encode(text, bos=True, eos=True) == [1] + sp.encode(text) + [2]
    assert (tok.bos_id, tok.eos_id, tok.n_words, tok.stop_ids) == (1, 2, 320, {2})
    for s in [text, "left left up", "42 holes"]:
        assert tok.decode(tok.encode(s)) == s
    tok.save(tmp_path / "saved")
    assert llama_tokenizer.Tokenizer(tmp_path / "saved").encode(text) == sp.encode(text)


SMOL_TEXTS = ["The capital of France is", "Hello world 12345", "  a  1 b\n\n\t 22x", "it's   we'll 3.14159",
              "héllo 世界 🙂", "def f(x):\n    return x**2  # 100%", "x \u00a0 ２３ ١٢٣ Ⅻ ½ \r\n\r\n  \t9"]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_hf(smollm2_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(smollm2_dir)  # the `tokenizers` library's BPE with SmolLM2's pre-tokenizer
    tok = llama_tokenizer.Tokenizer(smollm2_dir)
    rng = random.Random(0)
    alphabet = list("ab 1 2\n\t'sx.,;!?é世🙂\u00a0٣²Ⅻ-_") + ["'ll", "  ", "123"]
    texts = SMOL_TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(1500)]
    encodable = lambda s: "".join(c for c in s if tok.missing_bytes.isdisjoint(c.encode()))  # noqa: E731
    texts += [encodable(random_unicode(rng, 40)) for _ in range(300)]
    for s in texts:
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False), repr(s)
        assert tok.decode(tok.encode(s)) == s
    assert (tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]) == (1, 2)
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(chat, allowed_special="all") == hf.encode(chat, add_special_tokens=False)
    assert tok.n_words == 49152 and 2 in tok.stop_ids and not tok.add_bos
    with pytest.raises(ValueError, match=r"bytes \[4\] that this vocabulary cannot encode"):
        tok.encode("a\x04b")  # SmolLM2's vocabulary has no token for byte 4 (tiktoken would panic)


def test_conversion_cache_is_versioned(tmp_path, monkeypatch):
    """A cached conversion counts only with a marker for this converter version and this GGUF file's size."""
    import json
    import gguf_to_hf
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x" * 123)
    marker = gguf_to_hf.cache_marker(gguf)
    assert marker == {"converter_version": gguf_to_hf.CONVERTER_VERSION, "gguf_size": 123}
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert not gguf_to_hf.cache_is_current(out, marker)  # config.json alone (old or interrupted cache): rebuild
    (out / gguf_to_hf.MARKER).write_text(json.dumps(marker))
    assert gguf_to_hf.cache_is_current(out, marker)
    (out / gguf_to_hf.MARKER).write_text("{broken")
    assert not gguf_to_hf.cache_is_current(out, marker)
    (out / gguf_to_hf.MARKER).write_text(json.dumps(marker))
    monkeypatch.setattr(gguf_to_hf, "CONVERTER_VERSION", gguf_to_hf.CONVERTER_VERSION + 1)
    assert not gguf_to_hf.cache_is_current(out, gguf_to_hf.cache_marker(gguf))  # a changed converter rebuilds
    gguf.write_bytes(b"x" * 124)
    monkeypatch.undo()
    assert not gguf_to_hf.cache_is_current(out, gguf_to_hf.cache_marker(gguf))  # another GGUF file rebuilds
