"""Train an in-context RL agent: double DQN on multi-episode Frozen Lake trajectories, Q read off LLaMA's LM head.

The paper's recipe (arXiv 2501.14176, §3), as `train()` reads top to bottom: the learning rate (10 warm-up steps,
then constant), a step's slices of packed episode sets (§3.2, data.py and dqn.pack_slices), Q_θ at the action
positions and the double-DQN targets of the target network φ (Eq. 6), the TD loss (Eq. 7), an AdamW step, Polyak
averaging of φ (Eq. 8), then the log, the held-out loss and checkpoints (checkpoint.py). `torchrun --nproc_per_node
N train.py ...` runs it data parallel, each rank taking its share of a step's slices.

`TrainConfig()` is the paper's recipe (on SmolLM2-135M + IA3). `python train.py` trains the cpu preset: a small
LLaMA from random init on 2 CPU cores, with the deviations in `CPU` (each measured in the README).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import compact
import data
import dqn
import policy


def option(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """The paper's recipe (§3.2-3.3, §4): its text, lr 1e-2, 10 x 4096-token slices, α 0.1, one epoch."""
    preset: str = option("smollm2", "cpu: a small LLaMA from random init, all weights trained; smollm2 / "
                         "llama3.1-8b: IA3 on a frozen pretrained LLaMA", choices=("cpu", "smollm2", "llama3.1-8b"))
    model_dir: str | None = option(None, "HF LLaMA checkpoint dir of the IA3 presets' base model")
    out: str | None = option(None, "run dir: checkpoints, metrics.jsonl, loss.png (default runs/<preset>)")
    resume: bool = option(False, "continue the run in --out from its newest readable checkpoint")
    overwrite: bool = option(False, "delete the run already in --out and start again")
    dim: int = option(128, "cpu model: width (heads of 32, half as many KV heads, SwiGLU width 3 x dim)")
    n_layers: int = option(4, "cpu model: transformer blocks")
    data_dir: str = option("runs/data", "cache of the generated episodes")
    n_maps: int = option(250, "training maps (the paper: 250)")
    sets_per_map: int = option(58, "episode sets drawn per training map")
    quality: str = option("mid", "sets: hi = successes 5x more likely, low = failures 5x, mid = even (the paper)",
                          choices=("hi", "mid", "low"))
    context_len: int = option(4096, "tokens per slice (the paper: 4096)")
    format: str = option("paper", "paper: the paper's text; compact: one token per step piece (compact.py)",
                         choices=("paper", "compact"))
    recap: bool = option(False, "compact format: a hindsight recap token per (state, action) of a finished episode")
    canvas: bool = option(False, "compact format: states as tiles of an 8x8 canvas, sets at random offsets")
    compose: bool = option(False, "compact format: a tile's embedding adds its row's and column's vectors, a recap "
                           "token's also the action's and the tag's")
    canvas_from: float = option(0.6, "with --canvas: share of the steps with every set at the canvas origin first")
    steps: int = option(0, "optimizer steps (0: --epochs passes over the slices)")
    epochs: float = option(1.0, "passes over the data when --steps is 0 (the paper: 1)")
    slices_per_step: int = option(10, "slices per optimizer step, all ranks together (the paper: 10)")
    micro_batch: int = option(1, "slices per forward pass (gradient accumulation up to --slices-per-step)")
    lr: float = option(1e-2, "peak learning rate (the paper: 1e-2)")
    warmup_steps: int = option(10, "linear warmup steps, then constant (the paper: 10)")
    weight_decay: float = option(0.01, "AdamW weight decay (the paper: 0.01)")
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: off, the paper)")
    gamma: float = option(0.9, "discount γ of the Bellman targets (the paper: 0.9)")
    reward_scale: float = option(30.0, "episode reward x this in the targets (the paper: 30)")
    alpha: float = option(0.1, "Polyak rate of the target network, Eq. 8 (the paper: 0.1)")
    aux_lm: float = option(0.0, "weight of the auxiliary next-token loss (0: off, the paper)")
    aux_facts: float = option(0.0, "compact format: weight of the auxiliary facts target at the Q positions")
    eval_every: int = option(50, "held-out TD loss every N steps (0: only at the end)")
    eval_slices: int = option(20, "held-out slices per held-out loss")
    save_every: int = option(100, "checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the model init, the slice packing and the data order")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")


