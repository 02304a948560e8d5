"""In-context RL as deep Q-learning on token sequences: the trajectory format, packing, and the double-DQN objective.

Follows "RL + Transformer = A General-Purpose Problem Solver" (arXiv 2501.14176, §3.1-3.3). Episodes of Frozen
Lake are written as text in Llama 3's chat blocks, many episodes of one map in one context; the language model's
logit of an action word, read at the token that predicts it, is Q(h, a) for the history h up to that token. No value
head. The model is trained with double DQN on those logits:

    Eq. 6   y_t = γ · Q_φ(h_{t+1}, argmax_a Q_θ(h_{t+1}, a))      a non-final action of an episode (h_{t+1}: the
                                                                  history up to the next action of the same episode)
            y_t = reward_scale · R                                 the last action of an episode (R: episode reward;
                                                                  a truncated episode is terminal with R = 0)
    Eq. 7   L(θ) = mean_t (Q_θ(h_t, a_t) − y_t)²                   over the action positions of a batch
    Eq. 8   φ ← α·θ + (1−α)·φ                                      after every optimizer step (α = 0.1)

θ are the online parameters (the IA3 vectors, or all weights of a model trained from scratch), φ the target copy.
The targets carry no gradient. γ = 0.9 and reward_scale = 30 put the targets on the scale of LLaMA's logits.

The text format (Llama 3 tokenizers), one episode:

    <|begin_of_text|>
    <|start_header_id|>observation<|end_header_id|>8<|eot_id|>            s_0 = row * ncol + col
    <|start_header_id|>action<|end_header_id|>right<|eot_id|>             a_0 (Q position: the <|end_header_id|>)
    <|start_header_id|>observation<|end_header_id|>9<|eot_id|>            s_1
    ...                                                                   one action + observation pair per step
    <|start_header_id|>reward<|end_header_id|>1.0<|eot_id|>               only when r != 0, rounded to 2 decimals
    <|start_header_id|>edit<|end_header_id|>...<|eot_id|>                 only when cut by the step limit
    <|end_of_text|>

(no newlines anywhere; they are only shown here). A step is action → next observation → reward, as gymnasium's
step() returns (obs, reward); the final observation (the goal or hole reached) is written, so the reward follows the
goal's number. A reward block only appears on an episode's last step, so no Q position sees its own episode's
reward. The edit block comes after the last observation, right before <|end_of_text|>.

ChatML tokenizers (SmolLM2) have no Llama 3 header tokens. Mapping: a block is `<|im_start|>ROLE\\nTEXT<|im_end|>`
(ChatML's own shape, without the "\\n" between blocks, as the Llama 3 format has none); <|begin_of_text|> → nothing
(SmolLM2 has no BOS token; the previous episode's end marker already separates episodes); <|end_of_text|> →
<|endoftext|>. The Q position is the "\\n" after `action`, the last token before the action word. Each action word
must be one token: for every tokenizer the first of a few spellings ("left", then " left") that encodes to one token
for all four words is used, else for_tokenizer raises. FORMAT_TEXTS lists every text piece of the format, for a small
built-in vocabulary that needs them (byte-level vocabularies encode any of them, but only the four action words must
be single tokens).

Packing (paper: sets of 20–40 episodes of one map, episodes shuffled within a set, sets concatenated up to the
context length; sets are taken in the caller's order, so the caller shuffles them). Cut rule: episodes are never
split. Episodes are appended in order; an episode that does not fit in what is left of the current slice closes it
(the rest is padding) and starts the next slice, so a set that crosses the boundary simply continues in the next
slice. Every action therefore has its next action (or its episode's end) in the same slice and loses nothing. An
episode longer than the context alone cannot be placed: it is dropped and a warning gives the number dropped and the
actions lost (a looping 100-step episode is ≈ 1000 tokens in this format).

The compact format (`CompactFormat`, our deviation for the small from-scratch model; the IA3 presets write the
paper's text): one token per observation, action and outcome, a hindsight recap after each finished episode (one
token per distinct (state, action) tagged goal / hole / wall / other: under causal attention a step cannot see how
its own episode ended), optionally states as tiles of an 8 x 8 canvas and a facts token after each observation (what
the context so far shows about the state's 4 moves, planner.ContextModel.facts), which is then the Q position. Both
are written from the context alone, so evaluation writes them the same way.

`next_token_loss` is an auxiliary language-model loss on the trajectory (every token but the actions), our addition.
"""
import random
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import planner

