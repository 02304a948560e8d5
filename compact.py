"""The cpu preset's deviations on the paper's input and loss, for a small model trained from scratch.

The paper writes each step as Llama 3 chat blocks (dqn.TrajectoryFormat, ≈ 100 tokens per episode). The compact
format writes one token per observation, action and outcome (≈ 31 tokens per episode), and with `recap` after each
finished episode a hindsight recap: one token per distinct (state, action), tagged goal / hole / wall / other
(recap_steps), computed from that episode alone. Under causal attention a step cannot see how its own episode ended;
the recap puts the outcome one lookup away. With `canvas` (to_canvas), tile (row, col) is state row·8 + col on every
map, so larger maps meet trained tokens. With `--compose` the model embeds a tile from its row and column, a recap
token also from its action and tag (ComposedEmbedding). Nothing computed across episodes enters the input.

Two auxiliary training targets (never inputs) ask the model for the lookups its Q-values need: the next token
(next_token_loss) and what the context shows about each move of the state (facts_loss).
"""
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import dqn
import frozenlake
import llama_tokenizer
import planner

RECAP_TAGS = ("goal", "hole", "wall", "other")  # priority order when one (s, a) gets several tags in an episode
FACTS = ("untried", "dead_end", "open")  # what a context shows about a move (planner.ContextModel.facts: 0, 1, 2)
COMPACT_SPECIALS = ([f"<|obs_{s}|>" for s in range(64)] + [f"<|act_{w}|>" for w in dqn.ACTION_WORDS]
                    + ["<|goal|>", "<|truncated|>"]
                    + [f"<|recap_{s}_{w}_{tag}|>" for s in range(64) for w in dqn.ACTION_WORDS for tag in RECAP_TAGS]
                    + [f"<|fact_{w}_{f}|>" for w in dqn.ACTION_WORDS for f in FACTS]  # output rows, never input
                    + [f"<|row_{r}|>" for r in range(8)] + [f"<|col_{c}|>" for c in range(8)]
                    + [f"<|tag_{tag}|>" for tag in RECAP_TAGS])  # embedding parts (ComposedEmbedding), never input


def recap_steps(ep: dqn.Episode) -> list[tuple[int, int, str]]:
    """Hindsight summary of a finished episode: each distinct (s, a) once, in order of its last occurrence, tagged
    goal (the action at the last visit of s in an episode that reached a goal: together, a loop-free path to it),
    hole (the step fell into a hole), wall (the step did not move) or other."""
    n = len(ep.actions)
    success = not ep.truncated and sum(ep.rewards) > 0
    last_visit = {s: t for t, s in enumerate(ep.observations[:n])}
    tags = {}
    for t, (s, a, s_next) in enumerate(zip(ep.observations, ep.actions, ep.observations[1:])):
        if t == n - 1 and not ep.truncated and not success:
            tag = "hole"
        elif s_next == s:
            tag = "wall"
        elif success and last_visit[s] == t:
            tag = "goal"
        else:
            tag = "other"
        old = tags.pop((s, a), tag)  # re-inserted: dict order = order of last occurrence
        tags[(s, a)] = min(old, tag, key=RECAP_TAGS.index)
    return [(s, a, tag) for (s, a), tag in tags.items()]


