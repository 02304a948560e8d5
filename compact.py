"""The compact trajectory format: our input-side deviation for the small from-scratch model (cpu preset).

The paper writes each step as Llama 3 chat blocks (dqn.TrajectoryFormat, ≈ 100 tokens per episode). A 1M-parameter
model trained from scratch on 2 CPU cores did not learn to read that text in context, so the cpu preset writes:
- one token per observation, action and outcome (≈ 31 tokens per episode), and after each finished episode a
  hindsight recap: one token per distinct (state, action), tagged goal / hole / wall / other (recap_steps). Under
  causal attention a step cannot see how its own episode ended; the recap puts the outcome one lookup away;
- with `canvas`, tile (row, col) as state row·8 + col on every map (to_canvas), so larger maps meet trained tokens;
- with `facts`, after each observation a token naming what the context so far shows about the state's 4 moves
  (untried, dead end, open: planner.ContextModel.facts); it is the Q position.
All of it is written from the context alone (no map knowledge), so evaluation writes it the same way.
"""
from dataclasses import dataclass, field

import dqn

RECAP_TAGS = ("goal", "hole", "wall", "other")  # priority order when one (s, a) gets several tags in an episode
COMPACT_SPECIALS = ([f"<|obs_{s}|>" for s in range(64)] + [f"<|act_{w}|>" for w in dqn.ACTION_WORDS]
                    + ["<|goal|>", "<|truncated|>"]
                    + [f"<|recap_{s}_{w}_{tag}|>" for s in range(64) for w in dqn.ACTION_WORDS for tag in RECAP_TAGS])


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

    Q position: the observation token (with facts=True: the facts token after it). <|goal|> follows a rewarded step,
    <|truncated|> an episode cut by the step limit; a hole is the last observation with neither. The recap is one
    token <|recap_S_W_TAG|> per distinct (s, a) (recap_steps): the episode's outcome one attention lookup away."""
    ids: dict                                   # special-token name -> id
    style: str = "compact"
    canvas: bool = False                        # write tile (r, c) as state r·8 + c, any map width (to_canvas)
    facts: bool = False                         # a facts token (FACT_TOKENS) after each observation: the Q position
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

    def written(self, ep: dqn.Episode) -> dqn.Episode:  # the states as this format writes them
        return to_canvas(ep) if self.canvas else ep

    def recap(self, ep: dqn.Episode) -> list[int]:
        return [self._id(f"<|recap_{s}_{dqn.ACTION_WORDS[a]}_{tag}|>") for s, a, tag in recap_steps(ep)]


FACT_TOKENS = [f"<|reserved_special_token_{i}|>" for i in range(22, 22 + 81)]  # 3^4 combinations (ids 22+: 10-21 stay unused)


def facts_index(facts: list[int]) -> int:
    """[f_0, f_1, f_2, f_3] (each 0..2) -> 27·f_0 + 9·f_1 + 3·f_2 + f_3, the index into FACT_TOKENS."""
    return facts[0] * 27 + facts[1] * 9 + facts[2] * 3 + facts[3]


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
