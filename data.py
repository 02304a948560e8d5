"""The offline data of the paper (§3.2, REFERENCE.md §1): learning histories of a tabular RL agent on Frozen Lake.

On every training map a tabular Q-learner with ε-greedy exploration (ε linear from 1 to 0.05) runs from scratch; its
episodes, from early failures to later successes, are the data. Sets of 20-40 episodes of one map are drawn with the
paper's quality weighting (hi: successes 5x more likely, low: failures 5x, mid: uniform) and shuffled; train.py packs
them into context slices (dqn.pack_slices). A data set is generated once per data config and cached on disk beside a
manifest (the generating config, its hash and the data's checksum): a changed config or a corrupted file regenerates.

Deliberate deviations from the paper (arXiv 2501.14176):
- The paper's "traditional RL algorithm" is unpublished; we use tabular Q-learning. `--learner rmax` records R-max
  (model-based, optimistic) instead; it did not help (results/HISTORY.md).
- The held-out TD loss reads data generated the same way on frozenlake.test_maps() (50 maps, disjoint from the
  training maps), not a split of the training maps.
- `--canvas`: states as tiles of an 8x8 canvas, each training set at one random offset (held-out sets at the origin,
  where evaluate.py plays), so larger maps meet trained tokens.
- Optional: `--set-order chronological` keeps the Q-learner's order inside a set (the paper shuffles);
  `--relabel-states` renames each set's states by a random permutation; online rounds add the model's own episodes.
"""
import hashlib
import json
import random
import time
from pathlib import Path

import dqn
import frozenlake
import llama

DATA_VERSION = 1  # bump when the generator changes: every cached data set is then regenerated


# ---------------------------------------------------------------------------------------------------------------------
# The learners: tabular Q-learning (the data) and R-max (--learner rmax), from scratch on one map.

def epsilon_greedy_episodes(desc, n_episodes, rng: random.Random, values, learn) -> list[dqn.Episode]:
    """The loop both data learners share: ε linear from 1 to 0.05 over the run; a greedy step takes the best of
    values(s) (4 action values), ties broken at random; learn(s, a, r, s', terminated) after every step."""
    env = frozenlake.FrozenLake(desc, max_steps=100)
    episodes = []
    for k in range(n_episodes):
        eps = 1.0 + (0.05 - 1.0) * k / max(n_episodes - 1, 1)
        s, _ = env.reset(seed=int(rng.random() * 2**31))
        obs, acts, rews = [s], [], []
        while True:
            if rng.random() < eps:
                a = int(rng.random() * 4)
            else:
                q = values(s)
                ties = [b for b in range(4) if q[b] == max(q)]
                a = ties[int(rng.random() * len(ties))]
            s2, r, terminated, truncated, _ = env.step(a)
            learn(s, a, r, s2, terminated)
            obs.append(s2), acts.append(a), rews.append(float(r))
            s = s2
            if terminated or truncated:
                episodes.append(dqn.Episode(obs, acts, rews, truncated=truncated and not terminated))
                break
    return episodes


def q_learning_episodes(desc, n_episodes, lr, gamma, rng: random.Random) -> list[dqn.Episode]:
    """A tabular Q-learner from scratch, ε-greedy (epsilon_greedy_episodes)."""
    Q = [[0.0] * 4 for _ in range(len(desc) * len(desc[0]))]

    def learn(s, a, r, s2, terminated):  # Q ← Q + lr·(r + γ max Q' − Q)
        Q[s][a] += lr * (r + gamma * max(Q[s2]) * (not terminated) - Q[s][a])
    return epsilon_greedy_episodes(desc, n_episodes, rng, lambda s: Q[s], learn)


def rmax_episodes(desc, n_episodes, gamma, rng: random.Random) -> list[dqn.Episode]:
    """R-max (Brafman & Tennenholtz 2002) for a deterministic lake, from scratch: it learns the moves it has tried and
    where episodes ended; an untried (s, a) is worth the maximum reward 1 (optimism), so its greedy policy walks to the
    nearest untried move until a goal is known, then takes the shortest known path. It knows nothing of the grid.
    Same ε schedule as q_learning_episodes (epsilon_greedy_episodes)."""
    n = len(desc) * len(desc[0])
    move = [[None] * 4 for _ in range(n)]  # the learned model: s, a -> s' (None: untried)
    ended = {}                              # a state where an episode terminated -> its reward (1 goal, 0 hole)
    q = []                                  # the current plan, Q(s, a)

    def plan():  # value iteration on the learned model: Q(s, a) = 1 untried, r at an end, else γ·max Q(s', ·)
        v = [0.0] * n
        for _ in range(n + 1):
            q[:] = [[1.0 if t is None else ended[t] if t in ended else gamma * v[t] for t in move[s]]
                    for s in range(n)]
            v = [max(row) for row in q]

    def learn(s, a, r, s2, terminated):
        if move[s][a] is None:  # a goal or hole ends the episode whenever it is entered: first entry tells
            move[s][a] = s2
            if terminated:
                ended[s2] = float(r)
            plan()  # replan only when the model learned something
    plan()
    return epsilon_greedy_episodes(desc, n_episodes, rng, lambda s: q[s], learn)


