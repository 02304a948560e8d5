"""The offline data of the paper (§3.2): learning histories of a tabular RL agent on Frozen Lake.

On every training map a tabular Q-learner with ε-greedy exploration (ε linear from 1 to 0.05) runs from scratch; its
episodes, from early failures to later successes, are the data. Sets of 20-40 episodes of one map are drawn with the
paper's quality weighting (hi: successes 5x more likely, low: failures 5x, mid: uniform) and shuffled; train.py packs
them into context slices (dqn.pack_slices). A data set is generated once per data config and cached on disk beside a
manifest (the generating config, its hash and the data's checksum): a changed config or a corrupted file regenerates.

Where it differs from the paper: its "traditional RL algorithm" is unpublished, we use tabular Q-learning (2 runs of
60 episodes per map); the held-out TD loss reads data generated the same way on frozenlake.test_maps(); with the
canvas (cpu preset) each training set sits at a random offset on the 8x8 canvas (held-out sets at the origin, where
evaluate.py plays), so larger maps meet trained state tokens.
"""
import functools
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import checkpoint
import compact
import dqn
import frozenlake

DATA_VERSION = 1  # bump when the generator changes: every cached data set is then regenerated


# ---------------------------------------------------------------------------------------------------------------------
# The learner: tabular Q-learning from scratch on one map.

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


# ---------------------------------------------------------------------------------------------------------------------
# A data set: every map's learning runs, then sets of 20-40 episodes of one map drawn with the quality weighting.

def quality_weight(ep: dqn.Episode, quality: str) -> float:
    success = sum(ep.rewards) > 0
    return {"hi": 5.0 if success else 1.0, "low": 1.0 if success else 5.0, "mid": 1.0}[quality]


def sample_set(weights: list[float], n: int, rng: random.Random) -> list[int]:
    """n distinct indices, each draw proportional to its weight among those left (Efraimidis-Spirakis keys u^(1/w))."""
    keys = [rng.random() ** (1.0 / w) for w in weights]
    return sorted(range(len(weights)), key=lambda i: -keys[i])[:n]


# The learner's settings: 2 runs of 60 episodes per map (each distinct episode is drawn into ~14 sets of the paper
# preset's 58 per map), Q-learning step size 0.5, discount 0.95; sets of 20-40 episodes (the paper's).
LEARNER = {"qlearn_runs": 2, "qlearn_episodes": 60, "qlearn_lr": 0.5, "qlearn_gamma": 0.95, "set_min": 20,
           "set_max": 40, "data_seed": 0}


def data_config(cfg, split: str) -> dict:
    maps = frozenlake.train_maps(cfg.n_maps) if split == "train" else frozenlake.test_maps()
    return {"version": DATA_VERSION, "split": split, "maps": maps, "learner": "qlearning", **LEARNER,
            "sets_per_map": cfg.sets_per_map if split == "train" else 1,
            "quality": cfg.quality}


def generate_data(dc: dict) -> dict:
    """{"episodes": [map][run][episode] as [obs, actions, rewards, truncated], "sets": [[map, run, [episode...]]]}."""
    episodes = []
    for m, desc in enumerate(dc["maps"]):
        runs = []
        for r in range(dc["qlearn_runs"]):
            rng = random.Random(f"{dc['data_seed']}/{dc['split']}/{m}/{r}")  # str seeds are stable across versions
            eps = q_learning_episodes(desc, dc["qlearn_episodes"], dc["qlearn_lr"], dc["qlearn_gamma"], rng)
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

