"""LLaMA 3.1 by hand: model, KV cache, HF checkpoint loader/saver, sampling (the tokenizer: llama_tokenizer.py).

Follows Meta's reference `llama/model.py` (Llama 3.1); checked number for number against
transformers' `LlamaForCausalLM` (tests/test_llama.py). Deliberate differences from Meta's code:
- Weights stay in the HF checkpoint layout: q/k rows in HF order, so RoPE rotates the pairs (j, j + D/2)
  ("rotate_half") instead of Meta's interleaved (2j, 2j+1). Same math on permuted rows; no conversion at load time.
- Attention goes through `F.scaled_dot_product_attention`; the plain softmax(QKᵀ/√D)V is beside it
  (`model.use_sdpa = False`) for reading and for checking.
- The KV cache accepts a per-row start position (batched evaluation of histories of different lengths).
- `logits_at` / `vocab_ids` send only chosen positions and vocabulary rows through the LM head (Q-values need
  4 logits at a few hundred positions, not a (B, T, 128256) float32 tensor).
- An optional IA3 adapter (`adapter.layer_scales(i) -> (l_k, l_v, l_ff)`) scales k, v and the down-projection input.
"""
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoint import atomic_write

LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}


@dataclass
class ModelArgs:  # defaults: Llama 3.1 8B
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(LLAMA3_ROPE_SCALING))  # None = plain RoPE
    max_seq_len: int = 131072
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Reads both transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) config styles."""
        if cfg.get("model_type") != "llama":
            raise ValueError(f"config.json: model_type is {cfg.get('model_type')!r}, expected 'llama' "
                             f"(architectures {cfg.get('architectures')}); only LLaMA checkpoints are supported")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ValueError(f"config.json: {key}=true is not supported (LLaMA has no biases)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r}, expected 'silu'")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"config.json: rope_type {rope_type!r} not supported (expected 'default' or 'llama3')")
        scaling = None
        if rope_type == "llama3":
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_SCALING if k != "rope_type"}}
        args = cls(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                   n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                   vocab_size=cfg["vocab_size"], ffn_dim=cfg["intermediate_size"],
                   norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
                   max_seq_len=cfg.get("max_position_embeddings", 8192),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
        if cfg.get("head_dim", args.head_dim) != args.head_dim or args.n_heads % args.n_kv_heads:
            raise ValueError(f"config.json: need head_dim == hidden_size / heads and heads % kv_heads == 0, got "
                             f"head_dim {cfg.get('head_dim')}, {args.n_heads} heads, {args.n_kv_heads} kv heads")
        return args

    def to_hf_config(self) -> dict:
        """transformers 5.x style (`rope_parameters`); 5.x also reads the 4.x style, `from_hf_config` reads both."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.dim,
                "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
                "intermediate_size": self.ffn_dim, "rms_norm_eps": self.norm_eps, "hidden_act": "silu",
                "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_word_embeddings,
                "attention_bias": False, "mlp_bias": False,
                "rope_parameters": {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})}}