# ---------------------------------------------------------------------------------------------------------------------
# A data set: every map's learning runs, then sets of 20-40 episodes of one map drawn with the quality weighting.

def quality_weight(ep: dqn.Episode, quality: str) -> float:
    success = sum(ep.rewards) > 0
    return {"hi": 5.0 if success else 1.0, "low": 1.0 if success else 5.0, "mid": 1.0}[quality]


def sample_set(weights: list[float], n: int, rng: random.Random) -> list[int]:
    """n distinct indices, each draw proportional to its weight among those left (Efraimidis-Spirakis keys u^(1/w))."""
    keys = [rng.random() ** (1.0 / w) for w in weights]
    return sorted(range(len(weights)), key=lambda i: -keys[i])[:n]


def data_config(cfg: "train.TrainConfig", split: str) -> dict:
    maps = frozenlake.train_maps(cfg.n_maps) if split == "train" else frozenlake.test_maps()
    return {"version": DATA_VERSION, "split": split, "maps": maps, "qlearn_runs": cfg.qlearn_runs,
            "learner": cfg.learner, "qlearn_episodes": cfg.qlearn_episodes, "qlearn_lr": cfg.qlearn_lr,
            "qlearn_gamma": cfg.qlearn_gamma,
            "sets_per_map": cfg.sets_per_map if split == "train" else cfg.heldout_sets_per_map,
            "set_min": cfg.set_min, "set_max": cfg.set_max, "quality": cfg.quality, "data_seed": cfg.data_seed}


def generate_data(dc: dict) -> dict:
    """{"episodes": [map][run][episode] as [obs, actions, rewards, truncated], "sets": [[map, run, [episode...]]]}."""
    episodes = []
    for m, desc in enumerate(dc["maps"]):
        runs = []
        for r in range(dc["qlearn_runs"]):
            rng = random.Random(f"{dc['data_seed']}/{dc['split']}/{m}/{r}")  # str seeds are stable across versions
            eps = (rmax_episodes(desc, dc["qlearn_episodes"], dc["qlearn_gamma"], rng) if dc["learner"] == "rmax"
                   else q_learning_episodes(desc, dc["qlearn_episodes"], dc["qlearn_lr"], dc["qlearn_gamma"], rng))
            runs.append([[e.observations, e.actions, e.rewards, e.truncated] for e in eps])
        episodes.append(runs)
    rng, sets = random.Random(f"{dc['data_seed']}/{dc['split']}/sets"), []
    for m, runs in enumerate(episodes):
        for _ in range(dc["sets_per_map"]):
            r = int(rng.random() * len(runs))
            n = dc["set_min"] + int(rng.random() * (dc["set_max"] - dc["set_min"] + 1))
            weights = [quality_weight(dqn.Episode(*e), dc["quality"]) for e in runs[r]]
            chosen = sample_set(weights, n, rng)
            rng.shuffle(chosen)  # no order inside a set (unlike Algorithm Distillation)
            sets.append([m, r, chosen])
    return {"episodes": episodes, "sets": sets}


# ---------------------------------------------------------------------------------------------------------------------
# The sets on disk: generated once per data config, then read back and placed on the canvas.