@dataclass
class CompactFormat:
    """<|begin_of_text|> <|obs_8|> <|act_right|> <|obs_9|> ... <|obs_15|> <|goal|> <|end_of_text|> recap...

    Q position: the observation token. <|goal|> follows a rewarded step, <|truncated|> an episode cut by the step
    limit; a hole is the last observation with neither. The recap is one token <|recap_S_W_TAG|> per distinct (s, a)
    (recap_steps): the episode's outcome one attention lookup away. Episodes come with states as written (with
    `canvas`, to_canvas: data.py places the training sets, rollout.py the played episodes)."""
    ids: dict                                   # special-token name -> id
    style: str = "compact"
    recap: bool = True                          # a recap after each finished episode
    canvas: bool = False                        # states are tiles of the 8 x 8 canvas (to_canvas)
    action_ids: list[int] = field(default_factory=list)
    bos: list[int] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.action_ids = [self.ids[f"<|act_{w}|>"] for w in dqn.ACTION_WORDS]
        self.bos, self.eos = [self.ids["<|begin_of_text|>"]], [self.ids["<|end_of_text|>"]]

    def _id(self, name: str) -> int:
        if name not in self.ids:
            raise ValueError(f"{name} is not in the compact vocabulary (observations 0..63: maps up to 8x8)")
        return self.ids[name]

    def episode_start(self) -> list[int]:
        return list(self.bos)

    def observation(self, obs: int) -> list[int]:
        return [self._id(f"<|obs_{int(obs)}|>")]

    def action_prompt(self) -> list[int]:  # nothing: the observation token is the Q position
        return []

    def action_word(self, a: int) -> list[int]:
        return [self.action_ids[a]]

    def reward(self, r: float) -> list[int]:  # Frozen Lake's only non-zero reward is the goal's 1
        return [self.ids["<|goal|>"]]

    def episode_end(self, ep: dqn.Episode) -> list[int]:
        end = ([self.ids["<|truncated|>"]] if ep.truncated else []) + self.eos
        return end + ([self._id(f"<|recap_{s}_{dqn.ACTION_WORDS[a]}_{tag}|>") for s, a, tag in recap_steps(ep)]
                      if self.recap else [])


def small_tokenizer(fmt: str = "paper") -> llama_tokenizer.Tokenizer:
    """Bytes plus merges that make every text piece of the format (dqn.FORMAT_TEXTS) one token, and the Llama 3
    special-token names; "compact" adds COMPACT_SPECIALS. So `--format paper` writes the paper's text."""
    ranks = {bytes([b]): b for b in range(256)}
    for text in dqn.FORMAT_TEXTS:
        for k in range(2, len(text) + 1):
            ranks.setdefault(text[:k].encode(), len(ranks))
    specials = llama_tokenizer.LLAMA3_SPECIALS + (COMPACT_SPECIALS if fmt == "compact" else [])
    return llama_tokenizer.Tokenizer.from_ranks(ranks, llama_tokenizer.LLAMA3_PATTERN, specials)


CANVAS = 8  # the canvas is 8 x 8: the largest map the 64 state tokens hold


def canvas_state(s: int, ncol: int | None, row_offset: int = 0, col_offset: int = 0) -> int:
    """A map's state row·ncol + col as the canvas tile (row + row_offset)·8 + (col + col_offset)."""
    if ncol is None:
        raise ValueError("a canvas format needs each episode's map width: set dqn.Episode.ncol = len(desc[0])")
    row, col = divmod(s, ncol)
    if row + row_offset >= CANVAS or col_offset + ncol > CANVAS:
        raise ValueError(f"a map of width {ncol} at offset ({row_offset}, {col_offset}) leaves the 8x8 canvas")
    return (row + row_offset) * CANVAS + col + col_offset


def to_canvas(ep: dqn.Episode, row_offset: int = 0, col_offset: int = 0) -> dqn.Episode:
    """The episode with its states written as canvas tiles (ep.ncol = its map's width), then ncol = 8. Our option for
    the compact format, not the paper's: "down" is +8 on every map and a map placed at random offsets in training
    uses all 64 state tokens, so maps wider than the training ones (the ood set) only meet tokens it has learned."""
    states = [canvas_state(s, ep.ncol, row_offset, col_offset) for s in ep.observations]
    return dqn.Episode(states, ep.actions, ep.rewards, ep.truncated, CANVAS)


EMBEDDING_PARTS = ([f"<|row_{r}|>" for r in range(CANVAS)] + [f"<|col_{c}|>" for c in range(CANVAS)]
                   + [f"<|act_{w}|>" for w in dqn.ACTION_WORDS] + [f"<|tag_{tag}|>" for tag in RECAP_TAGS])


def embedding_parts(ids: dict) -> dict[int, list[str]]:
    """{composed token id: its parts}: a tile's token is made of its row and column, a recap token of its tile's row
    and column, the action and the tag."""
    parts = {}
    for s in range(64):
        tile = [f"<|row_{s // CANVAS}|>", f"<|col_{s % CANVAS}|>"]
        parts[ids[f"<|obs_{s}|>"]] = tile
        for w in dqn.ACTION_WORDS:
            for tag in RECAP_TAGS:
                parts[ids[f"<|recap_{s}_{w}_{tag}|>"]] = tile + [f"<|act_{w}|>", f"<|tag_{tag}|>"]
    return parts