def ffn_hidden_dim(dim: int, ffn_dim_multiplier: float, multiple_of: int) -> int:
    """Meta's FFN width rule: multiple_of · ceil(int(mult · int(8·dim/3)) / multiple_of)."""
    hidden = int(ffn_dim_multiplier * int(2 * (4 * dim) / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """ω_i = θ^(-2i/D), i < D/2, float32; llama3 scaling divides long wavelengths by `factor` (smoothly)."""
    omega = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (D/2,)
    if scaling is None:
        return omega
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / omega
    s = (old_ctx / wavelen - low) / (high - low)  # 0 at λ = old_ctx/low, 1 at λ = old_ctx/high
    smoothed = (1 - s) * omega / factor + s * omega
    return torch.where(wavelen < old_ctx / high, omega, torch.where(wavelen > old_ctx / low, omega / factor, smoothed))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, 1, T, D): rotate each pair (x_j, x_{j+D/2}) by angle pos·ω_j."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # float32 inside (bf16 x² loses too much), cast back, then the weight
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@dataclass
class KVCache:
    k: list  # per layer (B, n_kv_heads, max_len, head_dim), keys after RoPE, not repeated over query heads
    v: list

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, i, k, v, *, start_pos, positions, kv_len):
        """Writes k, v (B, Hkv, T, D) at their positions; returns the cache's first kv_len positions."""
        B, T = k.shape[0], k.shape[2]
        ck, cv = self.k[i][:B], self.v[i][:B]
        if isinstance(start_pos, int):
            ck[:, :, start_pos:start_pos + T], cv[:, :, start_pos:start_pos + T] = k, v
        else:  # per-row positions (B, T): advanced indexing puts (B, T) first -> values as (B, T, Hkv, D)
            rows = torch.arange(B, device=k.device)[:, None]
            ck[rows, :, positions], cv[rows, :, positions] = k.transpose(1, 2), v.transpose(1, 2)
        return ck[:, :, :kv_len], cv[:, :, :kv_len]


