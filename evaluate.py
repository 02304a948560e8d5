"""Evaluate an in-context RL policy on Frozen Lake the way the paper does, beside simple baselines.

Follows the evaluation of "RL + Transformer = A General-Purpose Problem Solver" (arXiv 2501.14176, REFERENCE.md §1):
per map, 30 episodes with the whole history as context; at every step of episode k the model's greedy action (argmax
over the 4 action-word logits at the Q position) is taken with probability floor(k/2)/10 for k < 20 and always after,
otherwise a uniform random action (the paper calls that probability ε). Non-slippery lakes, 100-step limit. Four
experiments: `id` (50 held-out 3-5 maps), `ood` (50 maps 6-7), `stitching` (the paper's crossing-paths map with its
two context episodes, then 5 greedy trials in one history, see below) and `nonstationary` (30 episodes, then a new
map with the context kept and the warm-up restarted, 30 more). A fifth, ours: `demo` (the id maps with one
shortest-path episode per start tile in the context, then 3 greedy episodes): does the model follow a success it is
shown? (`--experiment id --warmup 0 --episodes 3` is the same without the demonstration.)

Every policy goes through one harness (`run_episodes`) with the same maps, schedule and random stream: the model and
the baselines of baselines.py (a uniform random policy, tabular Q-learning from scratch, the context planner of
planner.py, knowing only its history, and the BFS oracle, which knows the map). A policy is any object with four
methods:
  reset(n_rows)                          forget everything; rows are maps (one lake per row, all stepping together)
  add_context(row, episode)              an episode to put in the history before the first live one (stitching)
  greedy_actions(rows, maps, episodes)   its greedy action for each row's unfinished episode
  observe(row, episode, terminated, done)   called after every environment step with the updated episode
The random coin and the random action are drawn from one stream per (seed, map, episode), both at every step whatever
the coin says, so two policies that act alike see exactly the same draws.

The model path (`ModelPolicy`) builds each row's context incrementally from dqn.TrajectoryFormat's pieces (the same text
as dqn.tokenize_episode, which is the authority when an episode closes) and keeps it in a KV cache: each step feeds only
the new tokens of every row as one right-padded chunk with per-row start positions. `recompute=True` is the slow
reference that runs the whole context of every row at every step (tests and benchmarks/bench_eval.py compare them).

KV-cache memory: the cache is allocated up front, when a run starts, for every row (one per map) at the full context
(plus PREFILL_ALONE positions of slack), whatever the histories will actually reach, so that no step ever reallocates:
  bytes = rows × layers × 2 (K and V) × (context + 64) × n_kv_heads × head_dim × bytes per element (the model dtype)
e.g. SmolLM2-135M (30 layers, 3 KV heads of 64) in fp32 with 50 rows at 4096: 50·30·2·4160·3·64·4 ≈ 9.6 GB; Llama 3.1
8B (32 layers, 8 KV heads of 128) in bf16: ≈ 27 GB. It scales linearly in both knobs: --maps N runs N rows instead of
50, --context C caps the tokens per row (more overflows and re-prefills, and the model sees less history than the
paper's 4096). `--recompute` allocates no cache but costs a whole-context forward per step.

Context overflow policy: when a row's context would exceed `context` tokens (default: the model's max_seq_len capped
at 4096, the paper's training context), its oldest whole episodes are dropped until it fits and the row is
re-prefilled; if the unfinished episode alone is too long (a looping 100-step episode), its oldest steps are dropped
too (it restarts at a step boundary with a fresh <|begin_of_text|>) down to 3/4 of the context, so that re-prefills
stay rare. Every re-prefill is counted and reported.

Usage: `python evaluate.py --run runs/cpu [--experiment all]`, or `--baselines-only` without a model. Outputs go to
OUT/<experiment>/ (OUT = --out, default <run>/eval): results.json (config, maps, per seed/map/episode success, steps,
truncation, greedy steps; model context statistics), success.csv and summary.md (per episode index: mean and 95%
interval over maps; first 2 vs last 10 episodes of each map phase and their ratio), success.png (curves with the
baselines); stitching also writes context.png and trial<k>_<policy>.png (the paths).

Stitching: the paper's stored run evaluates 5 greedy episodes after the 2 context episodes. We run the 5 trials one
after another in one row, as every other experiment runs its episodes, so trial t sees the two context episodes and
trials 0..t-1; trial 0 is exactly "the two context episodes alone". The other reading, each trial on the two context
episodes only, would add nothing: the map has a single start tile, every action is greedy and the lake is not
slippery, so all 5 trials would repeat trial 0 step for step. In one history a failed trial can inform the next,
which is the in-context learning the experiment is about; report trial 0 for the strict context-only claim.

Deliberate choices the paper does not pin down: the coin is tossed per step (not per episode); Q-learning (α 0.5,
γ 0.9, zero init, random tie-breaking) learns on every transition, greedy or random, and keeps its table across the map
switch of `nonstationary` (its analogue of keeping the context); baselines are averaged over `baseline_seeds` seeds,
the first of which is the model's own.
"""
import argparse
import collections
import csv
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field

