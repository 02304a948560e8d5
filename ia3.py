"""IA3 adapters for `llama.Transformer`: one frozen base model, any number of small adapters handed to forward.

(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv 2205.05638) learns one vector per layer and per target that rescales an activation, initialised to ones.
We follow PEFT's `IA3Config` for llama exactly (peft 0.21 `tuners/ia3`):

    k   = (W_k x) ⊙ l_k              l_k:  (n_kv_heads·head_dim,)   before RoPE = scaling the rows of W_k
    v   = (W_v x) ⊙ l_v              l_v:  (n_kv_heads·head_dim,)
    ffn = W_2 ((silu(W_1 x) ⊙ W_3 x) ⊙ l_ff)    l_ff: (ffn_dim,)   PEFT's "feedforward" down_proj: input scaled

Each product is taken in the adapter's dtype and cast back to the activation dtype, so an fp32 adapter runs on a
bf16 base as in the paper. For Llama 3.1 8B that is 32 · (1024 + 1024 + 14336) = 524,288 parameters.

Where we deliberately differ from PEFT: PEFT wraps the model's Linear modules and keeps adapters by name inside
them. Here an adapter is a separate nn.Module holding only its vectors (it keeps no reference to the model), and
`llama.Transformer.forward(tokens, adapter=...)` asks it for `layer_scales(i)`. So the paper's online adapter and
its Polyak-averaged target adapter share ONE frozen base model in memory, and the target is `adapter.copy()`.
The adapter never changes the model, not even its requires_grad flags (`llama.load` returns a frozen model).

Saved adapters are PEFT's format both ways: `adapter_config.json` (peft_type "IA3") and `adapter_model.safetensors`
with PEFT's key names and shapes ((out, 1) for k_proj / v_proj, (1, in) for the feedforward down_proj), so
`peft.PeftModel.from_pretrained(LlamaForCausalLM, dir)` loads ours and `IA3.from_pretrained` loads PEFT's.
"""
import json
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from checkpoint import atomic_write

TARGET_MODULES = ["k_proj", "v_proj", "down_proj"]  # PEFT's default for llama
FEEDFORWARD_MODULES = ["down_proj"]  # scaled at the input, not the output


def peft_key(i: int, target: str) -> str:
    """PEFT's tensor name for layer i's vector (PeftModel → LlamaForCausalLM → LlamaModel; no adapter name)."""
    block = "mlp" if target == "down_proj" else "self_attn"
    return f"base_model.model.model.layers.{i}.{block}.{target}.ia3_l"


def _widths(model) -> list[tuple[int, int, int]]:
    """(k width, v width, ffn width) of each layer, read off the weights: wk/wv (out, dim), w2 (dim, ffn)."""
    return [(layer.attention.wk.weight.shape[0], layer.attention.wv.weight.shape[0],
             layer.feed_forward.w2.weight.shape[1]) for layer in model.layers]