ACTION_WORDS = ("left", "down", "right", "up")  # gymnasium's action ids 0..3
ROLES = ("observation", "action", "reward", "edit")
# every text piece of the format (observations 0..63: maps up to 8×8)
FORMAT_TEXTS = ROLES + ACTION_WORDS + ("...", "1.0") + tuple(str(s) for s in range(64))
LLAMA3_FORMAT_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>")
CHATML_FORMAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@dataclass
class Episode:
    observations: list[int]  # s_0 .. s_n (n+1 states, the final one included)
    actions: list[int]       # a_0 .. a_{n-1}
    rewards: list[float]     # r_1 .. r_n
    truncated: bool = False  # cut by the step limit and not terminated (then terminal with reward 0 for the target)
    ncol: int | None = None        # its map's width: a canvas format (CompactFormat.canvas) needs it, others ignore it


def check_episode(ep: Episode):
    """Raises a ValueError naming the problem; Episode itself stays mutable so evaluation can grow one step by step."""
    n = len(ep.actions)
    if len(ep.observations) != n + 1 or len(ep.rewards) != n:
        raise ValueError(f"an episode with {n} actions needs {n + 1} observations (s_0..s_n, the final one included) "
                         f"and {n} rewards, got {len(ep.observations)} and {len(ep.rewards)}")
    if any(a not in (0, 1, 2, 3) for a in ep.actions):
        raise ValueError(f"actions must be 0 (left), 1 (down), 2 (right) or 3 (up), got {sorted(set(ep.actions))}")
    if ep.truncated and any(r != 0 for r in ep.rewards):
        raise ValueError("a truncated episode has a non-zero reward: an episode whose last allowed step also reached "
                         "a goal terminated; set truncated = truncated and not terminated")


# ---------------------------------------------------------------------------------------------------------------------
# The trajectory format as token ids