def sdpa(q, k, v, **kw):
    """F.scaled_dot_product_attention, on CUDA without the cuDNN backend: torch 2.11 prefers it on Hopper, and it
    builds a plan per exact shape (evaluation's shapes change every step) with open reports of wrong results under
    masks and GQA. Flash, memory-efficient and math stay as they are; the CPU path is the plain call."""
    if not q.is_cuda or not torch.backends.cuda.cudnn_sdp_enabled():
        return F.scaled_dot_product_attention(q, k, v, **kw)
    torch.backends.cuda.enable_cudnn_sdp(False)  # two flag flips: sdpa_kernel's context costs ~10 µs a layer
    try:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def attention(q, k, v, mask, causal, use_sdpa):
    """q (B, H, T, D); k, v (B, Hkv, L, D); mask (B, 1, T, L) bool (True = attend) or None -> (B, H, T, D)."""
    if use_sdpa and mask is not None and k.shape[1] != q.shape[1]:
        # SDPA's GQA with a mask falls back to the math kernel on CUDA, which copies K/V per query head; fold the
        # query heads of each KV head into the sequence instead: (B, Hkv, rep·T, D) reads its own K/V, no copies
        B, H, T, D = q.shape
        rep = H // k.shape[1]
        mask = mask[:, :, None].expand(-1, -1, rep, -1, -1).reshape(B, 1, rep * T, -1)  # (B, 1, rep·T, L)
        out = sdpa(q.reshape(B, k.shape[1], rep * T, D), k, v, attn_mask=mask)
        return out.reshape(B, H, T, D)  # CUDA's fused kernels return a transposed (B, rep·T, Hkv, D) buffer
    if use_sdpa:
        return sdpa(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    rep = q.shape[1] // k.shape[1]  # query head h reads KV head h // rep
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, L)
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, rope, mask, causal, cache_write, scales, use_sdpa):
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if scales is not None:  # IA3: k scaled before RoPE, product back in the activation dtype
            k, v = (k * scales[0]).to(x.dtype), (v * scales[1]).to(x.dtype)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache_write is not None:
            k, v = cache_write(k, v)  # (B, Hkv, L, D) with the history
        out = attention(q, k, v, mask, causal, use_sdpa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)  # up

    def forward(self, x, l_ff=None):  # SwiGLU: w2(silu(w1 x) ⊙ w3 x [⊙ l_ff])
        h = F.silu(self.w1(x)) * self.w3(x)
        if l_ff is not None:
            h = (h * l_ff).to(x.dtype)
        return self.w2(h)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, mask, causal, cache_write, adapter, use_sdpa):
        scales = adapter.layer_scales(self.layer_id) if adapter is not None else None
        h = x + self.attention(self.attention_norm(x), rope, mask, causal, cache_write, scales, use_sdpa)
        return h + self.feed_forward(self.ffn_norm(h), scales[2] if scales is not None else None)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # N(0, 1) like nn.Embedding, but not on the meta device (load): meta normal_ imports torch._dynamo (~1 s)
        weight = torch.empty(args.vocab_size, args.dim)
        weight = weight if weight.is_meta else weight.normal_()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=weight)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.use_sdpa = True  # False: the readable softmax(QKᵀ/√D)V path

    def new_cache(self, batch_size, max_len, device=None, dtype=None) -> KVCache:
        w = self.tok_embeddings.weight
        shape = (batch_size, self.args.n_kv_heads, max_len, self.args.head_dim)
        make = lambda: torch.zeros(shape, device=device or w.device, dtype=dtype or w.dtype)  # noqa: E731
        return KVCache([make() for _ in self.layers], [make() for _ in self.layers])

    def forward(self, tokens, start_pos=0, cache=None, adapter=None, logits_at=None, vocab_ids=None):
        """tokens (B, T) -> float32 logits (B, T, V), or (B, P, V') with logits_at (B, P) / vocab_ids (V',)."""
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        per_row = torch.is_tensor(start_pos)
        if per_row:
            start_pos = start_pos.to(tokens.device)
        positions = (start_pos[:, None] if per_row else start_pos) + torch.arange(T, device=tokens.device)
        positions = positions.expand(B, T)  # (B, T) position of each token
        omega = rope_frequencies(self.args.head_dim, self.args.rope_theta, self.args.rope_scaling, tokens.device)
        angles = positions[..., None].float() * omega  # (B, T, D/2), float32 like the reference
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
        rope = (angles.cos().to(h.dtype), angles.sin().to(h.dtype))

        mask, causal, write = None, True, None
        if cache is not None:
            kv_len = int(positions.max()) + 1 if per_row else start_pos + T
            if kv_len > cache.max_len or B > cache.k[0].shape[0]:
                raise ValueError(f"KV cache of {cache.k[0].shape[0]} rows × {cache.max_len} positions is too small "
                                 f"for {B} rows up to position {kv_len}; make a bigger one with model.new_cache")
            if per_row or start_pos > 0:  # queries see every cached key at or before their own position
                causal = False
                if T > 1 or per_row:
                    mask = (torch.arange(kv_len, device=tokens.device) <= positions[..., None])[:, None]  # (B,1,T,L)
        for i, layer in enumerate(self.layers):
            if cache is not None:  # write(k, v) stores this layer's new keys/values, returns all up to kv_len
                write = partial(cache.update, i, start_pos=start_pos, positions=positions, kv_len=kv_len)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, mask, causal, write, adapter, self.use_sdpa, use_reentrant=False)
            else:
                h = layer(h, rope, mask, causal, write, adapter, self.use_sdpa)
        if logits_at is not None:  # only these positions reach the norm and LM head
            h = h.gather(1, logits_at.to(h.device)[..., None].expand(-1, -1, h.shape[-1]))  # (B, P, dim)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight  # (V, dim)
        if vocab_ids is not None:
            weight = weight[vocab_ids.to(weight.device)]  # (V', dim)
        return F.linear(self.norm(h), weight).float()


# ---------------------------------------------------------------- checkpoints (HF layout, safetensors)

def hf_names(args: ModelArgs) -> dict:
    """Our parameter name -> HF tensor name."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    ours = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        for a, b in ours.items():
            names[f"layers.{i}.{a}.weight"] = f"model.layers.{i}.{b}.weight"
    if not args.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _checkpoint_files(path: Path) -> dict:
    """HF tensor name -> safetensors file, from the index's weight_map or the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map") if isinstance(_read_json(index), dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object (not a safetensors index)")
        for file in sorted(set(weight_map.values())):
            if not (path / file).exists():
                raise FileNotFoundError(f"{path / file}: shard listed in {index.name} is missing")
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:
        raise ValueError(f"{single}: corrupt or truncated safetensors file ({e})") from e


