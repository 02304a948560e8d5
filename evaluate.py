"""Evaluate an in-context RL policy on Frozen Lake the way the paper does (arXiv 2501.14176, §4), beside baselines.

Per map, 30 episodes with the whole history as context and the paper's warm-up schedule (rollout.py): the model's
greedy action (argmax over the 4 action-word logits at the Q position) with probability floor(k/2)/10 in episode
k < 20, always after. Non-slippery lakes, 100-step limit. Experiments: `id` (50 held-out 3-5 maps), `ood` (50 maps
6-7), `stitching` (the paper's crossing-paths map with its two context episodes, then 5 greedy trials in one
history), `nonstationary` (30 episodes, then a new map with the context kept and the warm-up restarted, 30 more) and
ours, `demo` (one shortest-path episode per start tile in the context, then 3 greedy episodes).

Every policy plays through one harness (rollout.run_episodes) with the same maps, schedule and random stream: the
model and the baselines of baselines.py (uniform random, tabular Q-learning from scratch, the context planner, the BFS
oracle). Outputs go to OUT/<experiment>/ (OUT = --out, default <run>/eval): results.json, success.csv and summary.md
(per episode index: mean and 95% interval over maps; first 2 vs last 10 episodes), success.png (stitching:
context.png and trial<k>_<policy>.png instead), and paths.png: the model's paths on the first 3 lakes in episodes 1,
5, 10, 20 and 30 (every trial of stitching and demo), the in-context learning one can see.

Stitching: the 5 trials run one after another in one row, as every other experiment runs its episodes, so trial t
sees the two context episodes and trials 0..t-1; trial 0 is "the two context episodes alone". Choices the paper
leaves open: the coin is tossed per step; Q-learning (α 0.5, γ 0.9) learns on every transition and keeps its table
across the map switch of `nonstationary`; baselines average `baseline_seeds` seeds, the first the model's own.

Memory: the KV cache holds maps × layers × 2 × (context + 64) × n_kv_heads × head_dim × dtype bytes; the maps run in
groups of `--map-batch` rows (default: as many as fit, from that estimate), with the same results as one group.
"""
import argparse
import csv
import json
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass

import torch

import baselines
import checkpoint
import frozenlake
import policy
import rollout
from dqn import Episode
from rollout import ModelPolicy, RecomputePolicy, run_episodes, schedule

EXPERIMENTS = ("id", "ood", "stitching", "nonstationary", "demo")


@dataclass
class EvalConfig:
    run: str | None = None           # run dir or checkpoint dir of train.py (policy.load_policy); None = baselines only
    online_weights: bool = False     # play the run's online weights θ, not its target network φ
    experiment: str = "id"           # id | ood | stitching | nonstationary | demo | all
    episodes: int = 30               # episodes per map (per map phase in nonstationary)
    maps: int | None = None          # use only the first N maps of the experiment's set (None = all 50)
    map_batch: int | None = None     # maps the model plays at once (None: as many as the KV cache fits)
    warmup: int = 20                 # episodes k < warmup act greedily with p = floor(k/2)/(warmup/2); 0 = all greedy
    seed: int = 0                    # seeds the coin/random-action stream, the env starts and the baselines
    baseline_seeds: int = 10         # baselines run with seeds seed .. seed+N-1 (the model with `seed` only)
    device: str = "auto"             # torch device for the model (auto: cuda if available, else cpu)
    context: int | None = None       # context limit in tokens (None = min(model.args.max_seq_len, 4096))
    recompute: bool = False          # slow reference path: no KV cache, the whole context every step
    stitching_trials: int = 5        # greedy trials after the stitching context, one after another in one history
    demo_trials: int = 3             # greedy episodes after the demonstrations (demo experiment), in one history
    q_lr: float = 0.5                # tabular Q-learning step size α
    q_gamma: float = 0.9             # tabular Q-learning discount γ (the paper's DQN γ)
    max_steps: int = 100             # episode step limit
    out: str | None = None           # output root; results go to OUT/<experiment>/ (default <run>/eval)
    progress: bool = True            # tqdm progress bar
    baselines_only: bool = False     # skip the model (no --run needed)


