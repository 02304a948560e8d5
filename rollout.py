"""Playing episodes: the paper's warm-up schedule, the harness every policy plays through, and the model's policy.

Per map, 30 episodes with the whole history as context (arXiv 2501.14176, §4.1): at every step of episode k the
policy's greedy action is taken with probability floor(k/2)/10 for k < 20 and always after, otherwise a uniform random
action. evaluate.py runs its experiments through `run_episodes`.

A policy is any object with four methods (the model's `ModelPolicy` here, the baselines in baselines.py):
  reset(n_rows)                          forget everything; rows are maps (one lake per row, all stepping together)
  add_context(row, episode)              an episode to put in the history before the first live one (stitching)
  greedy_actions(rows, maps, episodes)   its greedy action for each row's unfinished episode
  observe(row, episode, terminated, done)   called after every environment step with the updated episode
The random coin and the random action are drawn from one stream per (seed, map, episode), both at every step whatever
the coin says, so two policies that act alike see exactly the same draws.

The model's policy is defined by `RecomputePolicy`: each row's context is its history written in the training format
(built step by step from the format's pieces; dqn.tokenize_episode's text is the authority when an episode closes),
and the greedy action is the argmax of the action words' logits at its last token, the whole context run again at
every step. `ModelPolicy` takes the same actions, faster: it keeps every row in a KV cache and feeds only the new
tokens of all rows as one right-padded chunk with per-row start positions. The cache is allocated up front for every
row at the full context (plus PREFILL_ALONE positions): rows × layers × 2 × (context + 64) × n_kv_heads × head_dim ×
bytes per element.

Context overflow: when a row's context would exceed `context` tokens, its oldest whole episodes are dropped until it
fits and the row is re-prefilled; if the unfinished episode alone is too long (a looping 100-step episode), its oldest
steps are dropped too, down to 3/4 of the context. Re-prefills are counted.
"""
import collections
import random
from dataclasses import dataclass, field

import torch

import compact
import frozenlake
from dqn import Episode, tokenize_episode

PREFILL_ALONE = 64  # a row with more new tokens than this (a re-prefill) runs on its own, not padded into the batch


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


def cache_bytes(model, rows: int, context: int) -> int:
    """Bytes of the KV cache ModelPolicy allocates: rows × layers × 2 × (context + 64) × n_kv_heads × head_dim."""
    a, element = model.args, next(model.parameters()).element_size()
    return rows * a.n_layers * 2 * (context + PREFILL_ALONE) * a.n_kv_heads * a.head_dim * element


@dataclass
class RowContext:
    tokens: list = field(default_factory=list)   # the row's whole context, as it should be in the cache
    fed: int = 0                                 # leading tokens of `tokens` already in the cache (valid)
    past: collections.deque = field(default_factory=collections.deque)  # token counts of the finished episodes
    cur_start: int | None = None                 # index in tokens where the unfinished episode starts (None = none)
    step_offsets: list = field(default_factory=list)  # index of each of its steps' observation block
    first_step: int = 0                          # its step the context starts from (> 0 after an in-episode trim)


class RecomputePolicy:
    """The model's greedy action: argmax of the action words' logits at the last token (the Q position) of each row's
    context, the whole context run at every step (the definition; ModelPolicy is the same, faster)."""
    name = "model"

    def __init__(self, model, fmt, adapter=None, context=None):
        self.model, self.fmt, self.adapter = model, fmt, adapter
        # 4096 = the paper's training context; Llama 3.1's 131072 would make a 50-row cache of hundreds of GB
        self.limit = context or min(model.args.max_seq_len, 4096)
        if self.limit < 64:
            raise ValueError(f"context of {self.limit} tokens is too small to hold a step; give --context >= 64")
        self.device = next(model.parameters()).device
        self.action_ids = torch.tensor(fmt.action_ids, device=self.device)
        self.canvas = getattr(fmt, "canvas", False)

    def reset(self, n_rows):
        self.rows = [RowContext() for _ in range(n_rows)]
        self.overflows = 0                      # re-prefills caused by the context limit
        self.mismatches = 0                     # episodes whose incremental text differed from tokenize_episode's

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
        if done:
            st.tokens += fmt.episode_end(self._written(self._kept(st, episode)))  # a recap of the kept steps only
            self._close_episode(st, episode, start=st.cur_start, built=len(st.tokens) - st.cur_start)
        else:
            st.tokens += fmt.action_prompt()

    def _kept(self, st, episode):  # the episode's steps still in the context (all but after an in-episode cut)
        k = st.first_step
        return Episode(episode.observations[k:], episode.actions[k:], episode.rewards[k:], episode.truncated,
                       ncol=episode.ncol) if k else episode

    def _close_episode(self, st, episode, start, built):
        """Replace the incrementally built episode by dqn.tokenize_episode's text (the training text); normally equal,
        otherwise the cache stays valid only up to where they agree."""
        text, _ = tokenize_episode(self._written(self._kept(st, episode)), self.fmt)
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
                st.tokens += self.fmt.observation(self._state(ep, -1)) + self.fmt.action_prompt()
            if len(st.tokens) > self.limit:
                self._trim(st)
        with torch.inference_mode():
            q = self._q(rows)  # (len(rows), 4)
        self.last_q = q  # the Q-values behind these actions, for qvalues.py's check
        return q.argmax(-1).tolist()

    def _q(self, rows):  # Q at the last token of every row's whole context
        ctx = [self.rows[r].tokens for r in rows]
        tokens = torch.zeros(len(rows), max(map(len, ctx)), dtype=torch.long)
        for i, c in enumerate(ctx):
            tokens[i, :len(c)] = torch.tensor(c)
        last = torch.tensor([[len(c) - 1] for c in ctx])  # (B, 1): Q position = the last token
        return self.model(tokens.to(self.device), adapter=self.adapter, logits_at=last.to(self.device),
                          vocab_ids=self.action_ids)[:, 0]

    def _state(self, episode, t):  # the state number the format writes (the canvas tile under a canvas format)
        s = episode.observations[t]
        return compact.canvas_state(s, episode.ncol) if self.canvas else s

    def _written(self, episode):  # the episode as the format writes it (canvas tiles at the origin)
        return compact.to_canvas(episode) if self.canvas else episode

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



class ModelPolicy(RecomputePolicy):
    """RecomputePolicy's actions, faster: every row's context stays in a KV cache and each step feeds only its new
    tokens (module doc); a re-prefill after an overflow feeds the row again from its start."""

    def reset(self, n_rows):
        super().reset(n_rows)
        self.slot_of, self.row_at = {}, []      # cache rows: active maps packed into slots 0..B-1
        self.cache = None  # free the previous run's cache first: both at once would double the peak
        self.cache = self.model.new_cache(n_rows, self.limit + PREFILL_ALONE, device=self.device)

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

    def _q(self, rows):
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


def run_episodes(policy, map_sequences, probs, seed=0, context_episodes=None, max_steps=100, progress=None,
                 first_row=0):
    """Every row (map sequence) plays len(probs) episodes on each of its maps; all rows step together.

    probs[k]: the greedy probability of the k-th episode on a map (the schedule restarts on each new map).
    first_row: the index of row 0 in the whole set (its random streams), when the rows are one group of a set.
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
                rngs[r] = episode_rng(seed, first_row + r, k[r])
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
