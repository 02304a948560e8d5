"""What the model computes: its Q-values on held-out lakes against the true optimal ones.

`python qvalues.py --run RUN_DIR [--experiment id|ood]` plays the trained model exactly as evaluate.py does (the same
maps, warm-up schedule and random stream: rollout.run_episodes with rollout.ModelPolicy) and, at every step that
took the model's greedy action (every greedy step; a random step that drew the same action took it too), compares
the model's Q of that action with its true optimal value on the real map:

    Q*(s, a) = 30 · γ^(d−1)    d = the steps from s to a goal taking a first, then a shortest path (γ = 0.9)
             = 0               a enters a hole, or a tile from which no goal can be reached

the fixed point of the training targets (Eq. 6: γ 0.9, reward × 30) under a perfect player. A move into the edge
keeps s, so d = 1 + dist(s). The model knows only its context, so early in a lake its Q cannot be Q* yet.

Outputs in OUT (default RUN/eval/<experiment>/): qvalues.png (the model's Q against Q*, points coloured by episode,
the mean per Q* level), qvalues_map.png (one lake: at each visited state the model's greedy action and max-Q at its
last visit, beside V*), qvalues.json (Pearson r and the mean absolute error in Q's units, 30 × reward, over all
recorded steps and per phase).
"""
import argparse
import json
import os
import statistics

import checkpoint
import evaluate
import frozenlake
import policy
import rollout

GAMMA, SCALE = 0.9, 30.0  # train.py's --gamma and --reward-scale


def true_q(desc, gamma=GAMMA, scale=SCALE) -> list[list[float]]:
    """Q*(s, a) of a non-slippery lake (module docstring), [state][action]; 0 on goals and holes (never asked)."""
    env, dist = frozenlake.FrozenLake(desc), frozenlake.goal_distances(desc)
    q = []
    for s in range(env.observation_space.n):
        outcomes = [env.P[s][a][0] for a in range(4)]  # (prob 1, next state, reward, terminated)
        q.append([scale * r if done else 0.0 if dist[t] is None else scale * gamma ** dist[t]
                  for _, t, r, done in outcomes])
    return q


class RecordingPolicy(rollout.ModelPolicy):
    """ModelPolicy that keeps every step it was asked about: row, episode, state, the 4 Q-values, the action taken."""

    def reset(self, n_rows):
        super().reset(n_rows)
        self.steps, self.asked, self.episode = [], {}, [0] * n_rows

    def greedy_actions(self, rows, maps, episodes):
        actions = super().greedy_actions(rows, maps, episodes)
        for row, ep, q in zip(rows, episodes, self.last_q.float().tolist()):
            self.asked[row] = (ep.observations[-1], q)
        return actions

    def observe(self, row, episode, terminated, done):
        super().observe(row, episode, terminated, done)
        s, q = self.asked.pop(row)
        self.steps.append({"row": row, "episode": self.episode[row], "state": s, "q": q,
                           "action": episode.actions[-1]})
        self.episode[row] += done


def pair_stats(steps) -> dict:
    """Pearson r (None when either side is constant) and mean absolute error of the model's Q against Q*."""
    q, q_star = [s["q"][s["action"]] for s in steps], [s["q_star"] for s in steps]
    try:
        r = statistics.correlation(q, q_star)
    except statistics.StatisticsError:  # fewer than 2 steps or a constant side
        r = None
    return {"steps": len(steps), "pearson": r, "mae": sum(abs(a - b) for a, b in zip(q, q_star)) / max(len(q), 1)}


def check(player, maps, probs, seed=0, max_steps=100, progress=None) -> list[dict]:
    """Play the maps (one row each) under `probs`; the steps that took the model's greedy action, with Q*."""
    rollout.run_episodes(player, [[m] for m in maps], probs, seed=seed, max_steps=max_steps, progress=progress)
    stars = [true_q(m) for m in maps]
    steps = [s for s in player.steps if max(range(4), key=s["q"].__getitem__) == s["action"]]
    for s in steps:
        s["q_star"] = stars[s["row"]][s["state"]][s["action"]]
    return steps