PLANNER_UNTRIED = 0.9 ** 8  # the planner baseline values an untried move like a goal 8 steps away


class Stopped(Exception):
    """SIGTERM (a time limit) during an evaluation: the policies that finished are written, marked partial."""


def stop(signum, frame):
    raise Stopped("the experiment in progress was not written in full")


# ---------------------------------------------------------------------------------------------------------------------
# The experiments


def stitching_context():
    """The paper's two context episodes on STITCHING_MAP: 2→6→10→14→18→22 (down, reaches the goal), then from the
    start 8→9→10→11 (right, into the hole)."""
    down, right = frozenlake.DOWN, frozenlake.RIGHT
    return [Episode([2, 6, 10, 14, 18, 22], [down] * 5, [0.0, 0.0, 0.0, 0.0, 1.0], False, ncol=4),
            Episode([8, 9, 10, 11], [right] * 3, [0.0, 0.0, 0.0], False, ncol=4)]


def demonstrations(desc):
    """One shortest-path episode from each start tile (the first BFS-optimal action at every step): the context of
    the `demo` experiment, which asks whether the model follows a success it is shown (no exploration needed)."""
    best, env, episodes = frozenlake.optimal_actions(desc), frozenlake.FrozenLake(desc), []
    for start in env.starts:
        env.reset(seed=0)
        env.s, ep = start, Episode([start], [], [], False, ncol=env.ncol)  # deterministic: the seed draws nothing
        while not ep.rewards or ep.rewards[-1] == 0:  # a shortest path never meets a hole
            a = best[ep.observations[-1]][0]
            s, r, _, _, _ = env.step(a)
            ep.observations.append(s)
            ep.actions.append(a)
            ep.rewards.append(r)
        episodes.append(ep)
    return episodes


def experiment_setup(name, cfg, n_train_maps=250):
    """(map sequences, greedy probabilities per episode, context episodes per row) of one experiment; n_train_maps:
    how many training maps the evaluated run saw (nonstationary's second maps avoid all of them)."""
    probs = schedule(cfg.episodes, cfg.warmup)
    if name == "stitching":
        return [[frozenlake.STITCHING_MAP]], [1.0] * cfg.stitching_trials, {0: stitching_context()}
    maps = frozenlake.ood_maps() if name == "ood" else frozenlake.test_maps()
    maps = maps[:cfg.maps] if cfg.maps else maps
    if name == "demo":  # always greedy, after a demonstration; `--experiment id --warmup 0` is the same without it
        return [[m] for m in maps], [1.0] * cfg.demo_trials, {r: demonstrations(m) for r, m in enumerate(maps)}
    if name == "nonstationary":  # a second map per row from the same distribution, unseen in training and testing
        second = frozenlake.generate_maps(len(maps), seed=3,
                                          exclude=frozenlake.train_maps(n_train_maps) + frozenlake.test_maps())
        return [[a, b] for a, b in zip(maps, second)], probs, None
    return [[m] for m in maps], probs, None


def summarize(success, per_map):
    """success[seed][row][episode] -> per episode index: mean and 95% interval over maps (normal approximation on the
    per-map mean over seeds); per map phase: mean success of its first 2 and last 10 episodes, and their ratio."""
    n_seeds, n_rows, n_eps = len(success), len(success[0]), len(success[0][0])
    by_map = [[sum(success[s][r][e] for s in range(n_seeds)) / n_seeds for e in range(n_eps)] for r in range(n_rows)]
    curve = []
    for e in range(n_eps):
        xs = [by_map[r][e] for r in range(n_rows)]
        mean = sum(xs) / n_rows
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n_rows - 1)) if n_rows > 1 else 0.0
        half = 1.96 * sd / math.sqrt(n_rows)
        curve.append((mean, max(0.0, mean - half), min(1.0, mean + half)))
    phases = []
    for start in range(0, n_eps, per_map):
        means = [m for m, _, _ in curve[start:start + per_map]]
        first, last = sum(means[:2]) / len(means[:2]), sum(means[-10:]) / len(means[-10:])
        phases.append({"first2": first, "last10": last, "ratio": last / first if first else None})
    return {"curve": curve, **phases[0], "phases": phases}