@dataclass
class TrajectoryFormat:
    """The paper's blocks for one tokenizer: block(role, text) = open + role(+sep) + close_header + text + close."""
    style: str                  # "llama3" or "chatml"
    encode: callable            # plain text -> ids, special-token text never special
    bos: list[int]              # episode start: <|begin_of_text|> (chatml: nothing)
    eos: list[int]              # episode end: <|end_of_text|> (chatml: <|endoftext|>)
    block_open: list[int]       # <|start_header_id|> (chatml: <|im_start|>)
    header_close: list[int]     # <|end_header_id|> (chatml: nothing)
    role_sep: str               # text between role and TEXT: "" (chatml: "\n")
    block_close: list[int]      # <|eot_id|> (chatml: <|im_end|>)
    word_prefix: str            # "" normally; " " for a vocabulary where only " left" is one token
    action_ids: list[int] = field(default_factory=list)  # vocabulary ids of the 4 action words, in action order
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # text -> ids

    @classmethod
    def for_tokenizer(cls, tok) -> "TrajectoryFormat | CompactFormat":
        """tok: llama.Tokenizer (or anything with `special_tokens: dict[str, int]` and `encode(str) -> list[int]`
        that adds no BOS). Llama 3 special-token names give the paper's format; ChatML ones the mapping above; a
        vocabulary with all of COMPACT_SPECIALS (train.py's --format compact) the compact format."""
        specials = getattr(tok, "special_tokens", None)
        if not isinstance(specials, dict):
            raise TypeError(f"{type(tok).__name__} has no special_tokens dict; pass a llama.Tokenizer")
        if all(s in specials for s in COMPACT_SPECIALS + ["<|begin_of_text|>", "<|end_of_text|>"]):
            return CompactFormat(specials)
        sp = lambda name: [specials[name]]  # noqa: E731
        encode = tok.encode
        if all(s in specials for s in LLAMA3_FORMAT_SPECIALS):
            base = dict(style="llama3", encode=encode, bos=sp("<|begin_of_text|>"), eos=sp("<|end_of_text|>"),
                        block_open=sp("<|start_header_id|>"), header_close=sp("<|end_header_id|>"), role_sep="",
                        block_close=sp("<|eot_id|>"))
        elif all(s in specials for s in CHATML_FORMAT_SPECIALS):
            base = dict(style="chatml", encode=encode, bos=[], eos=sp("<|endoftext|>"), block_open=sp("<|im_start|>"),
                        header_close=[], role_sep="\n", block_close=sp("<|im_end|>"))
        else:
            raise ValueError(f"tokenizer has neither the Llama 3 special tokens {LLAMA3_FORMAT_SPECIALS} nor "
                             f"ChatML's {CHATML_FORMAT_SPECIALS}; add them to its special tokens")
        tried = {}
        for prefix in ("", " "):
            ids = [encode(prefix + w) for w in ACTION_WORDS]
            tried[prefix] = ids
            if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4:
                return cls(**base, word_prefix=prefix, action_ids=[i[0] for i in ids])
        raise ValueError(f"the action words {ACTION_WORDS} are not single tokens in this vocabulary (encodings with "
                         f"no prefix / a leading space: {tried}); add them to the vocabulary (see dqn.FORMAT_TEXTS)")

    def _text(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.encode(text)
        return self._cache[text]

    def header(self, role: str) -> list[int]:
        return self.block_open + self._text(role + self.role_sep) + self.header_close

    def block(self, role: str, text: str) -> list[int]:
        return self.header(role) + self._text(text) + self.block_close

    def episode_start(self) -> list[int]:
        return list(self.bos)

    def observation(self, obs: int) -> list[int]:
        return self.block("observation", str(int(obs)))

    def action_prompt(self, facts=None) -> list[int]:  # its last token predicts the action word: the Q position
        return self.header("action")

    def action_word(self, a: int) -> list[int]:
        return [self.action_ids[a]] + self.block_close

    def reward(self, r: float) -> list[int]:  # emitted by the caller only when r != 0
        return self.block("reward", str(round(float(r), 2)))

    def episode_end(self, truncated: bool) -> list[int]:
        return (self.block("edit", "...") if truncated else []) + self.eos


    def recap(self, ep: Episode) -> list[int]:  # the paper's format has none
        return []


# ---------------------------------------------------------------------------------------------------------------------
# The compact format (our deviation for the small from-scratch model; see the module docstring)

RECAP_TAGS = ("goal", "hole", "wall", "other")  # priority order when one (s, a) gets several tags in an episode
COMPACT_SPECIALS = ([f"<|obs_{s}|>" for s in range(64)] + [f"<|act_{w}|>" for w in ACTION_WORDS]
                    + ["<|goal|>", "<|truncated|>"]
                    + [f"<|recap_{s}_{w}_{tag}|>" for s in range(64) for w in ACTION_WORDS for tag in RECAP_TAGS])


def recap_steps(ep: Episode) -> list[tuple[int, int, str]]:
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
    """One token per observation, action and outcome, plus a hindsight recap of every finished episode:

        <|begin_of_text|> <|obs_8|> <|act_right|> <|obs_9|> ... <|obs_15|> <|goal|> <|end_of_text|> recap...

    Q position: the observation token (it predicts the action token). <|goal|> follows a rewarded step,
    <|truncated|> an episode cut by the step limit; a hole is the last observation with neither. The recap
    (recap_steps) is one token <|recap_S_W_TAG|> per distinct (s, a). Why: under causal attention a step cannot see
    how its own episode ended, so a later episode can only learn "this action led to the goal" by reading a whole
    past episode; the recap puts that outcome on each (s, a) token, one attention lookup away. With facts=True a
    facts token follows each observation but the last (the module docstring) and is the Q position instead."""
    ids: dict                                   # special-token name -> id
    style: str = "compact"
    canvas: bool = False                        # write tile (r, c) as state r·8 + c, any map width (to_canvas)
    facts: bool = False                         # a facts token (FACT_TOKENS) after each observation: the Q position
    action_ids: list[int] = field(default_factory=list)
    bos: list[int] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.action_ids = [self.ids[f"<|act_{w}|>"] for w in ACTION_WORDS]
        self.bos, self.eos = [self.ids["<|begin_of_text|>"]], [self.ids["<|end_of_text|>"]]

    def _id(self, name: str) -> int:
        if name not in self.ids:
            raise ValueError(f"{name} is not in the compact vocabulary (observations 0..63: maps up to 8x8)")
        return self.ids[name]

    def episode_start(self) -> list[int]:
        return list(self.bos)

    def observation(self, obs: int) -> list[int]:
        return [self._id(f"<|obs_{int(obs)}|>")]

    def action_prompt(self, facts: list[int] | None = None) -> list[int]:
        """Nothing (the observation token is the Q position), or with facts=True the facts token of the context's
        facts about the state's 4 moves (planner.ContextModel.facts: 0 untried, 1 dead end, 2 open)."""
        if not self.facts:
            return []
        if facts is None:
            raise ValueError("a compact format with facts tokens needs the state's facts (planner.ContextModel.facts)")
        return [self.ids[FACT_TOKENS[facts_index(facts)]]]

    def action_word(self, a: int) -> list[int]:
        return [self.action_ids[a]]

    def reward(self, r: float) -> list[int]:  # Frozen Lake's only non-zero reward is the goal's 1
        return [self.ids["<|goal|>"]]

    def episode_end(self, truncated: bool) -> list[int]:
        return ([self.ids["<|truncated|>"]] if truncated else []) + self.eos

    def recap(self, ep: Episode) -> list[int]:
        return [self._id(f"<|recap_{s}_{ACTION_WORDS[a]}_{tag}|>") for s, a, tag in recap_steps(ep)]


FACT_TOKENS = [f"<|reserved_special_token_{i}|>" for i in range(22, 22 + 81)]  # 3^4 combinations (ids 22+: 10-21 stay unused)


def facts_index(facts: list[int]) -> int:
    """[f_0, f_1, f_2, f_3] (each 0..2) -> 27·f_0 + 9·f_1 + 3·f_2 + f_3, the index into FACT_TOKENS."""
    return facts[0] * 27 + facts[1] * 9 + facts[2] * 3 + facts[3]


CANVAS = 8  # the canvas is 8 x 8: the largest map the 64 state tokens hold


def canvas_state(s: int, ncol: int | None, row_offset: int = 0, col_offset: int = 0) -> int:
    """A map's state row·ncol + col as the canvas tile (row + row_offset)·8 + (col + col_offset)."""
    if ncol is None:
        raise ValueError("a canvas format needs each episode's map width: set Episode.ncol = len(desc[0])")
    row, col = divmod(s, ncol)
    if row + row_offset >= CANVAS or col_offset + ncol > CANVAS:
        raise ValueError(f"a map of width {ncol} at offset ({row_offset}, {col_offset}) leaves the 8x8 canvas")
    return (row + row_offset) * CANVAS + col + col_offset


def to_canvas(ep: Episode, row_offset: int = 0, col_offset: int = 0) -> Episode:
    """The episode with its states written as canvas tiles (ep.ncol = its map's width), then ncol = 8. Our option for
    the compact format, not the paper's: "down" is +8 on every map and a map placed at random offsets in training
    uses all 64 state tokens, so maps wider than the training ones (the ood set) only meet tokens it has learned."""
    states = [canvas_state(s, ep.ncol, row_offset, col_offset) for s in ep.observations]
    return Episode(states, ep.actions, ep.rewards, ep.truncated, CANVAS)


def tokenize_episode(ep: Episode, fmt: TrajectoryFormat,
                     lake: planner.ContextModel | None = None) -> tuple[list[int], list[int]]:
    """One episode -> (token ids, q_positions): q_positions[t] is the index of the token whose logits are Q(h_t, ·).
    The recap (compact format only) follows the episode's end. A format with facts tokens (CompactFormat.facts)
    writes at each step what `lake` (the context before the episode, in written states; empty if None) and the
    episode's earlier steps show about the state's moves; lake then learns the episode. The facts never change the
    length."""
    check_episode(ep)
    if getattr(fmt, "canvas", False):
        ep = to_canvas(ep)
    with_facts = getattr(fmt, "facts", False)
    lake = planner.ContextModel() if lake is None and with_facts else lake
    tokens = fmt.episode_start() + fmt.observation(ep.observations[0])
    q_positions, n = [], len(ep.actions)
    for t, (s, a, next_obs, r) in enumerate(zip(ep.observations, ep.actions, ep.observations[1:], ep.rewards)):
        tokens += fmt.action_prompt(lake.facts(s) if with_facts else None)
        q_positions.append(len(tokens) - 1)
        tokens += fmt.action_word(a) + fmt.observation(next_obs)
        if r != 0:
            tokens += fmt.reward(r)
        if with_facts:
            lake.learn(s, a, next_obs, t == n - 1 and not ep.truncated, r)
    tokens += fmt.episode_end(ep.truncated) + fmt.recap(ep)
    return tokens, q_positions


# ---------------------------------------------------------------------------------------------------------------------
# Packing episodes into context slices


@dataclass
class Slice:
    tokens: list[int] = field(default_factory=list)        # length <= context_len
    q_positions: list[int] = field(default_factory=list)   # the token before each action word
    actions: list[int] = field(default_factory=list)       # action taken at each q_position (0..3)
    rewards: list[float] = field(default_factory=list)     # unscaled episode reward at an episode's last action, else 0
    is_last: list[bool] = field(default_factory=list)      # last action of its episode: no bootstrap
    next_index: list[int] = field(default_factory=list)    # index of the same episode's next action, -1 if last
    # the slice's lake in written (canvas) states: the facts tokens' source (CompactFormat.facts)
    written: planner.ContextModel = field(default_factory=planner.ContextModel, repr=False)


def _append_episode(s: Slice, ep: Episode, tokens: list[int], q_positions: list[int]):
    offset, first, n = len(s.tokens), len(s.actions), len(ep.actions)
    s.tokens += tokens
    s.q_positions += [offset + p for p in q_positions]
    s.actions += list(ep.actions)
    episode_reward = 0.0 if ep.truncated else float(sum(ep.rewards))  # truncation: terminal, reward 0
    s.rewards += [episode_reward if t == n - 1 else 0.0 for t in range(n)]
    s.is_last += [t == n - 1 for t in range(n)]
    s.next_index += [first + t + 1 if t < n - 1 else -1 for t in range(n)]


def pack_slices(episode_sets: list[list[Episode]], fmt: TrajectoryFormat, context_len: int,
                rng: random.Random) -> list[Slice]:
    """Sets of episodes of one map each (in the caller's order) -> slices of at most context_len tokens.
    Episodes are shuffled within their set by rng and never split (cut rule in the module docstring)."""
    if context_len < 1:
        raise ValueError(f"context_len must be positive, got {context_len}")
    slices, current, dropped, lost = [], Slice(), 0, 0
    with_facts = getattr(fmt, "facts", False)
    for episodes in episode_sets:
        if isinstance(episodes, Episode):
            raise TypeError("pack_slices takes a list of sets (lists) of episodes, got a flat list of episodes")
        order = list(episodes)
        rng.shuffle(order)
        for ep in order:
            written = current.written.copy() if with_facts else None  # kept only if the episode joins this slice
            tokens, q_positions = tokenize_episode(ep, fmt, lake=written)
            if len(tokens) > context_len:
                dropped, lost = dropped + 1, lost + len(ep.actions)
                continue
            if len(current.tokens) + len(tokens) > context_len:
                slices.append(current)
                current = Slice()
                if with_facts:  # the same length, now with the fresh slice's facts
                    written = current.written
                    tokens, q_positions = tokenize_episode(ep, fmt, lake=written)
            if with_facts:
                current.written = written
            _append_episode(current, ep, tokens, q_positions)
    if current.tokens:
        slices.append(current)
    if dropped:
        warnings.warn(f"pack_slices dropped {dropped} episodes ({lost} actions) longer than context_len={context_len} "
                      f"tokens; use a longer context or shorter episodes (a lower step limit)")
    return slices


def collate(slices: list[Slice], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads tokens with pad_id (causal attention: real tokens never see the padding) and action slots with
    is_last=True, mask=False, so padded slots neither bootstrap nor count in the loss."""
    if not slices:
        raise ValueError("collate needs at least one slice")
    B, T, P = len(slices), max(len(s.tokens) for s in slices), max(max(len(s.actions) for s in slices), 1)
    out = {"tokens": torch.full((B, T), pad_id, dtype=torch.long),
           "q_positions": torch.zeros(B, P, dtype=torch.long), "actions": torch.zeros(B, P, dtype=torch.long),
           "rewards": torch.zeros(B, P), "is_last": torch.ones(B, P, dtype=torch.bool),
           "next_index": torch.full((B, P), -1, dtype=torch.long), "mask": torch.zeros(B, P, dtype=torch.bool),
           "lm_mask": torch.zeros(B, T, dtype=torch.bool)}
    for b, s in enumerate(slices):
        n = len(s.actions)
        out["tokens"][b, :len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
        out["lm_mask"][b, :len(s.tokens) - 1] = True  # position t predicts token t+1: real tokens only ...
        out["lm_mask"][b, s.q_positions] = False       # ... and not the actions: their logits are Q-values
        for key in ("q_positions", "actions", "rewards", "is_last", "next_index"):
            out[key][b, :n] = torch.tensor(getattr(s, key), dtype=out[key].dtype)
        out["mask"][b, :n] = True
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Q-values and the double-DQN objective


def q_values(model, tokens, q_positions, action_ids, adapter=None) -> torch.Tensor:
    """Q(h, a) = the LM-head logit of action word a at each Q position: (B, T), (B, P) -> (B, P, 4) float32.
    Only those positions and those 4 vocabulary rows reach the LM head."""
    device = tokens.device
    action_ids = torch.as_tensor(action_ids, dtype=torch.long, device=device)
    return model(tokens, adapter=adapter, logits_at=q_positions.to(device), vocab_ids=action_ids).float()


@torch.no_grad()
def bellman_targets(q_online, q_target, batch, gamma=0.9, reward_scale=30.0) -> torch.Tensor:
    """Double-DQN targets (Eq. 6), (B, P, 4) × 2 -> (B, P): the online network picks the next action, the target
    network values it; the last action of an episode gets reward_scale · its episode reward. No gradient."""
    is_last = batch["is_last"].to(q_online.device)
    nxt = batch["next_index"].to(q_online.device).clamp(min=0)             # (B, P); -1 slots are is_last, unused
    nxt4 = nxt[..., None].expand(-1, -1, q_online.shape[-1])               # (B, P, 4)
    best = q_online.detach().gather(1, nxt4).argmax(-1, keepdim=True)      # (B, P, 1) argmax_a Q_θ(h', a)
    bootstrap = gamma * q_target.detach().gather(1, nxt4).gather(2, best).squeeze(-1).float()  # (B, P)
    final = reward_scale * batch["rewards"].to(q_online.device).float()    # (B, P)
    return torch.where(is_last, final, bootstrap)


def next_token_loss(logits, batch) -> torch.Tensor:
    """Our auxiliary loss (not the paper's): cross-entropy of the next token at every position except the Q positions,
    (B, T, V) -> (). It asks the model to predict the next observation from (state, action), the hole or goal that
    ends an episode, and the recap: all of them answered by looking up earlier steps of the same map in the context,
    the lookup the Q-values need, with a dense signal instead of one regression target per action."""
    mask = batch["lm_mask"][:, :-1].to(logits.device)                                      # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["tokens"][:, 1:].flatten().to(logits.device),
                          reduction="none").view(mask.shape)                               # (B, T-1)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def td_loss(q_online, targets, batch) -> torch.Tensor:
    """Eq. 7: mean over the real action slots of (Q_θ(h_t, a_t) − y_t)², (B, P, 4), (B, P) -> ()."""
    mask = batch["mask"].to(q_online.device).float()                                         # (B, P)
    q = q_online.gather(2, batch["actions"].to(q_online.device)[..., None]).squeeze(-1)    # (B, P) Q_θ(h_t, a_t)
    return ((q - targets.detach()).pow(2) * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def polyak_update(target_params, online_params, alpha=0.1):
    """Eq. 8, in place: φ ← α·θ + (1−α)·φ. Parameter iterables or modules; α = 1 copies θ, α = 0 keeps φ."""
    if isinstance(target_params, torch.nn.Module):
        target_params = target_params.parameters()
    if isinstance(online_params, torch.nn.Module):
        online_params = online_params.parameters()
    target_params, online_params = list(target_params), list(online_params)
    if len(target_params) != len(online_params):
        raise ValueError(f"target has {len(target_params)} tensors, online {len(online_params)}: not copies")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Polyak alpha must be in [0, 1], got {alpha}")
    for phi, theta in zip(target_params, online_params):
        if phi.shape != theta.shape:
            raise ValueError(f"target tensor {tuple(phi.shape)} vs online {tuple(theta.shape)}: not copies")
        phi.mul_(1.0 - alpha).add_(theta.to(phi.dtype), alpha=alpha)  # mul/add, not lerp: α = 1 gives θ exactly