def plot_calibration(path, steps, title):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    jitter = [((i * 7919) % 101 / 100 - 0.5) * 0.6 for i in range(len(steps))]  # spreads each Q* column
    dots = ax.scatter([s["q_star"] + j for s, j in zip(steps, jitter)], [s["q"][s["action"]] for s in steps], s=5,
                      c=[s["episode"] + 1 for s in steps], cmap="viridis", alpha=0.35, linewidths=0)
    fig.colorbar(dots, ax=ax, label="episode")
    levels = sorted({s["q_star"] for s in steps})
    means = [statistics.fmean(s["q"][s["action"]] for s in steps if s["q_star"] == v) for v in levels]
    ax.plot(levels, means, "o-", color="black", markersize=4, label="mean per Q* level")
    ax.plot([0, SCALE], [0, SCALE], ":", color="grey", label="Q = Q*")
    ax.set_xlim(-2, SCALE + 2)
    ax.set_xlabel("Q*(s, a): 30·0.9^(d−1) on the real map (d: steps to the goal)")
    ax.set_ylabel("the model's Q(h, a) of its greedy action")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_map(path, desc, row_steps, title):
    """One lake: at each state the model was asked about (greedy step or not), its greedy action (green: optimal,
    red: not) and max-Q at the last visit (top right), V* = max_a Q* (bottom left)."""
    from matplotlib.figure import Figure
    nrow, ncol = len(desc), len(desc[0])
    fig = Figure(figsize=(1.1 * ncol + 0.4, 1.1 * nrow + 0.8))
    ax = fig.add_subplot()
    frozenlake.draw_lake(ax, desc, [])
    last = {s["state"]: s["q"] for s in row_steps}  # in step order: the last visit wins
    best, star = frozenlake.optimal_actions(desc), true_q(desc)
    for s, q in last.items():
        (r, c), a = divmod(s, ncol), max(range(4), key=q.__getitem__)
        dr, dc = frozenlake.MOVES[a]
        ax.annotate("", xy=(c + 0.5 + 0.32 * dc, r + 0.5 + 0.32 * dr), xytext=(c + 0.5, r + 0.5),
                    arrowprops=dict(arrowstyle="-|>", lw=2, color="#2ca02c" if a in best[s] else "#d62728"))
        ax.text(c + 0.96, r + 0.06, f"{max(q):.1f}", fontsize=8, ha="right", va="top", fontweight="bold")
        ax.text(c + 0.06, r + 0.94, f"V* {max(star[s]):.1f}", fontsize=6, ha="left", va="bottom", color="#555555")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="train.py run dir (latest checkpoint) or a checkpoint dir")
    p.add_argument("--experiment", default="id", choices=("id", "ood"), help="the held-out lakes evaluate.py plays")
    p.add_argument("--maps", type=int, default=None, help="only the first N lakes (default: all 50)")
    p.add_argument("--lake", type=int, default=0, help="the lake qvalues_map.png draws (index into the set)")
    p.add_argument("--max-steps", type=int, default=100, help="episode step limit (evaluate.py's default)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if present), cpu, cuda")
    p.add_argument("--out", default=None, help="output dir (default RUN/eval/<experiment>)")
    args = p.parse_args(argv)
    from tqdm import tqdm
    maps, probs, _ = evaluate.experiment_setup(args.experiment, evaluate.EvalConfig(maps=args.maps))
    model, adapter, _, fmt = policy.load_policy(args.run, device=policy.resolve_device(args.device))
    player = RecordingPolicy(model, fmt, adapter)
    maps = [seq[0] for seq in maps]
    with tqdm(total=len(maps) * len(probs), desc=args.experiment, unit="episode") as bar:
        steps = check(player, maps, probs, max_steps=args.max_steps, progress=bar)
    warmup = next(k for k, p in enumerate(probs) if p == 1.0)
    record = {"run": args.run, "experiment": args.experiment, "maps": len(maps), **pair_stats(steps),
              "warm_up": pair_stats([s for s in steps if s["episode"] < warmup]),
              "greedy": pair_stats([s for s in steps if s["episode"] >= warmup]),
              "levels": {f"{v:.3f}": statistics.fmean(s["q"][s["action"]] for s in steps if s["q_star"] == v)
                         for v in sorted({s["q_star"] for s in steps})}}
    out = args.out or os.path.join(args.run, "eval", args.experiment)
    checkpoint.atomic_write_text(os.path.join(out, "qvalues.json"), json.dumps(record, indent=1))
    r = "-" if record["pearson"] is None else f"{record['pearson']:.3f}"
    plot_calibration(os.path.join(out, "qvalues.png"), steps,
                     f"{args.experiment}: {len(steps)} greedy steps on {len(maps)} lakes; "
                     f"Pearson r {r}, mean |Q − Q*| {record['mae']:.2f}")
    plot_map(os.path.join(out, "qvalues_map.png"), maps[args.lake], [s for s in player.steps if s["row"] == args.lake],
             f"{args.experiment} lake {args.lake + 1}: greedy action (green: optimal) and max-Q, last visit")
    for name, s in (("all", record), ("warm-up", record["warm_up"]), ("greedy", record["greedy"])):
        print(f"{args.experiment} {name:8s} {s['steps']:6d} steps  Pearson r "
              f"{'-' if s['pearson'] is None else format(s['pearson'], '.3f')}  MAE {s['mae']:.2f}")
    print(f"wrote {out}/qvalues.png, qvalues_map.png, qvalues.json")
    return record


if __name__ == "__main__":
    main()