# ---------------------------------------------------------------------------------------------------------------------
# Output files


def _atomic_write(path, write, mode="w"):
    def write_file(tmp):
        with open(tmp, mode) as f:
            write(f)
    checkpoint.atomic_write(path, write_file)


def write_outputs(out_dir, name, cfg, setup, results, model_stats):
    """JSON (everything), CSV + markdown (per-episode mean and interval, first-2/last-10/ratio), PNG curves/paths."""
    os.makedirs(out_dir, exist_ok=True)
    map_sequences, probs, context = setup
    per_map = len(probs)
    summaries = {p: summarize(res["success"], per_map) for p, res in results.items()}
    record = {"experiment": name, "config": asdict(cfg), "maps": map_sequences, "greedy_probability": probs,
              "model_stats": model_stats,
              "summary": {p: {k: v for k, v in s.items() if k != "curve"} for p, s in summaries.items()},
              "policies": {p: {k: v for k, v in res.items() if k not in ("paths", "actions") or name == "stitching"}
                           for p, res in results.items()}}
    _atomic_write(os.path.join(out_dir, "results.json"), lambda f: json.dump(record, f, indent=1))

    names = list(results)
    n_eps = len(summaries[names[0]]["curve"])

    def write_csv(f):
        w = csv.writer(f)
        w.writerow(["episode", "greedy_probability"] + [f"{p}_{s}" for p in names for s in ("mean", "lo95", "hi95")])
        for e in range(n_eps):
            w.writerow([e, probs[e % per_map]] + [f"{x:.4f}" for p in names for x in summaries[p]["curve"][e]])
    _atomic_write(os.path.join(out_dir, "success.csv"), write_csv)

    ratio = lambda r: "-" if r is None else f"{r:.2f}"  # noqa: E731  (no success in the first 2 episodes)
    lines = [f"# {name}: success per episode ({len(map_sequences)} maps, seed {cfg.seed})", "",
             "| policy | seeds | map | first 2 episodes | last 10 episodes | improvement ratio (last 10 / first 2) |",
             "|---|---|---|---|---|---|"]
    for p in names:
        for i, s in enumerate(summaries[p]["phases"]):
            lines.append(f"| {p} | {len(results[p]['success'])} | {i + 1} | {s['first2']:.3f} | {s['last10']:.3f} | "
                         f"{ratio(s['ratio'])} |")
    if model_stats:
        lines += ["", f"Model: {model_stats['context_overflows']} context overflows (re-prefills) with a "
                      f"{model_stats['context']}-token context."]
    lines += ["",
              "| episode | p(greedy) | " + " | ".join(f"{p} (95% interval)" for p in names) + " |",
              "|---" * (len(names) + 2) + "|"]
    for e in range(n_eps):
        cells = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in (summaries[p]["curve"][e] for p in names)]
        lines.append(f"| {e} | {probs[e % per_map]:.1f} | " + " | ".join(cells) + " |")
    _atomic_write(os.path.join(out_dir, "summary.md"), lambda f: f.write("\n".join(lines) + "\n"))

    if name == "stitching":
        desc = map_sequences[0][0]
        frozenlake.render_png(desc, [ep.observations for ep in context[0]], os.path.join(out_dir, "context.png"),
                              title="context: success from 2 (red), hole from 8 (blue)")
        for p in names:
            for t, path in enumerate(results[p]["paths"][0][0]):
                frozenlake.render_png(desc, [path], os.path.join(out_dir, f"trial{t}_{p}.png"),
                                      title=f"{p}, trial {t}: {'goal' if results[p]['success'][0][0][t] else 'fail'}")
    else:
        plot_curves(os.path.join(out_dir, "success.png"), name, summaries, per_map, len(map_sequences))
    who = "model" if "model" in results else "planner"  # without a model, the baselines' in-context learner
    plot_paths(os.path.join(out_dir, "paths.png"), name, map_sequences, probs,
               {k: v[0] for k, v in results[who].items()}, who)
    return summaries


PATH_EPISODES = (1, 5, 10, 20, 30)  # the episodes paths.png draws: random, warming up, greedy