import torch

import baselines
import dqn
import frozenlake
import llama
import planner
from dqn import Episode, tokenize_episode

EXPERIMENTS = ("id", "ood", "stitching", "nonstationary", "demo")
PREFILL_ALONE = 64  # a row with more new tokens than this (a re-prefill) runs on its own, not padded into the batch


@dataclass
class EvalConfig:
    run: str | None = None           # run dir or checkpoint dir of train.py (train.load_policy); None = baselines only
    online_weights: bool = False     # play the run's online weights even where it saved an --ema average
    experiment: str = "id"           # id | ood | stitching | nonstationary | all
    episodes: int = 30               # episodes per map (per map phase in nonstationary)
    maps: int | None = None          # use only the first N maps of the experiment's set (None = all 50)
    warmup: int = 20                 # episodes k < warmup act greedily with p = floor(k/2)/(warmup/2); 0 = all greedy
    seed: int = 0                    # seeds the coin/random-action stream, the env starts and the baselines
    baseline_seeds: int = 10         # baselines run with seeds seed .. seed+N-1 (the model with `seed` only)
    device: str = "cpu"              # torch device for the model
    context: int | None = None       # context limit in tokens (None = min(model.args.max_seq_len, 4096)); the KV
    #                                  cache is allocated up front for rows (maps) × (context + 64) tokens: see the
    #                                  module doc for its size; lower --maps or --context if it does not fit
    recompute: bool = False          # slow reference path: no KV cache, the whole context every step
    stitching_trials: int = 5        # greedy trials after the stitching context, one after another in one history
    demo_trials: int = 3             # greedy episodes after the demonstrations (demo experiment), in one history
    q_lr: float = 0.5                # tabular Q-learning step size α
    q_gamma: float = 0.9             # tabular Q-learning discount γ (the paper's DQN γ)
    planner_untried_steps: int = 8   # the planner baseline values an untried move like a goal N steps away: 0.9^N
    max_steps: int = 100             # episode step limit
    out: str | None = None           # output root; results go to OUT/<experiment>/ (default <run>/eval)
    progress: bool = True            # tqdm progress bar
    baselines_only: bool = False     # skip the model (no --run needed)


# ---------------------------------------------------------------------------------------------------------------------
# The warm-up schedule