def load_episode_sets(cfg: "train.TrainConfig", split: str) -> list[list[dqn.Episode]]:
    """The episode sets of a split, generated once per data config into data_dir/<split>-<hash>/ (data, then the
    manifest, each written atomically; a dir without a matching manifest is regenerated)."""
    dc = data_config(cfg, split)
    digest = hashlib.sha256(json.dumps(dc, sort_keys=True).encode()).hexdigest()
    where = Path(cfg.data_dir) / f"{split}-{digest[:12]}"
    manifest_file, data_file = where / "manifest.json", where / "episodes.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    text = data_file.read_text() if manifest.get("hash") == digest and data_file.is_file() else None
    if text is None or hashlib.sha256(text.encode()).hexdigest() != manifest.get("data_sha256"):
        text = json.dumps(generate_data(dc), separators=(",", ":"))
        llama.atomic_write_text(data_file, text)
        manifest = {"hash": digest, "config": dc, "data_sha256": hashlib.sha256(text.encode()).hexdigest(),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        llama.atomic_write_text(manifest_file, json.dumps(manifest, indent=1))
    data = json.loads(text)
    order = sorted if cfg.set_order == "chronological" else list  # the stored sets are shuffled
    sets = [[dqn.Episode(*data["episodes"][m][r][i]) for i in order(chosen)] for m, r, chosen in data["sets"]]
    for (m, _, _), episodes in zip(data["sets"], sets):
        for ep in episodes:
            ep.ncol = len(dc["maps"][m][0])
    if cfg.canvas:  # training sets at a random place on the canvas, held-out ones at (0, 0) like the evaluation
        rng = random.Random(f"{cfg.seed}/canvas")
        for i, (m, _, _) in enumerate(data["sets"]):
            rows, cols = len(dc["maps"][m]), len(dc["maps"][m][0])
            at_origin = split != "train" or (cfg.canvas_origin_share and rng.random() < cfg.canvas_origin_share)
            offset = (0, 0) if at_origin else canvas_offset(rows, cols, rng)
            sets[i] = [dqn.to_canvas(ep, *offset) for ep in sets[i]]
    return sets


def canvas_offset(rows: int, cols: int, rng: random.Random) -> tuple[int, int]:
    """A random (row, col) offset that keeps a rows x cols map on the 8x8 canvas."""
    return int(rng.random() * (dqn.CANVAS - rows + 1)), int(rng.random() * (dqn.CANVAS - cols + 1))


def relabel_states(episode_sets: list[list[dqn.Episode]], rng: random.Random) -> list[list[dqn.Episode]]:
    """Each set's states renamed by its own random permutation of 0..63 (the dynamics are unchanged)."""
    out = []
    for episodes in episode_sets:
        perm = rng.sample(range(64), 64)
        out.append([dqn.Episode([perm[s] for s in e.observations], e.actions, e.rewards, e.truncated, e.ncol)
                    for e in episodes])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Online rounds (--online-every, the paper's §4.6 proposal): the model's own episodes join the data.

def play_maps(model, adapter, fmt, maps, context_len, seed) -> list[list[dqn.Episode]]:
    """The model's own episodes: each map played for 30 episodes under evaluate.py's warm-up schedule (the model's
    greedy action with probability floor(k/2)/10, else random; greedy from episode 20), one set per map."""
    import evaluate  # here, not at the top: evaluate.py imports train.py, which imports this module
    was_training = model.training
    model.eval()
    policy = evaluate.ModelPolicy(model, fmt, adapter, context=context_len)
    out = evaluate.run_episodes(policy, [[m] for m in maps], evaluate.schedule(30), seed=seed)
    model.train(was_training)
    return [[dqn.Episode(obs, acts, [0.0] * (len(acts) - 1) + [won], trunc, ncol=len(maps[r][0]))
             for obs, acts, won, trunc in zip(out["paths"][r], out["actions"][r], out["success"][r],
                                              out["truncated"][r])] for r in range(len(maps))]


def online_round_maps(cfg: "train.TrainConfig", step: int) -> list[list[str]]:
    """The training maps the model plays in the online round at this step (a seeded draw per round)."""
    return random.Random(f"{cfg.seed}/online{step}").sample(frozenlake.train_maps(cfg.n_maps),
                                                           min(cfg.online_maps, cfg.n_maps))


def online_sets_placed(cfg: "train.TrainConfig", step: int, sets: list[list[dqn.Episode]], canvas_stage: bool):
    """The episode sets the model played in the round at `step`, as the data of the current stage: the model plays at
    the canvas origin (as evaluate.py does), so in the canvas stage each map's set moves to a random offset on the
    canvas, one per set, as the Q-learner's training sets do (load_episode_sets)."""
    if not canvas_stage:
        return sets
    rng = random.Random(f"{cfg.seed}/online{step}/canvas")
    offsets = [canvas_offset(len(m), len(m[0]), rng) for m in online_round_maps(cfg, step)]
    return [[dqn.to_canvas(ep, *at) for ep in eps] for at, eps in zip(offsets, sets)]