class IA3(nn.Module):
    def __init__(self, model, dtype=torch.float32, device=None):
        """Ones (the identity), trainable, in `dtype` (independent of the model's dtype) on the model's device."""
        super().__init__()
        device = device if device is not None else model.tok_embeddings.weight.device
        ones = lambda n: nn.Parameter(torch.ones(n, dtype=dtype, device=device))  # noqa: E731
        widths = _widths(model)
        self.l_k = nn.ParameterList(ones(k) for k, _, _ in widths)
        self.l_v = nn.ParameterList(ones(v) for _, v, _ in widths)
        self.l_ff = nn.ParameterList(ones(f) for _, _, f in widths)

    def layer_scales(self, i: int):
        """The hook `llama.Transformer.forward` calls for layer i: (l_k, l_v, l_ff), 1-D."""
        return self.l_k[i], self.l_v[i], self.l_ff[i]

    def copy(self) -> "IA3":
        """Same values in new storage, no gradients: the target network of double DQN."""
        target = deepcopy(self)  # safe: an adapter holds its vectors only, never the model
        for p in target.parameters():
            p.grad = None
        return target.requires_grad_(False)

    def check_fits(self, model):
        """Raises ValueError naming the first layer whose vector widths differ from `model`'s."""
        widths = _widths(model)
        if len(widths) != len(self.l_k):
            raise ValueError(f"IA3 adapter has {len(self.l_k)} layers, the model has {len(widths)}: "
                             f"build the adapter for this model (IA3(model) or IA3.from_pretrained(dir, model))")
        for i, want in enumerate(widths):
            have = tuple(t.numel() for t in self.layer_scales(i))
            if have != want:
                raise ValueError(f"IA3 adapter layer {i} has (k, v, ffn) widths {have}, the model needs {want}: "
                                 f"the adapter was made for a different model")

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT key -> a view of our vector in PEFT's shape: (out, 1) for k/v, (1, in) for down_proj."""
        state = {}
        for i in range(len(self.l_k)):
            l_k, l_v, l_ff = (t.detach() for t in self.layer_scales(i))
            state[peft_key(i, "k_proj")] = l_k.view(-1, 1)
            state[peft_key(i, "v_proj")] = l_v.view(-1, 1)
            state[peft_key(i, "down_proj")] = l_ff.view(1, -1)
        return state

    def save_pretrained(self, path, base_model_name_or_path=None):
        """Writes a PEFT IA3 adapter dir (each file written to a temp name first, then moved into place)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file
        tensors = {k: t.cpu().contiguous() for k, t in self.peft_state_dict().items()}
        atomic_write(path / "adapter_model.safetensors",
                      lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        config = {  # what peft 0.21's IA3Config.save_pretrained writes, with PEFT's llama defaults
            "peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": TARGET_MODULES,
            "feedforward_modules": FEEDFORWARD_MODULES, "exclude_modules": None, "fan_in_fan_out": False,
            "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base_model_name_or_path, "revision": None, "auto_mapping": None,
        }
        atomic_write(path / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))

    @classmethod
    def from_pretrained(cls, path, model, dtype=torch.float32, device=None) -> "IA3":
        """Loads a PEFT IA3 adapter dir (written by PEFT on LlamaForCausalLM, or by save_pretrained) for `model`."""
        path = Path(path)
        config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path}: no adapter_config.json; not a PEFT adapter dir "
                                    f"(write one with IA3.save_pretrained or PeftModel.save_pretrained)")
        config = json.loads(config_file.read_text())
        peft_type = config.get("peft_type")
        if peft_type != "IA3":
            raise ValueError(f"{config_file}: peft_type is {peft_type!r}; IA3.from_pretrained loads only 'IA3' "
                             f"adapters")
        # The vectors' names alone do not say where PEFT applied them: feedforward_modules scale a module's input,
        # the others its output. Only PEFT's llama default is supported (PEFT saves these sets as lists, any order).
        for field, want in (("target_modules", TARGET_MODULES), ("feedforward_modules", FEEDFORWARD_MODULES)):
            have = config.get(field)
            if not isinstance(have, list) or sorted(have) != sorted(want):
                raise ValueError(f"{config_file}: {field} is {have!r}; IA3.from_pretrained supports only PEFT's llama "
                                 f"default target_modules {TARGET_MODULES} with feedforward_modules "
                                 f"{FEEDFORWARD_MODULES} (train the adapter with IA3Config(task_type='CAUSAL_LM'))")
        if not weights_file.is_file():
            hint = (" (found adapter_model.bin: re-save with PEFT's save_pretrained(..., safe_serialization=True))"
                    if (path / "adapter_model.bin").exists() else "")
            raise FileNotFoundError(f"{path}: no adapter_model.safetensors{hint}")
        from safetensors.torch import load_file
        saved = load_file(weights_file)
        adapter = cls(model, dtype=dtype, device=device)
        ours = adapter.peft_state_dict()
        missing, unexpected = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
        if missing:
            raise ValueError(f"{weights_file}: missing {len(missing)} of {len(ours)} vectors, e.g. {missing[0]}; "
                             f"expected PEFT's llama default targets {TARGET_MODULES} in all {len(adapter.l_k)} "
                             f"layers (the adapter was made with other target_modules, or for a smaller model)")
        if unexpected:
            raise ValueError(f"{weights_file}: {len(unexpected)} tensors this model has no place for, e.g. "
                             f"{unexpected[0]}; only IA3 vectors on {TARGET_MODULES} of a {len(adapter.l_k)}-layer "
                             f"model load (other target_modules, modules_to_save, or a bigger model)")
        for key, t in ours.items():
            if saved[key].shape != t.shape:
                raise ValueError(f"{weights_file}: {key} has shape {tuple(saved[key].shape)}, this model needs "
                                 f"{tuple(t.shape)} ((out, 1) for k/v_proj, (1, in) for the feedforward down_proj): "
                                 f"the adapter was made for a different model")
        with torch.no_grad():
            for key, t in ours.items():
                t.copy_(saved[key])  # t is a view of our parameter; copy_ also casts to our dtype and device
        return adapter

    def __repr__(self) -> str:  # one line instead of nn.Module's listing of every vector
        n = sum(p.numel() for p in self.parameters())
        return f"IA3({len(self.l_k)} layers, {n:,} parameters, {self.l_k[0].dtype}, {self.l_k[0].device})"


def merge(model, adapter: IA3):
    """A new model with the vectors folded into the weights (for fast inference without an adapter):
    W_k ← diag(l_k) W_k, W_v ← diag(l_v) W_v (rows), W_2 ← W_2 diag(l_ff) (columns). `model` is not modified;
    the new model shares every other tensor with it (embeddings, q/o, w1/w3, norms, LM head) instead of copying."""
    adapter.check_fits(model)
    scaled = {id(m.weight) for layer in model.layers
              for m in (layer.attention.wk, layer.attention.wv, layer.feed_forward.w2)}
    # deepcopy takes a tensor already in its memo as its own copy: everything but wk, wv, w2 is shared
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in scaled}
    merged = deepcopy(model, memo)
    with torch.no_grad():
        for i, layer in enumerate(merged.layers):
            l_k, l_v, l_ff = adapter.layer_scales(i)
            for weight, scale in ((layer.attention.wk.weight, l_k[:, None]), (layer.attention.wv.weight, l_v[:, None]),
                                  (layer.feed_forward.w2.weight, l_ff[None, :])):
                weight.copy_(weight * scale.to(weight.device))  # product in the wider dtype, rounded once
    return merged
