"""Train an in-context RL agent: offline double DQN on Frozen Lake trajectories, Q-values read off LLaMA's LM head.

The paper's recipe (arXiv 2501.14176, §3), top to bottom:
1. Data (§3.2, data.py): a tabular Q-learner's histories on 250 training maps, drawn into sets of 20-40 episodes of
   one map, packed into context slices (dqn.pack_slices).
2. The loop: AdamW (weight decay 0.01), lr warmup over 10 steps then constant, `slices_per_step` slices per
   optimizer step; Q at the action positions (dqn.q_values), double-DQN targets from the target network (Eq. 6,
   dqn.bellman_targets), MSE TD loss (Eq. 7, dqn.td_loss), Polyak averaging of the target after every step (Eq. 8,
   dqn.polyak_update). bf16 autocast and gradient checkpointing on CUDA.
3. A run dir (checkpoint.py): atomic checkpoints, exact `--resume`, Ctrl-C / SIGTERM save and exit.
4. `torchrun --nproc_per_node N train.py ...`: data parallel, each rank takes its share of a step's slices.

Presets: `smollm2` and `llama3.1-8b` (IA3 on a pretrained LLaMA) are the paper's recipe; `cpu` (the default) trains
a small LLaMA from random init on 2 CPU cores, with the deviations listed (and measured) in the README.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
import data
import dqn
import llama
import policy
import rollout


def option(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    preset: str = option("cpu", "cpu: a small LLaMA from random init; smollm2 / llama3.1-8b: the paper's IA3 recipe",
                         choices=("cpu", "smollm2", "llama3.1-8b"))
    model_dir: str | None = option(None, "HF LLaMA checkpoint dir of the IA3 presets' base model")
    out: str | None = option(None, "run dir: checkpoints, metrics.jsonl, loss.png (default runs/<preset>)")
    resume: bool = option(False, "continue the run in --out from its newest readable checkpoint")
    overwrite: bool = option(False, "delete the run already in --out and start again")
    dim: int = option(128, "cpu model: width (heads of 32, half as many KV heads, SwiGLU width 3 x dim)")
    n_layers: int = option(4, "cpu model: transformer blocks")
    data_dir: str = option("runs/data", "cache of the generated episodes")
    n_maps: int = option(250, "training maps (the paper: 250)")
    sets_per_map: int = option(12, "episode sets drawn per training map")
    quality: str = option("low", "sets: hi = successes 5x more likely, low = failures 5x, mid = even (the paper)",
                          choices=("hi", "mid", "low"))
    context_len: int = option(1024, "tokens per slice (the paper: 4096)")
    format: str = option("compact", "paper: the paper's text; compact: one token per step piece (cpu preset)",
                         choices=("paper", "compact"))
    facts_tokens: bool = option(True, "compact format: a token after each observation naming its moves' facts")
    canvas: bool = option(True, "compact format: states as tiles of an 8x8 canvas, sets at random offsets")
    canvas_from: float = option(0.6, "with --canvas: share of the steps with every set at the canvas origin first")
    steps: int = option(700, "optimizer steps (0: --epochs passes over the slices)")
    epochs: float = option(1.0, "passes over the data when --steps is 0 (the paper: 1)")
    slices_per_step: int = option(8, "slices per optimizer step, all ranks together (the paper: 10)")
    micro_batch: int = option(4, "slices per forward pass (gradient accumulation up to --slices-per-step)")
    lr: float = option(3e-3, "peak learning rate (the paper: 1e-2 for IA3)")
    warmup_steps: int = option(10, "linear warmup steps, then constant (the paper: 10)")
    weight_decay: float = option(0.01, "AdamW weight decay (the paper: 0.01)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off, the paper)")
    gamma: float = option(0.9, "discount γ of the Bellman targets (the paper: 0.9)")
    reward_scale: float = option(30.0, "episode reward x this in the targets (the paper: 30)")
    alpha: float = option(0.01, "Polyak rate of the target network, Eq. 8 (the paper: 0.1)")
    ema: float = option(0.99, "decay of the weight average that evaluate.py plays (0: play the weights)")
    aux_lm: float = option(30.0, "weight of the auxiliary next-token loss (0: off, the paper)")
    online_every: int = option(140, "every N steps the model plays 50 training maps; its episodes join the data (0: off)")
    online_share: float = option(0.25, "share of each step's slices drawn from the online rounds' episodes")
    eval_every: int = option(40, "held-out TD loss every N steps (0: only at the end)")
    eval_slices: int = option(8, "held-out slices per held-out loss")
    save_every: int = option(80, "checkpoint every N steps (and at the end)")
    seed: int = option(0, "seed of the model init, the slice packing and the data order")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")


# the paper's recipe (§3.3-4): its text, targets, lr 1e-2, 10 x 4096 tokens per step, α 0.1, one epoch ≈ 956 steps
PAPER = dict(format="paper", quality="mid", canvas=False, facts_tokens=False, ema=0.0, aux_lm=0.0, online_every=0,
             context_len=4096, slices_per_step=10, micro_batch=1, lr=1e-2, grad_clip=0.0, alpha=0.1, steps=0,
             sets_per_map=58, eval_every=50, eval_slices=20, save_every=100)
PRESETS = {"cpu": {}, "smollm2": dict(PAPER), "llama3.1-8b": dict(PAPER)}
MODEL_FIELDS = ("preset", "format", "facts_tokens", "canvas", "model_dir", "dim", "n_layers")


def make_config(preset="cpu", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], "preset": preset, **overrides})


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="`python train.py` with no arguments trains the cpu preset.")
    for f in fields(TrainConfig):
        by_preset = {name: PRESETS[name].get(f.name, f.default) for name in PRESETS}
        help = f.metadata["help"] + (f" [{', '.join(f'{k}: {v}' for k, v in by_preset.items())}]"
                                     if len(set(map(str, by_preset.values()))) > 1 else f" [{f.default}]")
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            kind = {int: int, float: float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    debug = given.pop("debug", False)
    try:
        cfg = make_config(given.pop("preset", "cpu"), **given)
        check_config(cfg)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return cfg, debug


def check_config(cfg: TrainConfig):
    """Bad input -> one clear error before any data or model work."""
    positive = ("n_maps", "sets_per_map", "context_len", "slices_per_step", "micro_batch", "eval_slices", "dim",
                "n_layers")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("steps", "warmup_steps", "eval_every", "save_every", "online_every", "grad_clip", "weight_decay",
                 "aux_lm"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.steps == 0 and cfg.epochs <= 0:
        raise ValueError(f"--epochs must be positive when --steps is 0, got {cfg.epochs}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    for name, lo, hi in (("alpha", 0, 1), ("gamma", 0, 1), ("online_share", 0, 1), ("canvas_from", 0, 0.999)):
        if not lo <= getattr(cfg, name) <= hi:
            raise ValueError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {getattr(cfg, name)}")
    if not 0 <= cfg.ema < 1:
        raise ValueError(f"--ema is the average's decay per step: give a number in [0, 1) (0: off), got {cfg.ema}")
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
    if (cfg.canvas or cfg.facts_tokens) and cfg.format != "compact":
        raise ValueError("--canvas and --facts-tokens are pieces of the compact format: add --no-canvas "
                         "--no-facts-tokens for --format paper")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.slices_per_step % (cfg.micro_batch * world):
        raise ValueError(f"--slices-per-step {cfg.slices_per_step} must be a multiple of --micro-batch "
                         f"{cfg.micro_batch} x {world} processes")
    out = Path(cfg.out or f"runs/{cfg.preset}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory")
    if cfg.preset != "cpu":
        hf = json.loads((policy.base_model_dir(cfg) / "config.json").read_text())  # cheap: no weights loaded yet
        if cfg.context_len > llama.ModelArgs.from_hf_config(hf).max_seq_len:
            raise ValueError(f"--context-len {cfg.context_len} is longer than the base model's positions")


# ---------------------------------------------------------------------------------------------------------------------
# The loss

def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then constant (the paper's schedule)."""
    return cfg.lr * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else cfg.lr