def greedy_probability(k, warmup=20):
    """Probability that a step of episode k uses the policy's greedy action: floor(k/2)/10 for k < 20, then 1."""
    if k >= warmup:
        return 1.0
    return (k // 2) / (warmup / 2)


def schedule(n_episodes, warmup=20):
    return [greedy_probability(k, warmup) for k in range(n_episodes)]


def episode_rng(seed, row, k):
    """The shared stream of (map `row`, episode k): its start tile, then per step the coin and the random action."""
    return random.Random(f"icrl-eval/{seed}/{row}/{k}")  # str seeds hash with sha512: stable across versions


# ---------------------------------------------------------------------------------------------------------------------
# The model: histories as token contexts, kept in a KV cache


@dataclass
class RowContext:
    tokens: list = field(default_factory=list)   # the row's whole context, as it should be in the cache
    fed: int = 0                                 # leading tokens of `tokens` already in the cache (valid)
    past: collections.deque = field(default_factory=collections.deque)  # token counts of the finished episodes
    cur_start: int | None = None                 # index in tokens where the unfinished episode starts (None = none)
    step_offsets: list = field(default_factory=list)  # index of each of its steps' observation block
    first_step: int = 0                          # its step the context starts from (> 0 after an in-episode trim)
    # the finished episodes in written states: the facts tokens' source (CompactFormat.facts; kept on a trim)
    lake: planner.ContextModel = field(default_factory=planner.ContextModel)
    cur_lake: planner.ContextModel | None = None  # the same and the unfinished episode's steps so far


class ModelPolicy:
    """Greedy action = argmax of the action-word logits at the Q position of each row's context (see module doc)."""
    name = "model"

    def __init__(self, model, fmt, adapter=None, context=None, recompute=False):
        self.model, self.fmt, self.adapter, self.recompute = model, fmt, adapter, recompute
        # 4096 = the paper's training context; Llama 3.1's 131072 would make a 50-row cache of hundreds of GB
        self.limit = context or min(model.args.max_seq_len, 4096)
        if self.limit < 64:
            raise ValueError(f"context of {self.limit} tokens is too small to hold a step; give --context >= 64")
        self.device = next(model.parameters()).device
        self.action_ids = torch.tensor(fmt.action_ids, device=self.device)
        self.canvas = getattr(fmt, "canvas", False)
        self.facts = getattr(fmt, "facts", False)  # facts tokens: the rows' lakes are kept only for them

    def reset(self, n_rows):
        self.rows = [RowContext() for _ in range(n_rows)]
        self.overflows = 0                      # re-prefills caused by the context limit
        self.mismatches = 0                     # episodes whose incremental text differed from tokenize_episode's
        self.slot_of, self.row_at = {}, []      # cache rows: active maps packed into slots 0..B-1
        if not self.recompute:  # all rows at the full context, up front (module doc: KV-cache memory)
            self.cache = None  # free the previous run's cache first: both at once would double the peak
            self.cache = self.model.new_cache(n_rows, self.limit + PREFILL_ALONE, device=self.device)

    def add_context(self, row, episode):
        self._close_episode(self.rows[row], episode, start=len(self.rows[row].tokens), built=0)

    def observe(self, row, episode, terminated, done):
        # tokenize_episode's order: action word, the next observation, its reward block (if any), then either the
        # episode's end or the next action prompt
        st, fmt = self.rows[row], self.fmt
        st.tokens += fmt.action_word(episode.actions[-1])
        st.step_offsets.append(len(st.tokens))  # an in-episode cut may start the context here
        st.tokens += fmt.observation(self._state(episode, -1))
        if episode.rewards[-1] != 0:
            st.tokens += fmt.reward(episode.rewards[-1])
        if self.facts:
            st.cur_lake.learn(self._state(episode, -2), episode.actions[-1], self._state(episode, -1), terminated,
                              episode.rewards[-1])
        if done:
            st.tokens += fmt.episode_end(episode.truncated)
            self._close_episode(st, episode, start=st.cur_start, built=len(st.tokens) - st.cur_start)
        else:
            st.tokens += self._prompt(st, episode)

    def _close_episode(self, st, episode, start, built):
        """Replace the incrementally built episode by dqn.tokenize_episode's text (the training text); normally equal,
        otherwise the cache stays valid only up to where they agree."""
        k = st.first_step
        if k:
            if self.facts:  # the cut steps stay in the row's lake: the facts tokens the model read came from them too
                for t in range(k):
                    st.lake.learn(self._state(episode, t), episode.actions[t], self._state(episode, t + 1), False,
                                  episode.rewards[t])
            episode = Episode(episode.observations[k:], episode.actions[k:], episode.rewards[k:], episode.truncated,
                              ncol=episode.ncol)
        text, _ = tokenize_episode(episode, self.fmt, lake=st.lake)  # st.lake learns it (facts tokens)
        old = st.tokens[start:start + built]
        same = next((i for i, (x, y) in enumerate(zip(old, text)) if x != y), min(len(old), len(text)))
        st.fed = min(st.fed, start + same)
        self.mismatches += built > 0 and old != list(text[:built])  # incremental text differed from the training text
        st.tokens[start:] = list(text)
        st.past.append(len(text))
        st.cur_start, st.step_offsets, st.first_step = None, [], 0

    def greedy_actions(self, rows, maps, episodes):
        for row, ep in zip(rows, episodes):
            st = self.rows[row]
            if st.cur_start is None:  # a new episode: <|begin_of_text|> observation(s_0) action-prompt
                st.cur_start = len(st.tokens)
                st.tokens += self.fmt.episode_start()
                st.step_offsets = [len(st.tokens)]
                st.cur_lake = st.lake.copy() if self.facts else None
                st.tokens += self.fmt.observation(self._state(ep, -1)) + self._prompt(st, ep)
            if len(st.tokens) > self.limit:
                self._trim(st)
        with torch.inference_mode():
            q = self._q_recompute(rows) if self.recompute else self._q_cached(rows)  # (len(rows), 4)
        return q.argmax(-1).tolist()

    def _prompt(self, st, episode):  # the action prompt; a facts format writes what the context shows about the state
        facts = st.cur_lake.facts(self._state(episode, -1)) if self.facts else None
        return self.fmt.action_prompt(facts)

    def _state(self, episode, t):  # the state number the format writes (the canvas tile under a canvas format)
        s = episode.observations[t]
        return dqn.canvas_state(s, episode.ncol) if self.canvas else s

    def _trim(self, st):
        """Drop the oldest whole episodes until the context fits; if the unfinished episode alone does not fit, also
        its oldest steps, down to 3/4 of the limit. The row is then re-prefilled from scratch."""
        drop = 0
        while len(st.tokens) - drop > self.limit and st.past:
            drop += st.past.popleft()
        del st.tokens[:drop]
        st.cur_start -= drop
        st.step_offsets = [o - drop for o in st.step_offsets]
        if len(st.tokens) > self.limit:
            bos = self.fmt.episode_start()
            i = next(i for i, o in enumerate(st.step_offsets) if len(bos) + len(st.tokens) - o <= self.limit * 3 // 4
                     or i == len(st.step_offsets) - 1)
            cut = st.step_offsets[i]
            st.tokens = bos + st.tokens[cut:]
            st.step_offsets = [o - cut + len(bos) for o in st.step_offsets[i:]]
            st.first_step += i
        st.fed = 0
        self.overflows += 1

    def _q_recompute(self, rows):
        ctx = [self.rows[r].tokens for r in rows]
        tokens = torch.zeros(len(rows), max(map(len, ctx)), dtype=torch.long)
        for i, c in enumerate(ctx):
            tokens[i, :len(c)] = torch.tensor(c)
        last = torch.tensor([[len(c) - 1] for c in ctx])  # (B, 1): Q position = the last token
        return self.model(tokens.to(self.device), adapter=self.adapter, logits_at=last,
                          vocab_ids=self.action_ids)[:, 0]

    def _pack_slots(self, rows):
        """Keep the active rows in cache slots 0..B-1: a finished row's slot gets the last slot's row (one copy)."""
        active = set(rows)
        for row in [r for r in self.row_at if r not in active]:
            j, last = self.slot_of.pop(row), len(self.row_at) - 1
            moved = self.row_at.pop()
            if j != last:
                for k, v in zip(self.cache.k, self.cache.v):
                    k[j], v[j] = k[last], v[last]
                self.row_at[j], self.slot_of[moved] = moved, j
        for row in rows:
            if row not in self.slot_of:
                self.slot_of[row] = len(self.row_at)
                self.row_at.append(row)

    def _q_cached(self, rows):
        cache = self.cache
        self._pack_slots(rows)
        B = len(self.row_at)
        q = torch.empty(B, 4, device=self.device)
        new = [self.rows[r].tokens[self.rows[r].fed:] for r in self.row_at]
        for j, row in enumerate(self.row_at):
            if len(new[j]) > PREFILL_ALONE:  # a (re-)prefill: this row alone, through a view of its cache slot
                view = type(cache)([k[j:j + 1] for k in cache.k], [v[j:j + 1] for v in cache.v])
                q[j] = self._forward([new[j]], [self.rows[row].fed], view)[0]
                self.rows[row].fed, new[j] = len(self.rows[row].tokens), []
        batch = [j for j in range(B) if new[j]]
        if batch:
            # padded junk lands beyond each row's true length (a row fed alone pads from its end): never attended
            out = self._forward(new, [self.rows[r].fed for r in self.row_at], cache)
            q[batch] = out[batch]
            for j in batch:
                self.rows[self.row_at[j]].fed += len(new[j])
        slot = torch.tensor([self.slot_of[r] for r in rows], device=self.device)
        return q[slot]

    def _forward(self, chunks, start, cache):
        """Right-padded chunks (B, T) at per-row positions `start`; Q at each chunk's last real token -> (B, 4)."""
        tokens = torch.zeros(len(chunks), max(1, max(map(len, chunks))), dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        last = torch.tensor([[max(len(c) - 1, 0)] for c in chunks])
        return self.model(tokens.to(self.device), start_pos=torch.tensor(start), cache=cache, adapter=self.adapter,
                          logits_at=last.to(self.device), vocab_ids=self.action_ids)[:, 0]


# ---------------------------------------------------------------------------------------------------------------------
# The harness


def run_episodes(policy, map_sequences, probs, seed=0, context_episodes=None, max_steps=100, progress=None):
    """Every row (map sequence) plays len(probs) episodes on each of its maps; all rows step together.

    probs[k]: the greedy probability of the k-th episode on a map (the schedule restarts on each new map).
    Returns per row and episode: success (reward of the episode), steps, truncated, greedy steps, visited states
    (paths) and actions."""
    n, per_map = len(map_sequences), len(probs)
    total = per_map * len(map_sequences[0])
    envs = [[frozenlake.FrozenLake(desc, max_steps=max_steps) for desc in seq] for seq in map_sequences]
    out = {key: [[] for _ in range(n)] for key in ("success", "steps", "truncated", "greedy_steps", "paths", "actions")}
    policy.reset(n)
    for row, episodes in (context_episodes or {}).items():
        for ep in episodes:
            policy.add_context(row, ep)
    k, live, rngs, greedy_count = [0] * n, [None] * n, [None] * n, [0] * n
    while True:
        rows = [r for r in range(n) if k[r] < total]
        if not rows:
            return out
        for r in rows:
            if live[r] is None:  # a new episode: its own stream draws the start tile, then coins and random actions
                rngs[r] = episode_rng(seed, r, k[r])
                obs, _ = envs[r][k[r] // per_map].reset(seed=int(rngs[r].random() * 2 ** 31))
                live[r], greedy_count[r] = Episode([obs], [], [], False, ncol=envs[r][k[r] // per_map].ncol), 0
        maps = [map_sequences[r][k[r] // per_map] for r in rows]
        greedy = policy.greedy_actions(rows, maps, [live[r] for r in rows])
        for r, a_greedy in zip(rows, greedy):
            coin, a_random = rngs[r].random(), int(rngs[r].random() * 4)  # both drawn at every step
            use_greedy = coin < probs[k[r] % per_map]
            action = a_greedy if use_greedy else a_random
            greedy_count[r] += use_greedy
            obs, reward, terminated, truncated, _ = envs[r][k[r] // per_map].step(action)
            ep = live[r]
            ep.observations.append(obs)
            ep.actions.append(action)
            ep.rewards.append(float(reward))
            done = terminated or truncated
            ep.truncated = truncated and not terminated  # the 100th step may also reach a goal or a hole
            policy.observe(r, ep, terminated, done)
            if done:
                for key, value in (("success", float(reward)), ("steps", len(ep.actions)),
                                   ("truncated", ep.truncated), ("greedy_steps", greedy_count[r]),
                                   ("paths", ep.observations), ("actions", ep.actions)):
                    out[key][r].append(value)
                k[r], live[r] = k[r] + 1, None
                if progress is not None:
                    progress.update(1)


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
    llama.atomic_write(path, write_file)


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
    return summaries


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
    """Bad settings -> ValueError naming the setting and the fix."""
    if cfg.experiment not in EXPERIMENTS + ("all",):
        raise ValueError(f"unknown experiment {cfg.experiment!r}; choose one of {EXPERIMENTS + ('all',)}")
    for name in ("episodes", "baseline_seeds", "stitching_trials", "demo_trials", "max_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.maps is not None and cfg.maps < 1:
        raise ValueError(f"--maps must be at least 1 (or left out for all 50), got {cfg.maps}")
    if cfg.warmup < 0 or cfg.warmup % 2:
        raise ValueError(f"--warmup must be a non-negative even number (p steps up every 2 episodes), got {cfg.warmup}")
    if cfg.planner_untried_steps < 0:
        raise ValueError(f"--planner-untried-steps is a number of steps (the untried value is 0.9^N), got "
                         f"{cfg.planner_untried_steps}")
    if cfg.run is None and not cfg.baselines_only and not model_given:
        raise ValueError("give --run RUN_DIR (a train.py output dir or checkpoint dir) or --baselines-only")


def evaluate(cfg, policy_model=None):
    """Run cfg.experiment (or all) and write the outputs; returns {experiment: {policy: summary}}.
    `policy_model`: an already built ModelPolicy (tests); otherwise loaded with train.load_policy(cfg.run)."""
    from tqdm import tqdm
    check_config(cfg, model_given=policy_model is not None)
    names = EXPERIMENTS if cfg.experiment == "all" else (cfg.experiment,)
    n_train_maps = 250  # the paper's training maps, unless the run was trained on more
    if policy_model is None and not cfg.baselines_only:
        import train
        n_train_maps = max(n_train_maps, train.saved_config(train.checkpoint_dir(cfg.run)).n_maps)
        model, adapter, _, fmt = train.load_policy(cfg.run, device=cfg.device, averaged=not cfg.online_weights)
        model.eval()
        policy_model = ModelPolicy(model, fmt, adapter, context=cfg.context, recompute=cfg.recompute)
    out_root = cfg.out or (os.path.join(cfg.run, "eval") if cfg.run else os.path.join("runs", "baselines", "eval"))
    report = {}
    for name in names:
        setup = experiment_setup(name, cfg, n_train_maps)
        map_sequences, probs, context = setup
        seeds = [cfg.seed + i for i in range(cfg.baseline_seeds)]
        jobs = [("model", lambda seed: policy_model, [cfg.seed])] if policy_model is not None else []
        untried = 0.9 ** cfg.planner_untried_steps
        jobs += [("random", baselines.RandomPolicy, seeds),
                 ("q-learning", lambda s: baselines.QLearningPolicy(cfg.q_lr, cfg.q_gamma, s), seeds),
                 ("planner", lambda s: baselines.PlannerPolicy(untried=untried, seed=s), seeds),
                 ("oracle", lambda seed: baselines.OraclePolicy(), seeds)]
        total = sum(len(s) for _, _, s in jobs) * len(map_sequences) * len(probs) * len(map_sequences[0])
        results, model_stats = {}, {}
        with tqdm(total=total, desc=name, unit="episode", disable=not cfg.progress) as bar:
            for pname, make, job_seeds in jobs:
                runs = []
                for seed in job_seeds:
                    bar.set_postfix(policy=pname, seed=seed)
                    runs.append(run_episodes(make(seed), map_sequences, probs, seed, context, cfg.max_steps, bar))
                results[pname] = {k: [r[k] for r in runs] for k in runs[0]}
        if policy_model is not None:
            model_stats = {"context": policy_model.limit, "context_overflows": policy_model.overflows,
                           "text_mismatches": policy_model.mismatches}
        report[name] = write_outputs(os.path.join(out_root, name), name, cfg, setup, results, model_stats)
        for p, summary in report[name].items():
            for i, s in enumerate(summary["phases"]):
                print(f"{name:14s} {p:11s} map {i + 1}: first-2 {s['first2']:.3f}  last-10 {s['last10']:.3f}  "
                      f"ratio {'-' if s['ratio'] is None else round(s['ratio'], 2)}")
        if model_stats:
            print(f"{name:14s} model: {model_stats['context_overflows']} context overflows (re-prefills) in "
                  f"{model_stats['context']} tokens")
            if model_stats["text_mismatches"]:
                print(f"warning: {model_stats['text_mismatches']} episodes were built differently from "
                      f"dqn.tokenize_episode (fixed up, but the incremental builder is out of date)")
        print(f"wrote {os.path.join(out_root, name)}/")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = EvalConfig()
    p.add_argument("--run", default=d.run, help="train.py run dir (latest checkpoint) or a checkpoint dir")
    p.add_argument("--online-weights", action="store_true",
                   help="play the run's online weights, not the --ema average its checkpoint saved (if any)")
    p.add_argument("--experiment", default=d.experiment, choices=EXPERIMENTS + ("all",))
    p.add_argument("--episodes", type=int, default=d.episodes, help="episodes per map (per map phase)")
    p.add_argument("--maps", type=int, default=d.maps,
                   help="use only the first N maps of the set (one KV-cache row each: fewer maps, less memory)")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="episodes with p(greedy) = floor(k/2)/(warmup/2) before always greedy (0 = always greedy)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the random stream, starts and baselines")
    p.add_argument("--baseline-seeds", type=int, default=d.baseline_seeds, help="seeds averaged for the baselines")
    p.add_argument("--device", default=d.device, help="torch device of the model (cpu, cuda, ...)")
    p.add_argument("--context", type=int, default=d.context,
                   help="context limit in tokens (default: the model's max_seq_len, at most 4096). The KV cache is "
                        "allocated up front: maps x layers x 2 x (context+64) x n_kv_heads x head_dim x dtype bytes, "
                        "e.g. about 9.6 GB for SmolLM2-135M in fp32 with 50 maps at 4096; lower --maps or --context "
                        "to shrink it")
    p.add_argument("--recompute", action="store_true", help="slow reference path without KV cache")
    p.add_argument("--stitching-trials", type=int, default=d.stitching_trials,
                   help="greedy trials after the context, one after another (trial t sees trials 0..t-1)")
    p.add_argument("--demo-trials", type=int, default=d.demo_trials,
                   help="demo experiment: greedy episodes after the shortest-path demonstrations, in one history")
    p.add_argument("--q-lr", type=float, default=d.q_lr, help="Q-learning baseline step size")
    p.add_argument("--q-gamma", type=float, default=d.q_gamma, help="Q-learning baseline discount")
    p.add_argument("--planner-untried-steps", type=int, default=d.planner_untried_steps,
                   help="planner baseline: an untried move is worth a goal N steps away (0.9^N; train.py's default 8)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="episode step limit")
    p.add_argument("--out", default=d.out, help="output root (results in OUT/<experiment>/; default RUN/eval)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--baselines-only", action="store_true", help="run only random, Q-learning, planner and oracle")
    cfg = EvalConfig(**vars(p.parse_args(argv)))
    try:
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg

if __name__ == "__main__":
    evaluate(parse_args())