def plot_paths(path, name, map_sequences, probs, run, who, n_lakes=3):
    """The first n_lakes rows' lakes (each map of a row), one panel per drawn episode: the policy's path in episodes
    1, 5, 10, 20, 30 (every trial when all episodes are greedy: stitching, demo) on frozenlake.draw_lake's picture.
    run: one seed's run_episodes output. Returns the grid drawn: per panel row, (row, episode index) per column."""
    from matplotlib.figure import Figure
    per_map = len(probs)
    trials = min(probs) == 1.0
    shown = list(range(min(per_map, 8))) if trials else sorted({min(e, per_map) - 1 for e in PATH_EPISODES})
    lakes = [(r, m) for r in range(min(n_lakes, len(map_sequences))) for m in range(len(map_sequences[r]))]
    tall = [2.0 * len(map_sequences[r][m]) / len(map_sequences[r][m][0]) for r, m in lakes]  # 2 in wide, inches
    width, height = 2.2 * len(shown), sum(tall) + 0.5 * len(lakes) + 0.4  # 0.5 in per row of titles, 0.4 on top
    fig, top, grid = Figure(figsize=(width, height)), height - 0.4, []
    for i, (r, m) in enumerate(lakes):  # placed by hand: each lake row exactly as tall as its lakes
        top -= 0.5 + tall[i]
        grid.append([(r, m * per_map + e) for e in shown])
        for j, (_, k) in enumerate(grid[-1]):
            states, n = run["paths"][r][k], run["steps"][r][k]
            end = "goal" if run["success"][r][k] else "cut" if run["truncated"][r][k] else "hole"
            ax = fig.add_axes(((2.2 * j + 0.1) / width, top / height, 2.0 / width, tall[i] / height))
            frozenlake.draw_lake(ax, map_sequences[r][m], [states])
            lake = f"lake {r + 1}" + (f" map {m + 1}" if len(map_sequences[r]) > 1 else "")
            p = "" if trials else f" (p {probs[k % per_map]:.1f})"
            ax.set_title(f"{lake}, {'trial' if trials else 'episode'} {k % per_map + 1}{p}\n"
                         f"{end} after {n} step{'s' * (n != 1)}", fontsize=8)
    fig.suptitle(f"{name}: {who}'s paths (square: its start; S green, G gold, H dark"
                 + ("" if trials else "; p: probability of a greedy step") + ")", fontsize=9, y=1 - 0.15 / height)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
    return grid