def td_loss_on(batch, model, adapter, target, target_adapter, action_ids, cfg, autocast):
    """Eq. 6-7 on one collated batch -> (TD loss, next-token loss or None). With --aux-lm one forward gives the
    logits at every position, and the Q-values are read from them."""
    aux = None
    with autocast():
        if cfg.aux_lm > 0:
            logits = model(batch["tokens"], adapter=adapter)                                       # (B, T, V)
            at = batch["q_positions"][..., None].expand(-1, -1, logits.shape[-1])                  # (B, P, V)
            q_online = logits.gather(1, at)[..., action_ids].float()                               # (B, P, 4)
            aux = dqn.next_token_loss(logits, batch)
        else:
            q_online = dqn.q_values(model, batch["tokens"], batch["q_positions"], action_ids, adapter)  # (B, P, 4)
        with torch.no_grad():
            q_target = dqn.q_values(target, batch["tokens"], batch["q_positions"], action_ids, target_adapter)
    targets = dqn.bellman_targets(q_online, q_target, batch, cfg.gamma, cfg.reward_scale)  # Eq. 6, (B, P)
    return dqn.td_loss(q_online, targets, batch), aux                                        # Eq. 7


# ---------------------------------------------------------------------------------------------------------------------
# The loop

class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run saved its last finished step and stopped."""


def train(cfg: TrainConfig) -> Path:
    """Runs (or resumes) training; returns the run dir. Raises FloatingPointError when the weights or gradients stop
    being finite (nothing non-finite is saved), Interrupted after saving on Ctrl-C / SIGTERM."""
    check_config(cfg)
    run_dir = Path(cfg.out or f"runs/{cfg.preset}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = policy.resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rank == 0:
        checkpoint.prepare_run_dir(run_dir, cfg.resume, cfg.overwrite)
        data.load_episode_sets(cfg, "train"), data.load_episode_sets(cfg, "heldout")  # generate the cache once
    if world > 1:
        dist.barrier()
    resume_from = checkpoint.resume_point(run_dir, policy.needed_files(cfg)) if cfg.resume else None
    model, adapter, target, target_adapter, tokenizer = policy.build_policy(cfg, device, resume_from)
    identity = policy.identity(cfg, model, tokenizer)  # what every checkpoint records (IA3: the base model)
    if resume_from is not None:
        policy.check_same_model(cfg, resume_from, identity, MODEL_FIELDS)
    fmt = policy.trajectory_format(cfg, tokenizer)
    pad_id = fmt.eos[0]  # right padding: causal attention keeps real tokens from seeing it
    action_ids = torch.tensor(fmt.action_ids, device=device)

    def packed(canvas_origin):  # (training slices, this rank's held-out slices): held-out sets sit at the origin
        train_sets = data.load_episode_sets(cfg, "train", canvas_origin)
        return dqn.pack_slices(train_sets, fmt, cfg.context_len, random.Random(cfg.seed)), heldout
    heldout = dqn.pack_slices(data.load_episode_sets(cfg, "heldout"), fmt, cfg.context_len,
                              random.Random(cfg.seed))[:cfg.eval_slices][rank::world]
    slices, _ = packed(False)
    total_steps = cfg.steps or max(1, int(cfg.epochs * len(slices) // cfg.slices_per_step))
    # the canvas curriculum: the first --canvas-from of the steps with every set at the canvas origin
    canvas_start = min(round(cfg.canvas_from * total_steps), total_steps - 1) if cfg.canvas and cfg.canvas_from else 0
    first_stage = packed(True) if canvas_start else None

    def stage(s):  # -> (training slices, held-out slices) of step s
        return first_stage if first_stage and s < canvas_start else (slices, heldout)

    trainable = [p for p in (adapter or model).parameters() if p.requires_grad]
    online_params = list((adapter or model).parameters())
    target_params = list((target_adapter or target).parameters())
    ema = policy.ema_weights(model, adapter, resume_from, device) if cfg.ema else None
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    step, online_sets = 0, []  # online_sets: per kept round (step, its episode sets), newest last
    if resume_from is not None:  # the optimizer, the RNGs, the step and the online rounds, as they were saved
        state = checkpoint.restore(resume_from, optimizer, device)
        step, online_sets = state["step"], state["online_sets"]
    on_cuda = device.type == "cuda"
    model.gradient_checkpointing = on_cuda
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext

    def step_slices(s):  # the global slice order: a fresh permutation of all slices per epoch, seeded
        out, pool = [], stage(s)[0]
        for g in range(s * cfg.slices_per_step, (s + 1) * cfg.slices_per_step):
            epoch, i = divmod(g, len(pool))
            order = list(range(len(pool)))
            random.Random(f"{cfg.seed}/epoch{epoch}").shuffle(order)
            out.append(pool[order[i]])
        if online_pool:  # the last share of the step's slices come from the model's own episodes instead
            n = round(cfg.online_share * cfg.slices_per_step)
            out[len(out) - n:] = random.Random(f"{cfg.seed}/online-pick{s}").choices(online_pool, k=n)
        return out

    def pack_online():  # the kept rounds' episodes, on the canvas at random offsets in the canvas stage
        return [sl for s, sets in online_sets
                for sl in dqn.pack_slices(data.online_sets_placed(cfg, s, sets, cfg.canvas and step >= canvas_start),
                                          fmt, cfg.context_len, random.Random(f"{cfg.seed}/online{s}"))]
    online_pool = pack_online()

    def heldout_loss():
        with torch.no_grad():
            total = torch.zeros(2, device=device)  # (sum of losses, count)
            for s in stage(step)[1]:
                batch = {k: v.to(device) for k, v in dqn.collate([s], pad_id).items()}
                loss, _ = td_loss_on(batch, model, adapter, target, target_adapter, action_ids, cfg, autocast)
                total += torch.stack([loss.float(), torch.ones((), device=device)])
            if world > 1:
                dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def save():  # rank 0 writes, the others wait so that no rank runs ahead of a checkpoint
        if rank == 0:
            if not checkpoint.all_finite([adapter or model, target_adapter or target, ema]):
                raise FloatingPointError(f"weights are not finite at step {step}; not saved. {last_good()}")

            write = functools.partial(policy.save_weights, cfg, model, adapter, target, target_adapter, ema, tokenizer)
            checkpoint.save(run_dir, step, asdict(cfg), write, optimizer, {"step": step, "online_sets": online_sets},
                            identity)
        if world > 1:
            dist.barrier()
        return run_dir / "checkpoints" / f"step_{step:06d}"

    def last_good():
        last = checkpoint.latest_checkpoint(run_dir)
        return (f"The last checkpoint, {last}, is finite: lower --lr or set --grad-clip, then --resume."
                if last else "No checkpoint yet: lower --lr or set --grad-clip and start again.")

    metrics_file = run_dir / "metrics.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = metrics_file.read_text().splitlines() if cfg.resume and metrics_file.exists() else []
        llama.atomic_write_text(metrics_file, "".join(line + "\n" for line in old if json.loads(line)["step"] <= step))
        print(f"[train] {cfg.preset}: {len(slices)} slices of <= {cfg.context_len} tokens, {total_steps} steps x "
              f"{cfg.slices_per_step} slices, {sum(p.numel() for p in trainable):,} trainable parameters, device "
              f"{device}, world {world}" + (f", resuming at step {step}" if resume_from else ""), file=sys.stderr)

    stop = {"signal": None}  # Ctrl-C / SIGTERM: finish the step, save, exit (a second Ctrl-C interrupts at once)

    def on_signal(signum, frame):
        if stop["signal"] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=True if rank else None, dynamic_ncols=True)
    per_rank = cfg.slices_per_step // world
    try:
        with metrics_file.open("a") if rank == 0 else contextlib.nullcontext() as log:
            if step == 0 and cfg.eval_every:  # the untrained model's held-out loss: what "the loss falls" is against
                record = {"step": 0, "heldout_loss": heldout_loss(), "time": time.time()}
                if not math.isfinite(record["heldout_loss"]):
                    raise FloatingPointError(f"held-out loss {record['heldout_loss']} before training: the "
                                             f"initial weights are not finite")
                if rank == 0:
                    log.write(json.dumps(record) + "\n")
            while step < total_steps:
                if cfg.online_every and step % cfg.online_every == 0 and step > 0:
                    t_play, maps = time.perf_counter(), data.online_round_maps(cfg, step)
                    online_sets.append((step, rollout.play_maps(model, adapter, fmt, maps, cfg.context_len, step)))
                    del online_sets[:-data.ONLINE_KEEP]
                    online_pool = pack_online()
                    won = [e.rewards[-1] for eps in online_sets[-1][1] for e in eps[20:]]
                    if rank == 0:
                        log.write(json.dumps({"step": step, "online_greedy_success": sum(won) / max(len(won), 1),
                                              "online_seconds": time.perf_counter() - t_play}) + "\n")
                elif online_pool and cfg.canvas and step == canvas_start:  # the kept rounds move on the canvas too
                    online_pool = pack_online()
                t0, lr = time.perf_counter(), learning_rate(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                mine = step_slices(step)[rank::world]
                optimizer.zero_grad(set_to_none=False)
                loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
                for i in range(0, per_rank, cfg.micro_batch):
                    batch = {k: v.to(device) for k, v in dqn.collate(mine[i:i + cfg.micro_batch], pad_id).items()}
                    loss, aux = td_loss_on(batch, model, adapter, target, target_adapter, action_ids, cfg, autocast)
                    share = len(mine[i:i + cfg.micro_batch]) / cfg.slices_per_step  # mean over the global step
                    ((loss + cfg.aux_lm * aux if aux is not None else loss) * share).backward()
                    loss_sum += loss.detach().float() * share
                    if aux is not None:
                        aux_sum += aux.detach().float() * share
                tokens = torch.tensor(float(sum(len(s.tokens) for s in mine)), device=device)
                if world > 1:  # sum the gradients of all ranks: each already carries its 1/slices_per_step share
                    for p in trainable:
                        dist.all_reduce(p.grad)
                    dist.all_reduce(loss_sum), dist.all_reduce(aux_sum), dist.all_reduce(tokens)
                norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if not (math.isfinite(loss_sum.item()) and math.isfinite(norm.item())):
                    raise FloatingPointError(f"loss {loss_sum.item()}, gradient norm {norm.item()} at step {step + 1}; "
                                             f"stopped before the update. {last_good()}")
                try:
                    optimizer.step()
                except RuntimeError as e:  # AdamW's lr-scaled terms overflow float32 before any weight is written
                    raise FloatingPointError(f"the update of step {step + 1} overflowed (lr {lr:.3g}: {e}). "
                                             f"{last_good()}") from None
                if not checkpoint.all_finite([adapter or model]):
                    raise FloatingPointError(f"the update of step {step + 1} made the weights non-finite (lr {lr:.3g}). "
                                             f"{last_good()}")
                dqn.polyak_update(target_params, online_params, cfg.alpha)  # Eq. 8: φ ← α·θ + (1−α)·φ
                if ema is not None:
                    dqn.polyak_update(ema.parameters(), online_params, 1 - cfg.ema)  # θ̄ ← d·θ̄ + (1−d)·θ
                step += 1
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": loss_sum.item(), "lr": lr, "tokens": tokens.item(),
                          "tokens_per_s": tokens.item() / dt, "time": time.time()}
                if cfg.aux_lm > 0:
                    record["next_token_loss"] = aux_sum.item()
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
                    record["heldout_loss"] = heldout_loss()
                    if not math.isfinite(record["heldout_loss"]):
                        raise FloatingPointError(f"held-out loss {record['heldout_loss']} at step {step}. {last_good()}")
                bar.set_postfix(loss=f"{record['loss']:.3g}", lr=f"{lr:.2g}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if rank == 0:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    save()
                requested = torch.tensor(float(stop["signal"] is not None), device=device)
                if world > 1:  # every rank stops at the same step boundary
                    dist.all_reduce(requested, op=dist.ReduceOp.MAX)
                if requested.item():
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: the weights are still those of the last finished step
        stop["signal"] = signal.SIGINT
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    final = save()
    if rank == 0:
        plot_losses(metrics_file, run_dir / "loss.png", canvas_start)
        print(f"[train] step {step}: checkpoint {final}", file=sys.stderr)
    if stop["signal"] is not None:
        raise Interrupted(f"interrupted ({signal.Signals(stop['signal']).name}): saved step {step} in {final}; "
                          f"continue with --resume --out {run_dir}")
    return run_dir


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
    llama.atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def main(argv=None):
    cfg, debug = parse_args(argv)
    try:
        train(cfg)
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