# The cpu preset: the paper's recipe with these deviations, in the README's order and words.
CPU = dict(
    dim=128, n_layers=4, context_len=1024, slices_per_step=8, micro_batch=4, lr=3e-3,  # small model, all weights,
    grad_clip=1.0,                  # from random init
    steps=1000, sets_per_map=12,    # a shorter run: 1000 steps over 12 sets per map
    format="compact", recap=True,   # compact format: one token per step piece, a recap per finished episode
    canvas=True,                    # canvas states with a curriculum (--canvas-from)
    compose=True,                   # embeddings composed of row, column, action and tag vectors
    aux_lm=30.0,                    # auxiliary next-token loss
    aux_facts=100.0,                # auxiliary facts target: what the context shows about each move
    quality="low",                  # failed episodes 5x more likely in a set
    alpha=0.01,                     # α 0.01: a slower target network
    eval_every=40, eval_slices=8, save_every=80)  # bookkeeping at this scale
PRESETS = {"cpu": CPU, "smollm2": {}, "llama3.1-8b": {}}
MODEL_FIELDS = ("preset", "format", "recap", "canvas", "compose", "model_dir", "dim", "n_layers")


def make_config(preset="cpu", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], "preset": preset, **overrides})


def parse_args(argv=None) -> tuple[TrainConfig, bool, bool]:
    """-> (config, debug, progress)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="`python train.py` with no arguments trains the cpu preset.")
    for f in fields(TrainConfig):
        by_preset = {name: PRESETS[name].get(f.name, f.default) for name in PRESETS}
        shown = by_preset if len(set(map(str, by_preset.values()))) > 1 else {"all": f.default}
        help = f.metadata["help"] + f" [{', '.join(f'{k}: {v}' for k, v in shown.items())}]"
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            kind = {int: int, float: float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    debug, progress = given.pop("debug", False), not given.pop("no_progress", False)
    try:
        cfg = make_config(given.pop("preset", "cpu"), **given)
        check_config(cfg)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return cfg, debug, progress


def check_config(cfg: TrainConfig):
    """Bad input -> one clear error before any data or model work."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name in ("n_maps", "sets_per_map", "context_len", "slices_per_step", "micro_batch", "eval_slices", "dim",
                 "n_layers"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {getattr(cfg, name)}")
    for name in ("steps", "warmup_steps", "eval_every", "save_every", "grad_clip", "weight_decay", "aux_lm",
                 "aux_facts"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if cfg.steps == 0 and cfg.epochs <= 0:
        raise ValueError(f"--epochs must be positive when --steps is 0, got {cfg.epochs}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    for name, lo, hi in (("alpha", 0, 1), ("gamma", 0, 1), ("canvas_from", 0, 0.999)):
        if not lo <= getattr(cfg, name) <= hi:
            raise ValueError(f"{flag(name)} must be in [{lo}, {hi}], got {getattr(cfg, name)}")
    if cfg.preset == "cpu" and cfg.dim % 32:
        raise ValueError(f"--dim {cfg.dim}: the cpu model's heads are 32 wide, give a multiple of 32")
    if cfg.preset == "llama3.1-8b" and not cfg.model_dir:
        raise ValueError("preset llama3.1-8b needs --model-dir: an HF Llama-3.1-8B-Instruct download "
                         "(config.json, model-*.safetensors, original/tokenizer.model)")
    if cfg.model_dir and cfg.preset == "cpu":
        raise ValueError("--model-dir is for the IA3 presets (smollm2, llama3.1-8b); the cpu preset builds its model")
    if cfg.model_dir and not (Path(cfg.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model-dir {cfg.model_dir}: no config.json (expected an HF checkpoint dir)")
    if cfg.format == "compact" and cfg.preset != "cpu":
        raise ValueError(f"--format compact needs the cpu preset's own vocabulary; {cfg.preset} writes the paper's "
                         f"text with its base model's tokenizer: drop --format or use --preset cpu")
    if (cfg.canvas or cfg.recap or cfg.compose or cfg.aux_facts) and cfg.format != "compact":
        raise ValueError("--canvas, --recap, --compose and --aux-facts are pieces of the compact format: add "
                         "--no-canvas --no-recap --no-compose --aux-facts 0 for --format paper")
    if cfg.compose and not cfg.canvas:
        raise ValueError("--compose embeds a state by its canvas row and column: add --canvas, or --no-compose")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.slices_per_step % (cfg.micro_batch * world):
        raise ValueError(f"--slices-per-step {cfg.slices_per_step} must be a multiple of --micro-batch "
                         f"{cfg.micro_batch} x {world} processes")
    out = Path(cfg.out or f"runs/{cfg.preset}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory")
    if cfg.preset != "cpu":
        from llama import ModelArgs
        hf = json.loads((policy.base_model_dir(cfg) / "config.json").read_text())  # cheap: no weights loaded yet
        if cfg.context_len > ModelArgs.from_hf_config(hf).max_seq_len:
            raise ValueError(f"--context-len {cfg.context_len} is longer than the base model's positions")


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then constant (the paper's schedule)."""
    return cfg.lr * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else cfg.lr


@dataclass
class Networks:
    """θ (the model, or a frozen base and its IA3 adapter) and the target network φ, with the format's ids."""
    model: torch.nn.Module
    adapter: object
    target: torch.nn.Module
    target_adapter: object
    action_ids: torch.Tensor       # (4,) vocabulary rows of the action words: the Q-values
    ids: dict | None               # the compact format's special tokens (the facts target's rows)
    autocast: object = contextlib.nullcontext  # bf16 autocast for the IA3 presets on CUDA


def online_q(nets: Networks, batch, cfg) -> tuple[torch.Tensor, dict]:
    """Q_θ at the action positions (B, P, 4) and the cpu preset's auxiliary losses: with them, one forward gives the
    logits at every position and Q is read from those."""
    if not (cfg.aux_lm or cfg.aux_facts):
        return dqn.q_values(nets.model, batch["tokens"], batch["q_positions"], nets.action_ids, nets.adapter), {}
    logits = nets.model(batch["tokens"], adapter=nets.adapter)                                  # (B, T, V)
    at = batch["q_positions"][..., None].expand(-1, -1, logits.shape[-1])                      # (B, P, V)
    aux = {"next_token_loss": compact.next_token_loss(logits, batch)}
    if cfg.aux_facts:
        aux["facts_loss"] = compact.facts_loss(logits, batch, nets.ids)
    return logits.gather(1, at)[..., nets.action_ids].float(), aux


def td_loss_on(batch, nets: Networks, cfg) -> tuple[torch.Tensor, dict]:
    """Eq. 6-7 on one collated batch -> (TD loss, the auxiliary losses by name)."""
    with nets.autocast():
        q, aux = online_q(nets, batch, cfg)                                                    # (B, P, 4) Q_θ
        with torch.no_grad():
            q_target = dqn.q_values(nets.target, batch["tokens"], batch["q_positions"], nets.action_ids,
                                    nets.target_adapter)                                       # (B, P, 4) Q_φ
    y = dqn.bellman_targets(q, q_target, batch, cfg.gamma, cfg.reward_scale)  # Eq. 6: γ·Q_φ(h', argmax Q_θ(h')), 30·R
    return dqn.td_loss(q, y, batch), aux                                      # Eq. 7: mean (Q_θ(h, a) − y)²


# ---------------------------------------------------------------------------------------------------------------------
# The loop


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run saved its last finished step and stopped."""


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Runs (or resumes) training; returns the run dir. Raises FloatingPointError when the weights or gradients stop
    being finite (nothing non-finite is saved), Interrupted after saving on Ctrl-C / SIGTERM."""
    check_config(cfg)
    run_dir, (rank, world, device) = Path(cfg.out or f"runs/{cfg.preset}"), start_processes(cfg)
    resume_from = prepare_run(cfg, run_dir, rank, world)
    nets, tokenizer, fmt, identity = build_networks(cfg, device, resume_from)
    slices = data.pack_data(cfg, fmt, rank, world)
    theta = list((nets.adapter or nets.model).parameters())
    phi = list((nets.target_adapter or nets.target).parameters())
    optimizer = torch.optim.AdamW([p for p in theta if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  foreach=True)
    step = checkpoint.restore(resume_from, optimizer, device)["step"] if resume_from else 0
    collate = functools.partial(collate_on, cfg=cfg, pad_id=fmt.eos[0], ids=nets.ids, device=device)
    heldout = lambda: heldout_loss(slices.heldout, collate, nets, cfg, world, device)  # noqa: E731
    save = functools.partial(save_checkpoint, cfg, run_dir, nets, tokenizer, optimizer, identity, rank, world)
    log = checkpoint.metrics_log(run_dir, step, rank, cfg.resume)
    if rank == 0:
        print(f"[train] {cfg.preset}: {len(slices.train)} slices of <= {cfg.context_len} tokens, "
              f"{slices.total_steps} steps x {cfg.slices_per_step} slices, {sum(p.numel() for p in theta):,} "
              f"trainable parameters, device {device}, world {world}"
              + (f", resuming at step {step}" if resume_from else ""), file=sys.stderr)
    if step == 0 and cfg.eval_every:  # the untrained model's held-out loss: what "the loss falls" is against
        log({"step": 0, "heldout_loss": finite(heldout(), "held-out loss {} before training: the initial weights "
                                               "are not finite", run_dir, with_last=False)})
    weights = torch.tensor([1.0, cfg.aux_lm, cfg.aux_facts], device=device)  # of the TD loss and AUX
    from tqdm import tqdm
    bar = tqdm(total=slices.total_steps, initial=step, disable=True if rank or not progress else None)
    with bar, checkpoint.stop_requests() as stop:
        while step < slices.total_steps and not stop.requested(world, device):
            t0, lr = time.perf_counter(), learning_rate(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mine = slices.of_step(cfg, step)[rank::world]
            optimizer.zero_grad(set_to_none=False)
            sums = torch.zeros(3, device=device)  # the step's TD loss, next-token loss, facts loss
            for i in range(0, len(mine), cfg.micro_batch):
                batch = collate(mine[i:i + cfg.micro_batch])
                loss, aux = td_loss_on(batch, nets, cfg)                                        # Eq. 6-7
                losses = torch.stack([loss, *(aux.get(k, loss.new_zeros(())) for k in AUX)])
                share = len(batch["tokens"]) / cfg.slices_per_step  # the mean over the whole step's slices
                ((losses * weights).sum() * share).backward()
                sums += losses.detach().float() * share
            norm = sum_and_clip(theta, sums, cfg, world)
            optimizer_step(optimizer, nets, sums[0].item(), norm, lr, step + 1, run_dir)
            dqn.polyak_update(phi, theta, cfg.alpha)                                            # Eq. 8
            step += 1
            record = {"step": step, "loss": sums[0].item(), "lr": lr, "time": time.time(),
                      "tokens_per_s": sum(len(s.tokens) for s in mine) * world / (time.perf_counter() - t0),
                      **{k: v for k, v, w in zip(AUX, sums[1:].tolist(), (cfg.aux_lm, cfg.aux_facts)) if w}}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == slices.total_steps:
                record["heldout_loss"] = finite(heldout(), f"held-out loss {{}} at step {step}", run_dir)
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.3g}", lr=f"{lr:.2g}")
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < slices.total_steps:
                save(step)
    final = save(step)
    if rank == 0:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", slices.canvas_start)
        print(f"[train] step {step}: checkpoint {final}", file=sys.stderr)
    if stop.received is not None:
        raise Interrupted(f"interrupted ({stop.received.name}): saved step {step} in {final}; "
                          f"continue with --resume --out {run_dir}")
    return run_dir


AUX = ("next_token_loss", "facts_loss")  # the cpu preset's auxiliary losses, weighted by --aux-lm and --aux-facts


# ---------------------------------------------------------------------------------------------------------------------
# The loop's pieces: processes, the run dir, the networks, batches, the guarded update, the log


def start_processes(cfg) -> tuple[int, int, torch.device]:
    """-> (rank, world size, device); under torchrun joins the process group (NCCL on GPUs, else gloo)."""
    world, device = int(os.environ.get("WORLD_SIZE", 1)), policy.resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 model, TF32 matmuls
    return (dist.get_rank() if world > 1 else 0), world, device


def prepare_run(cfg, run_dir: Path, rank: int, world: int) -> Path | None:
    """Rank 0 readies the run dir and generates the data cache, the others wait; -> the checkpoint to resume."""
    if rank == 0:
        checkpoint.prepare_run_dir(run_dir, cfg.resume, cfg.overwrite)
        data.load_episode_sets(cfg, "train"), data.load_episode_sets(cfg, "heldout")
    if world > 1:
        dist.barrier()
    return checkpoint.resume_point(run_dir, policy.needed_files(cfg)) if cfg.resume else None


def build_networks(cfg, device, resume_from) -> tuple[Networks, object, object, dict]:
    """-> (θ and φ, the tokenizer, the trajectory format, the identity every checkpoint records). The cpu preset
    trains in fp32 on any device; the IA3 presets keep a frozen bf16 base on CUDA, with autocast and checkpointing."""
    model, adapter, target, target_adapter, tokenizer = policy.build_policy(cfg, device, resume_from)
    identity = policy.identity(cfg, model, tokenizer)  # IA3: the base model the adapters belong to
    if resume_from is not None:
        policy.check_same_model(cfg, resume_from, identity, MODEL_FIELDS)
    fmt = policy.trajectory_format(cfg, tokenizer)
    bf16 = torch.device(device).type == "cuda" and adapter is not None
    model.gradient_checkpointing = bf16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return Networks(model, adapter, target, target_adapter, torch.tensor(fmt.action_ids, device=device),
                    getattr(fmt, "ids", None), autocast), tokenizer, fmt, identity


def collate_on(slices, cfg, pad_id, ids, device) -> dict:
    """dqn.collate on the device (right padding with the end-of-text id: causal attention keeps real tokens from
    seeing it); with --aux-facts also the facts targets of its action slots."""
    batch = dqn.collate(slices, pad_id)
    if cfg.aux_facts:
        batch["facts"] = compact.facts_targets(slices, ids)
    return {k: v.to(device) for k, v in batch.items()}


def heldout_loss(heldout, collate, nets, cfg, world, device) -> float:
    with torch.no_grad():
        total = torch.zeros(2, device=device)  # (sum of losses, count)
        for s in heldout:
            loss, _ = td_loss_on(collate([s]), nets, cfg)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if world > 1:
            dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def sum_and_clip(params, sums, cfg, world) -> float:
    """Sums every rank's gradients (each already carries its 1/slices_per_step share) and the step's losses; clips
    the gradient norm to --grad-clip (0: off) -> the norm before clipping."""
    trainable = [p for p in params if p.requires_grad]
    if world > 1:
        for p in trainable:
            dist.all_reduce(p.grad)
        dist.all_reduce(sums)
    return torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf).item()


def optimizer_step(optimizer, nets, loss: float, norm: float, lr: float, step: int, run_dir: Path):
    """optimizer.step(), guarded: nothing non-finite goes into the weights or, later, a checkpoint."""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise FloatingPointError(f"loss {loss}, gradient norm {norm} at step {step}; stopped before the update. "
                                 f"{checkpoint.last_good(run_dir)}")
    try:
        optimizer.step()
    except RuntimeError as e:  # AdamW's lr-scaled terms overflow float32 before any weight is written
        raise FloatingPointError(f"the update of step {step} overflowed (lr {lr:.3g}: {e}). "
                                 f"{checkpoint.last_good(run_dir)}")
    if not checkpoint.all_finite([nets.adapter or nets.model]):
        raise FloatingPointError(f"the update of step {step} made the weights non-finite (lr {lr:.3g}). "
                                 f"{checkpoint.last_good(run_dir)}")


def finite(value: float, message: str, run_dir: Path, with_last=True) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(message.format(value) + (f". {checkpoint.last_good(run_dir)}" if with_last else ""))
    return value


def save_checkpoint(cfg, run_dir, nets, tokenizer, optimizer, identity, rank, world, step) -> Path:
    """Rank 0 writes (never a non-finite weight), the others wait so that no rank runs ahead of a checkpoint."""
    if rank == 0:
        if not checkpoint.all_finite([nets.adapter or nets.model, nets.target_adapter or nets.target]):
            raise FloatingPointError(f"weights are not finite at step {step}; not saved. "
                                     f"{checkpoint.last_good(run_dir)}")
        write = functools.partial(policy.save_weights, cfg, nets.model, nets.adapter, nets.target,
                                  nets.target_adapter, tokenizer)
        checkpoint.save(run_dir, step, asdict(cfg), write, optimizer, {"step": step}, identity)
    if world > 1:
        dist.barrier()
    return run_dir / "checkpoints" / f"step_{step:06d}"


def plot_losses(metrics_file: Path, png: Path, canvas_start: int = 0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    trained = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], lw=0.8, label="train TD loss")
    held = [r for r in rows if "heldout_loss" in r]
    ax.plot([r["step"] for r in held], [r["heldout_loss"] for r in held], "o-", label="held-out TD loss (test maps)")
    if canvas_start:  # the held-out loss is on canvas states from here on
        ax.axvline(canvas_start, color="gray", ls=":", label="canvas stage starts")
    ax.set(xlabel="optimizer step", ylabel="TD loss (Eq. 7)", yscale="log", title=png.parent.name)
    ax.legend()
    fig.tight_layout()
    checkpoint.atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def main(argv=None):
    cfg, debug, progress = parse_args(argv)
    try:
        train(cfg, progress)
    except Interrupted as e:
        sys.exit(f"train.py: {e}")  # exit status 1: a half-trained run is not a finished one
    except (ValueError, OSError, FloatingPointError) as e:
        if debug:
            raise
        sys.exit(f"train.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