def plot_curves(path, name, summaries, per_map, n_maps):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    styles = {"model": "-", "random": ":", "q-learning": "--", "planner": (0, (1, 1)), "oracle": "-."}
    for p, s in summaries.items():
        xs = list(range(len(s["curve"])))
        mean, lo, hi = zip(*s["curve"])
        line, = ax.plot(xs, mean, linestyle=styles.get(p, "-"), label=p, linewidth=2.2 if p == "model" else 1.4)
        ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
    for x in range(per_map, len(xs), per_map):
        ax.axvline(x - 0.5, color="grey", linewidth=1)  # map switch (nonstationary)
    ax.set_xlabel("episode")
    ax.set_ylabel(f"success (mean over {n_maps} maps, 95% interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Frozen Lake, {name}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def check_config(cfg, model_given=False):
    """Bad settings -> ValueError naming the setting and the fix, before any work."""
    if cfg.experiment not in EXPERIMENTS + ("all",):
        raise ValueError(f"unknown experiment {cfg.experiment!r}; choose one of {EXPERIMENTS + ('all',)}")
    for name in ("episodes", "baseline_seeds", "stitching_trials", "demo_trials", "max_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("maps", "map_batch"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (or left out), got {getattr(cfg, name)}")
    if cfg.context is not None and cfg.context < 64:
        raise ValueError(f"--context {cfg.context} is too small to hold a step: give at least 64 tokens")
    if cfg.warmup < 0 or cfg.warmup % 2:
        raise ValueError(f"--warmup must be a non-negative even number (p steps up every 2 episodes), got {cfg.warmup}")
    if cfg.run is None and not cfg.baselines_only and not model_given:
        raise ValueError("give --run RUN_DIR (a train.py output dir or checkpoint dir) or --baselines-only")


def map_batch_size(model, context: int, n_maps: int, device) -> int:
    """Maps per group: all of them on the CPU; on CUDA as many as 80% of the free memory holds, counting each row's
    KV cache (rollout.cache_bytes) and a prefill's activations (a row of `context` tokens: ~16 x its KV bytes)."""
    if device.type != "cuda":
        return n_maps
    free, _ = torch.cuda.mem_get_info(device)
    per_row = rollout.cache_bytes(model, 1, context)
    return max(1, min(n_maps, int(0.8 * free - 16 * per_row) // per_row))


def play(player, setup, seed, max_steps, bar, group):
    """run_episodes over the rows in groups of `group` maps, each row keeping its own random stream: the same
    results as one group of all rows (a smaller KV cache at a time)."""
    map_sequences, probs, context = setup
    parts = []
    for g in range(0, len(map_sequences), group):
        rows = range(g, min(g + group, len(map_sequences)))
        ctx = {r - g: context[r] for r in rows if context and r in context}
        parts.append(run_episodes(player, [map_sequences[r] for r in rows], probs, seed, ctx, max_steps, bar,
                                  first_row=g))
    return {k: [row for part in parts for row in part[k]] for k in parts[0]}


def evaluate(cfg, policy_model=None):
    """Run cfg.experiment (or all) and write the outputs; returns {experiment: {policy: summary}}.
    `policy_model`: an already built ModelPolicy (tests); otherwise loaded with policy.load_policy(cfg.run)."""
    from tqdm import tqdm
    check_config(cfg, model_given=policy_model is not None)
    names = EXPERIMENTS if cfg.experiment == "all" else (cfg.experiment,)
    n_train_maps = 250  # the paper's training maps, unless the run was trained on more
    if policy_model is None and not cfg.baselines_only:
        device = policy.resolve_device(cfg.device)
        n_train_maps = max(n_train_maps, policy.saved_config(policy.checkpoint_dir(cfg.run)).n_maps)
        model, adapter, _, fmt = policy.load_policy(cfg.run, device=device, online=cfg.online_weights)
        if cfg.context and cfg.context > model.args.max_seq_len:
            raise ValueError(f"--context {cfg.context} is longer than the model's {model.args.max_seq_len} "
                             f"positions: give at most {model.args.max_seq_len}")
        player = RecomputePolicy if cfg.recompute else ModelPolicy  # the definition, or the same actions faster
        policy_model = player(model.eval(), fmt, adapter, context=cfg.context)
    out_root = cfg.out or (os.path.join(cfg.run, "eval") if cfg.run else os.path.join("runs", "baselines", "eval"))
    report = {}
    for name in names:
        setup = experiment_setup(name, cfg, n_train_maps)
        map_sequences, probs, context = setup
        n_rows = len(map_sequences)
        group = cfg.map_batch or (map_batch_size(policy_model.model, policy_model.limit, n_rows, policy_model.device)
                                  if policy_model is not None else n_rows)
        seeds = [cfg.seed + i for i in range(cfg.baseline_seeds)]
        jobs = [("model", lambda seed: policy_model, [cfg.seed], group)] if policy_model is not None else []
        jobs += [("random", baselines.RandomPolicy, seeds, n_rows),
                 ("q-learning", lambda s: baselines.QLearningPolicy(cfg.q_lr, cfg.q_gamma, s), seeds, n_rows),
                 ("planner", lambda s: baselines.PlannerPolicy(untried=PLANNER_UNTRIED, seed=s), seeds, n_rows),
                 ("oracle", lambda seed: baselines.OraclePolicy(), seeds, n_rows)]
        total = sum(len(s) for _, _, s, _ in jobs) * n_rows * len(probs) * len(map_sequences[0])
        results, model_stats, missing = {}, {}, []
        try:
            with tqdm(total=total, desc=name, unit="episode", disable=not cfg.progress) as bar:
                for pname, make, job_seeds, size in jobs:
                    runs = []
                    for seed in job_seeds:
                        bar.set_postfix(policy=pname, seed=seed)
                        runs.append(play(make(seed), setup, seed, cfg.max_steps, bar, size))
                    results[pname] = {k: [r[k] for r in runs] for k in runs[0]}
        except Stopped:  # the model plays first: a time limit that stops the baselines still leaves its numbers
            if not results:
                raise Stopped(f"no policy of {name} had finished: nothing written for it") from None
            missing = [pname for pname, *_ in jobs if pname not in results]
        if policy_model is not None:
            model_stats = {"context": policy_model.limit, "context_overflows": policy_model.overflows,
                           "map_batch": group}
        report[name] = write_outputs(os.path.join(out_root, name), name, cfg, setup, results, model_stats)
        for p, summary in report[name].items():
            for i, s in enumerate(summary["phases"]):
                print(f"{name:14s} {p:11s} map {i + 1}: first-2 {s['first2']:.3f}  last-10 {s['last10']:.3f}  "
                      f"ratio {'-' if s['ratio'] is None else round(s['ratio'], 2)}")
        if model_stats:
            print(f"{name:14s} model: {model_stats['context_overflows']} context overflows (re-prefills) in "
                  f"{model_stats['context']} tokens")
        print(f"wrote {os.path.join(out_root, name)}/")
        if missing:
            with open(os.path.join(out_root, name, "summary.md"), "a") as f:
                f.write(f"\nPartial: stopped by SIGTERM before {', '.join(missing)} finished.\n")
            raise Stopped(f"wrote {', '.join(results)} of {name} to {os.path.join(out_root, name)}/, marked "
                          f"partial; not run: {', '.join(missing)}")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = EvalConfig()
    p.add_argument("--run", default=d.run, help="train.py run dir (latest checkpoint) or a checkpoint dir")
    p.add_argument("--online-weights", action="store_true",
                   help="play the run's online weights θ, not its target network φ (Eq. 8's slow average of θ)")
    p.add_argument("--experiment", default=d.experiment, choices=EXPERIMENTS + ("all",))
    p.add_argument("--episodes", type=int, default=d.episodes, help="episodes per map (per map phase)")
    p.add_argument("--maps", type=int, default=d.maps, help="use only the first N maps of the set")
    p.add_argument("--map-batch", type=int, default=d.map_batch,
                   help="maps the model plays at once (default: as many as the KV cache fits; same results)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="episodes with p(greedy) = floor(k/2)/(warmup/2) before always greedy (0 = always greedy)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the random stream, starts and baselines")
    p.add_argument("--baseline-seeds", type=int, default=d.baseline_seeds, help="seeds averaged for the baselines")
    p.add_argument("--device", default=d.device, help="torch device of the model: auto (cuda if present), cpu, cuda")
    p.add_argument("--context", type=int, default=d.context,
                   help="context limit in tokens (default: the model's max_seq_len, at most 4096)")
    p.add_argument("--recompute", action="store_true", help="slow reference path without KV cache")
    p.add_argument("--stitching-trials", type=int, default=d.stitching_trials,
                   help="greedy trials after the context, one after another (trial t sees trials 0..t-1)")
    p.add_argument("--demo-trials", type=int, default=d.demo_trials,
                   help="demo experiment: greedy episodes after the shortest-path demonstrations, in one history")
    p.add_argument("--q-lr", type=float, default=d.q_lr, help="Q-learning baseline step size")
    p.add_argument("--q-gamma", type=float, default=d.q_gamma, help="Q-learning baseline discount")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="episode step limit")
    p.add_argument("--out", default=d.out, help="output root (results in OUT/<experiment>/; default RUN/eval)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--baselines-only", action="store_true", help="run only random, Q-learning, planner and oracle")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = vars(p.parse_args(argv))
    debug = args.pop("debug")
    cfg = EvalConfig(**args)
    try:
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg, debug


def main(argv=None):
    cfg, debug = parse_args(argv)
    signal.signal(signal.SIGTERM, stop)  # a time limit's SIGTERM: write what finished, then exit non-zero
    try:
        evaluate(cfg)
    except Stopped as e:
        sys.exit(f"evaluate.py: stopped by SIGTERM: {e}")
    except (ValueError, OSError, RuntimeError) as e:  # a bad run dir or checkpoint: one line naming it
        if debug:
            raise
        sys.exit(f"evaluate.py: error: {e}")


if __name__ == "__main__":
    main()
