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

(no newlines anywhere). A step is action → next observation → reward, as gymnasium's step() returns them; a
reward block only appears on an episode's last step, so no Q position sees its own episode's reward. ChatML
tokenizers (SmolLM2) map a block to `<|im_start|>ROLE\nTEXT<|im_end|>`, <|begin_of_text|> to nothing and
<|end_of_text|> to <|endoftext|>; the Q position is the "\n" after `action`. Each action word must be one token.

Packing (§3.2): sets of 20–40 episodes of one map, shuffled within the set, concatenated up to the context length.
Episodes are never split: one that does not fit closes the slice, so every action has its next action (or its
episode's end) in the same slice. An episode longer than the whole context is dropped with a warning.

Any object with the methods of `Format` writes episodes: `TrajectoryFormat` here (the paper's text), and
compact.CompactFormat, the cpu preset's deviation (one token per step piece, a recap per finished episode).
"""
import random
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import torch

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
    def for_tokenizer(cls, tok) -> "TrajectoryFormat":
        """tok: llama_tokenizer.Tokenizer (or anything with `special_tokens: dict[str, int]` and `encode(str)`
        that adds no BOS). Llama 3 special-token names give the paper's format; ChatML ones the mapping above."""
        specials = getattr(tok, "special_tokens", None)
        if not isinstance(specials, dict):
            raise TypeError(f"{type(tok).__name__} has no special_tokens dict; pass a llama_tokenizer.Tokenizer")
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

    def action_prompt(self) -> list[int]:  # its last token predicts the action word: the Q position
        return self.header("action")

    def action_word(self, a: int) -> list[int]:
        return [self.action_ids[a]] + self.block_close

    def reward(self, r: float) -> list[int]:  # emitted by the caller only when r != 0
        return self.block("reward", str(round(float(r), 2)))

    def episode_end(self, ep: Episode) -> list[int]:
        return (self.block("edit", "...") if ep.truncated else []) + self.eos


class Format(Protocol):
    """What writes an episode as tokens: TrajectoryFormat (the paper's text) or compact.CompactFormat."""
    action_ids: list[int]   # the vocabulary rows of the 4 action words: the Q-values
    eos: list[int]          # the episode's last token (also the right padding)

    def episode_start(self) -> list[int]: ...
    def observation(self, obs: int) -> list[int]: ...
    def action_prompt(self) -> list[int]: ...     # its last token (or the observation's) is the Q position
    def action_word(self, a: int) -> list[int]: ...
    def reward(self, r: float) -> list[int]: ...
    def episode_end(self, ep: Episode) -> list[int]: ...


def tokenize_episode(ep: Episode, fmt: Format) -> tuple[list[int], list[int]]:
    """One episode -> (token ids, q_positions): q_positions[t] is the index of the token whose logits are Q(h_t, ·)."""
    check_episode(ep)
    tokens, q_positions = fmt.episode_start() + fmt.observation(ep.observations[0]), []
    for a, next_obs, r in zip(ep.actions, ep.observations[1:], ep.rewards):
        tokens += fmt.action_prompt()
        q_positions.append(len(tokens) - 1)
        tokens += fmt.action_word(a) + fmt.observation(next_obs)
        if r != 0:
            tokens += fmt.reward(r)
    return tokens + fmt.episode_end(ep), q_positions


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


def _append_episode(s: Slice, ep: Episode, tokens: list[int], q_positions: list[int]):
    offset, first, n = len(s.tokens), len(s.actions), len(ep.actions)
    s.tokens += tokens
    s.q_positions += [offset + p for p in q_positions]
    s.actions += list(ep.actions)
    episode_reward = 0.0 if ep.truncated else float(sum(ep.rewards))  # truncation: terminal, reward 0
    s.rewards += [episode_reward if t == n - 1 else 0.0 for t in range(n)]
    s.is_last += [t == n - 1 for t in range(n)]
    s.next_index += [first + t + 1 if t < n - 1 else -1 for t in range(n)]


def pack_slices(episode_sets: list[list[Episode]], fmt: Format, context_len: int,
                rng: random.Random) -> list[Slice]:
    """Sets of episodes of one map each (in the caller's order) -> slices of at most context_len tokens.
    Episodes are shuffled within their set by rng and never split (cut rule in the module docstring)."""
    if context_len < 1:
        raise ValueError(f"context_len must be positive, got {context_len}")
    slices, current, dropped, lost = [], Slice(), 0, 0
    for episodes in episode_sets:
        if isinstance(episodes, Episode):
            raise TypeError("pack_slices takes a list of sets (lists) of episodes, got a flat list of episodes")
        order = list(episodes)
        rng.shuffle(order)
        for ep in order:
            tokens, q_positions = tokenize_episode(ep, fmt)
            if len(tokens) > context_len:
                dropped, lost = dropped + 1, lost + len(ep.actions)
                continue
            if len(current.tokens) + len(tokens) > context_len:
                slices.append(current)
                current = Slice()
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
