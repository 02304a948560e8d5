"""Meta's Llama 3 tokenizer by hand: tiktoken BPE ranks, the Llama 3 split pattern and special tokens.

Follows Meta's reference `llama/tokenizer.py` (Llama 3.1); checked against Meta's own `tokenizer.model` and its
published test vectors (tests/test_tokenizer.py). The same class reads a Llama 2 sentencepiece model and any tiktoken
vocabulary with a sidecar (SmolLM2's byte-level BPE, converted by gguf_to_hf.py), and builds the cpu preset's small
vocabulary from ranks (`Tokenizer.from_ranks`).
"""
import base64
import json
import re
from pathlib import Path

from checkpoint import atomic_write

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(LLAMA3_SPECIALS) + 2)]
TIKTOKEN_SIDECAR = "tiktoken.json"  # pattern + special tokens for tiktoken vocabularies that are not Meta's Llama 3
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000  # Meta's limits (tiktoken's regex is slow on huge runs)


def _find_tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"{path}: no tokenizer.model or original/tokenizer.model")
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    return path


def _runs_of_at_most(s: str, n: int):
    """Cuts s so that no piece has more than n consecutive whitespace or non-whitespace characters (Meta's rule)."""
    start, run, space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != space:
            space, run = ch.isspace(), 1
        else:
            run += 1
            if run > n:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class Tokenizer:
    """Meta's Llama 3 tiktoken BPE (or any tiktoken vocabulary with a sidecar), or a Llama 2 sentencepiece model.
    Special-token text inside ordinary text is encoded as text unless listed in `allowed_special` (or "all")."""

    def __init__(self, path):
        file = _find_tokenizer_file(Path(path))
        with open(file, "rb") as f:
            head = f.readline()
        if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", head):  # tiktoken: "base64(bytes) rank" per line
            from tiktoken.load import load_tiktoken_bpe
            ranks = load_tiktoken_bpe(str(file))
            sidecar = file.parent / TIKTOKEN_SIDECAR
            if sidecar.exists():
                meta = json.loads(sidecar.read_text())
                self._init_tiktoken(ranks, meta["pattern"], meta["special_tokens"], meta.get("bos"), meta.get("eos"),
                                    meta.get("stop", []), meta.get("add_bos", False))
            else:  # Meta's Llama 3 tokenizer.model: specials follow the 128000 ranks
                specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
                self._init_tiktoken(ranks, LLAMA3_PATTERN, specials, "<|begin_of_text|>", "<|end_of_text|>",
                                    ["<|eom_id|>", "<|eot_id|>"], True)
        else:  # Llama 2 style sentencepiece protobuf
            import sentencepiece as spm
            self.sp = spm.SentencePieceProcessor(model_file=str(file))
            self.model, self.special_tokens, self.n_words = None, {}, self.sp.vocab_size()
            self.bos_id, self.eos_id, self.add_bos = self.sp.bos_id(), self.sp.eos_id(), True
            self.stop_ids, self.missing_bytes = {self.eos_id}, set()

    def _init_tiktoken(self, ranks, pattern, special_tokens, bos, eos, stop, add_bos):
        import tiktoken
        self.sp, self.pattern, self.ranks, self.add_bos = None, pattern, ranks, add_bos
        self.special_tokens = dict(special_tokens)
        self.model = tiktoken.Encoding("llama", pat_str=pattern, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.missing_bytes = {b for b in range(256) if bytes([b]) not in ranks}  # SmolLM2 lacks 21 (tiktoken panics)
        self.bos_id, self.eos_id = self.special_tokens.get(bos), self.special_tokens.get(eos)
        self.stop_ids = {self.eos_id} | {self.special_tokens[s] for s in stop if s in self.special_tokens}

    @classmethod
    def from_ranks(cls, mergeable_ranks: dict, pattern: str, special_tokens: list) -> "Tokenizer":
        """A tiktoken tokenizer from a vocabulary; special tokens get the ids after the ranks.
        bos/eos are <|begin_of_text|>/<|end_of_text|> when those names are among the specials."""
        tok = cls.__new__(cls)
        first = max(mergeable_ranks.values()) + 1
        specials = {s: first + i for i, s in enumerate(special_tokens)}
        tok._init_tiktoken(dict(mergeable_ranks), pattern, specials, "<|begin_of_text|>", "<|end_of_text|>",
                           ["<|eot_id|>"], "<|begin_of_text|>" in specials)
        return tok

    def encode(self, text: str, bos=False, eos=False, allowed_special=()) -> list:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        if self.sp is not None:
            ids = self.sp.encode(text)
        else:
            if self.missing_bytes and not self.missing_bytes.isdisjoint(text.encode("utf-8", "replace")):
                bad = sorted(self.missing_bytes.intersection(text.encode("utf-8", "replace")))
                raise ValueError(f"text contains bytes {bad} that this vocabulary cannot encode; remove them first")
            ids = []
            for i in range(0, len(text), MAX_ENCODE_CHARS):
                for piece in _runs_of_at_most(text[i:i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                    ids += self.model.encode(piece, allowed_special=set(allowed_special) if allowed_special != "all"
                                             else "all", disallowed_special=())
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.sp is not None else self.model.decode(ids)

    def save(self, path):
        """Writes path/tokenizer.model (+ tiktoken.json for tiktoken vocabularies) that Tokenizer(path) loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.sp is not None:
            atomic_write(path / "tokenizer.model", lambda tmp: Path(tmp).write_bytes(self.sp.serialized_model_proto()))
            return
        by_rank = sorted(self.ranks.items(), key=lambda item: item[1])
        lines = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank)
        inv = {i: s for s, i in self.special_tokens.items()}
        meta = {"pattern": self.pattern, "special_tokens": self.special_tokens, "bos": inv.get(self.bos_id),
                "eos": inv.get(self.eos_id), "stop": [inv[i] for i in sorted(self.stop_ids) if i in inv],
                "add_bos": self.add_bos}
        atomic_write(path / "tokenizer.model", lambda tmp: Path(tmp).write_text(lines))
        atomic_write(path / TIKTOKEN_SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