def load_episode_sets(cfg, split: str, canvas_origin=False) -> list[list[dqn.Episode]]:
    """The episode sets of a split, generated once per data config into data_dir/<split>-<hash>/ (data, then the
    manifest, each written atomically; a dir without a matching manifest is regenerated). With cfg.canvas the
    training sets sit at random canvas offsets, or all at the origin (canvas_origin: the curriculum's first stage)."""
    dc = data_config(cfg, split)
    digest = hashlib.sha256(json.dumps(dc, sort_keys=True).encode()).hexdigest()
    where = Path(cfg.data_dir) / f"{split}-{digest[:12]}"
    manifest_file, data_file = where / "manifest.json", where / "episodes.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    text = data_file.read_text() if manifest.get("hash") == digest and data_file.is_file() else None
    if text is None or hashlib.sha256(text.encode()).hexdigest() != manifest.get("data_sha256"):
        text = json.dumps(generate_data(dc), separators=(",", ":"))
        checkpoint.atomic_write_text(data_file, text)
        manifest = {"hash": digest, "config": dc, "data_sha256": hashlib.sha256(text.encode()).hexdigest(),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        checkpoint.atomic_write_text(manifest_file, json.dumps(manifest, indent=1))
    data = json.loads(text)
    sets = [[dqn.Episode(*data["episodes"][m][r][i]) for i in chosen] for m, r, chosen in data["sets"]]
    for (m, _, _), episodes in zip(data["sets"], sets):
        for ep in episodes:
            ep.ncol = len(dc["maps"][m][0])
    if cfg.canvas:  # training sets at a random place on the canvas, held-out ones at (0, 0) like the evaluation
        rng = random.Random(f"{cfg.seed}/canvas")
        for i, (m, _, _) in enumerate(data["sets"]):
            rows, cols = len(dc["maps"][m]), len(dc["maps"][m][0])
            offset = (0, 0) if split != "train" or canvas_origin else canvas_offset(rows, cols, rng)
            sets[i] = [compact.to_canvas(ep, *offset) for ep in sets[i]]
    return sets


def canvas_offset(rows: int, cols: int, rng: random.Random) -> tuple[int, int]:
    """A random (row, col) offset that keeps a rows x cols map on the 8x8 canvas."""
    return int(rng.random() * (compact.CANVAS - rows + 1)), int(rng.random() * (compact.CANVAS - cols + 1))


# ---------------------------------------------------------------------------------------------------------------------
# A run's slices: both canvas stages packed once, and the order a run reads them


@dataclass
class Slices:
    """The packed training slices of both canvas stages and this rank's held-out slices."""
    train: list            # every set at a random canvas offset (or no canvas)
    first_stage: list      # the canvas curriculum's first stage: every set at the canvas origin (else = train)
    canvas_start: int      # the first step of the second stage (0: one stage)
    heldout: list
    total_steps: int

    def of_step(self, cfg, step: int) -> list:
        """The step's slices: the global order is a fresh seeded permutation of the stage's slices per epoch."""
        pool = self.first_stage if step < self.canvas_start else self.train
        return [pool[epoch_order(cfg.seed, epoch, len(pool))[i]]
                for epoch, i in (divmod(g, len(pool)) for g in range(step * cfg.slices_per_step,
                                                                     (step + 1) * cfg.slices_per_step))]


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}/epoch{epoch}").shuffle(order)
    return order


def pack_data(cfg, fmt, rank: int, world: int) -> Slices:
    """train.py's slices (dqn.pack_slices of the cached sets) and the run's length in steps."""
    pack = lambda sets: dqn.pack_slices(sets, fmt, cfg.context_len, random.Random(cfg.seed))  # noqa: E731
    train = pack(load_episode_sets(cfg, "train"))
    heldout = pack(load_episode_sets(cfg, "heldout"))[:cfg.eval_slices][rank::world]  # sets at the origin
    total = cfg.steps or max(1, int(cfg.epochs * len(train) // cfg.slices_per_step))
    canvas_start = min(round(cfg.canvas_from * total), total - 1) if cfg.canvas and cfg.canvas_from else 0
    first = pack(load_episode_sets(cfg, "train", canvas_origin=True)) if canvas_start else train
    return Slices(train, first, canvas_start, heldout, total)