def load(path, device="cpu", dtype=None) -> Transformer:
    """Loads an HF LLaMA checkpoint dir. Tensors go from the memory-mapped file straight to `dtype` on `device`
    into a model built on the meta device: one copy of the weights, never an fp32 copy of a bf16 checkpoint.
    On CPU with the checkpoint's dtype the weights stay memory-mapped (copy-on-write): pages are read on first use.
    dtype defaults to the config's. Returned in eval mode with gradients off (a frozen base); to train it, call
    `.requires_grad_(True)`."""
    from safetensors import safe_open
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (expected an HF checkpoint directory)")
    cfg = _read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object, got {type(cfg).__name__}")
    try:
        args = ModelArgs.from_hf_config(cfg)
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: no {e.args[0]!r} (not an HF LLaMA config)") from None
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}".replace("config.json: ", "", 1)) from None
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").split(".")[-1]
    if dtype is None and not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"{path / 'config.json'}: unknown dtype {name!r} (float32, bfloat16, float16)")
    dtype = dtype or getattr(torch, name)
    names = hf_names(args)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {hf: tuple(p.shape) for ours, p in model.state_dict().items() for hf in [names[ours]]}
    files = _checkpoint_files(path)
    if missing := sorted(set(expected) - set(files)):
        raise KeyError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all), "
                       f"expected shape {expected[missing[0]]}")
    if unexpected := sorted(set(files) - set(expected)):
        raise KeyError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for this config.json "
                       f"(tie_word_embeddings={args.tie_word_embeddings}, {args.n_layers} layers)")
    state, hf_to_ours = {}, {hf: ours for ours, hf in names.items()}
    for file in sorted(set(files.values())):
        wanted = [name for name, f in files.items() if f == file]
        try:
            with safe_open(file, "pt", device=str(device)) as f:
                if absent := sorted(set(wanted) - set(f.keys())):
                    raise KeyError(f"{file}: missing tensor {absent[0]} (listed in the index)")
                for name in wanted:
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise ValueError(f"{file}: tensor {name} has shape {shape}, expected {expected[name]}")
                    tensor = f.get_tensor(name)
                    if not tensor.is_floating_point():
                        raise ValueError(f"{file}: tensor {name} is {tensor.dtype}, expected floating-point weights")
                    state[hf_to_ours[name]] = tensor.to(dtype)  # no copy when dtype already matches
        except (KeyError, ValueError):
            raise
        except Exception as e:  # safetensors' own errors: bad header, file shorter than its header says
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save(model: Transformer, path):
    """Writes config.json + model.safetensors (HF names, HF q/k order); each file replaced atomically, config last."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = hf_names(model.args)
    tensors = {names[k]: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = next(iter(tensors.values())).dtype
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    (path / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would shadow the new file
    cfg = {**model.args.to_hf_config(), "dtype": str(dtype).removeprefix("torch.")}
    atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))


# ---------------------------------------------------------------- sampling

@torch.inference_mode()
def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens=32, temperature=0.0, top_p=0.9,
             seed=None) -> str:
    """Greedy (temperature 0) or temperature + nucleus (top-p) sampling with the KV cache; returns the new text."""
    ids = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    device = model.tok_embeddings.weight.device
    cache = model.new_cache(1, min(len(ids) + max_new_tokens, model.args.max_seq_len), device)
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    tokens, pos, out = torch.tensor([ids], device=device), 0, []
    for _ in range(min(max_new_tokens, cache.max_len - len(ids))):
        logits = model(tokens, pos, cache, logits_at=torch.tensor([[tokens.shape[1] - 1]], device=device))[0, -1]
        pos += tokens.shape[1]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:  # keep the smallest set of most likely tokens whose mass reaches top_p
            probs, order = torch.sort(torch.softmax(logits / temperature, -1), descending=True)
            probs[(probs.cumsum(-1) - probs) > top_p] = 0.0
            nxt = int(order[torch.multinomial(probs / probs.sum(), 1, generator=gen)])
        if nxt in tokenizer.stop_ids:
            break
        out.append(nxt)
        tokens = torch.tensor([[nxt]], device=device)
    return tokenizer.decode(out)