class ComposedEmbedding(torch.nn.Embedding):
    """The cpu model's token embedding: a compact token's vector is its own plus its parts' (embedding_parts), so a
    tile never seen in training still shares its row's and column's vectors with tiles that were."""

    def __init__(self, embedding: torch.nn.Embedding, ids: dict):
        super().__init__(*embedding.weight.shape, _weight=embedding.weight.data)
        parts = embedding_parts(ids)
        mix = torch.tensor([[float(p in parts[i]) for p in EMBEDDING_PARTS] for i in parts])  # (composed, parts)
        # buffers, not saved: the saved weights are the raw table. A 0/1 matmul, not a scatter: deterministic.
        self.register_buffer("composed", torch.tensor(list(parts)), persistent=False)
        self.register_buffer("parts", torch.tensor([ids[p] for p in EMBEDDING_PARTS]), persistent=False)
        self.register_buffer("mix", mix, persistent=False)

    def forward(self, tokens):
        added = self.mix @ self.weight[self.parts]                       # (composed, dim): e(row) + e(col), ...
        table = self.weight.index_add(0, self.composed, added)          # (V, dim): e(obs) = e + e(row) + e(col)
        return F.embedding(tokens, table)


# ---------------------------------------------------------------------------------------------------------------------
# The auxiliary targets: predictions the model must make from its context (never inputs)


def next_token_loss(logits, batch) -> torch.Tensor:
    """Our auxiliary loss (not the paper's): cross-entropy of the next token at every position except the Q positions,
    (B, T, V) -> (). It asks the model to predict the next observation from (state, action), the hole or goal that
    ends an episode, and the recap: all of them answered by looking up earlier steps of the same map in the context,
    the lookup the Q-values need, with a dense signal instead of one regression target per action."""
    mask = batch["lm_mask"][:, :-1].to(logits.device)                                      # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["tokens"][:, 1:].flatten().to(logits.device),
                          reduction="none").view(mask.shape)                               # (B, T-1)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def context_facts(tokens: list[int], ids: dict) -> list[list[int]]:
    """For each action token of a compact slice, what the context before it shows about its state's 4 moves
    (planner.ContextModel.facts: 0 untried, 1 dead end, 2 open), replayed from the tokens alone: the slice's earlier
    episodes and the earlier steps of this one. A step is learned when the next token shows how it ended."""
    obs = {ids[f"<|obs_{s}|>"]: s for s in range(64)}
    act = {ids[f"<|act_{w}|>"]: a for a, w in enumerate(dqn.ACTION_WORDS)}
    goal = ids["<|goal|>"]
    lake, out, s, a, step = planner.ContextModel(), [], None, None, None
    for t in tokens:
        if step is not None and t not in obs:  # the step (s, a, s') ended its episode unless an action follows
            ended = t != ids["<|truncated|>"] and t not in act
            lake.learn(*step, ended, 1.0 if t == goal else 0.0)
            step = None
        if t in act:
            out.append(lake.facts(s))
            a = act[t]
        elif t in obs:
            step, s, a = ((s, a, obs[t]) if a is not None else None), obs[t], None
        else:
            a = None
    return out


def facts_targets(slices, ids: dict) -> torch.Tensor:
    """(B, P, 4) facts of every action slot of a collated batch (padded slots 0: masked out by batch["mask"])."""
    facts = [context_facts(s.tokens, ids) for s in slices]
    out = torch.zeros(len(slices), max(1, max(map(len, facts))), 4, dtype=torch.long)
    for b, f in enumerate(facts):
        if f:
            out[b, :len(f)] = torch.tensor(f)
    return out


def facts_loss(logits, batch, ids: dict) -> torch.Tensor:
    """Our auxiliary target: cross-entropy of the context's facts about each of the 4 moves, read off 12 rows of the
    LM head at the Q positions (<|fact_W_F|>; 3 per move), (B, T, V) -> (). The model must infer from its context
    what an earlier version of this format wrote into its input."""
    rows = torch.tensor([ids[f"<|fact_{w}_{f}|>"] for w in dqn.ACTION_WORDS for f in FACTS], device=logits.device)
    at = batch["q_positions"].to(logits.device)                                             # (B, P)
    x = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))[..., rows]         # (B, P, 12)
    x = x.float().unflatten(-1, (4, len(FACTS)))                                            # (B, P, 4, 3)
    nll = F.cross_entropy(x.flatten(0, 2), batch["facts"].to(logits.device).flatten(),
                          reduction="none").view(at.shape + (4,)).mean(-1)                # (B, P)
    mask = batch["mask"].to(logits.device).float()
    return (nll * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------------
# What the model reads: `python compact.py`

EXAMPLE_MAP = ["SFF", "HHF", "FFG"]  # start 0, goal 8
EXAMPLE_ACTIONS = (2, 2, 1, 1)      # right, right, down, down: 0 → 1 → 2 → 5 → 8, the goal


def main():
    """Print one short episode as the model reads it, in the paper's text and in the cpu preset's compact format:
    every token (position, id, text), the Q positions, the action taken at each and its Eq. 6 target."""
    gamma, scale = 0.9, 30.0  # train.py's --gamma and --reward-scale
    env = frozenlake.FrozenLake(EXAMPLE_MAP)
    ep = dqn.Episode([env.reset(seed=0)[0]], [], [], ncol=env.ncol)
    for a in EXAMPLE_ACTIONS:
        s, r, _, _, _ = env.step(a)
        ep.observations.append(s), ep.actions.append(a), ep.rewards.append(r)
    steps = " ".join(f"-{dqn.ACTION_WORDS[a]}-> {s}" for a, s in zip(ep.actions, ep.observations[1:]))
    print(f"One episode on the lake {' / '.join(EXAMPLE_MAP)} (states row·3 + col): {ep.observations[0]} {steps} "
          f"(goal, R = {sum(ep.rewards):g}).\nγ = {gamma}; θ: the online network, φ: the target network.")
    paper, small = small_tokenizer("paper"), small_tokenizer("compact")
    for title, tok, fmt, written in (
            ("The paper's text (TrajectoryFormat, the cpu preset's vocabulary)", paper,
             dqn.TrajectoryFormat.for_tokenizer(paper), ep),
            ("The compact format (CompactFormat as the cpu preset writes it: tile (r, c) is state r·8 + c)",
             small, CompactFormat(small.special_tokens, canvas=True), to_canvas(ep))):
        sl = dqn.pack_slices([[written]], fmt, 4096, random.Random(0))[0]
        zeros = torch.zeros(1, len(sl.actions), 4)  # no model: only the final targets (30·R) are numbers
        y = dqn.bellman_targets(zeros, zeros, dqn.collate([sl], pad_id=0), gamma, scale)[0]
        print(f"\n{title}: {len(sl.tokens)} tokens. Q_θ(h_t, a) = the LM head's logits of ids {fmt.action_ids} "
              f"({', '.join(dqn.ACTION_WORDS)}) at the Q position of a_t; h_t = the tokens up to it.")
        print("  pos      id  token")
        q_at = {p: t for t, p in enumerate(sl.q_positions)}
        for pos, i in enumerate(sl.tokens):
            note, t = "", q_at.get(pos)
            if t is not None and sl.is_last[t]:  # Eq. 6, the episode's last action
                note = f"y_{t} = {scale:g}·R = {scale:g}·{sl.rewards[t]:g} = {y[t].item():g}"
            elif t is not None:  # Eq. 6, bootstrapped from the same episode's next Q position
                nxt = sl.q_positions[sl.next_index[t]]
                note = f"y_{t} = {gamma}·Q_φ(h_{t + 1}, argmax_a Q_θ(h_{t + 1}, a)), h_{t + 1} = tokens 0..{nxt}"
            if t is not None:
                note = f"<- Q position, a_{t} = {dqn.ACTION_WORDS[sl.actions[t]]}: {note}"
            print(f"  {pos:3d} {i:7d}  {tok.decode([i]):<22s}{note}".rstrip())


if __name__ == "__main__":
    main()
