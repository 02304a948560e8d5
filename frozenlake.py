"""Frozen Lake in pure Python: gymnasium's FrozenLake-v1 dynamics, the paper's random maps, and pictures.

The agent walks on a grid of tiles from a start `S` to a goal `G`; `F` is frozen ice, `H` a hole. Entering a goal
gives reward 1 and ends the episode, entering a hole ends it with 0, and an episode is cut (truncated) after
`max_steps` steps. Observations are tile numbers `row * ncol + col`; actions are 0 left, 1 down, 2 right, 3 up.

What it follows:
- gymnasium 1.4 `FrozenLake-v1` (reached through `gymnasium.make`, so with its 100-step TimeLimit): the transition
  table `P[s][a] = [(prob, next_state, reward, terminated), ...]` is built the way gymnasium builds it (tests compare
  the tables entry for entry), `reset(seed)` returns (obs, {"prob": 1}) with the start drawn uniformly among all `S`
  tiles, `step(a)` returns (obs, reward, terminated, truncated, {"prob": p}), and like gymnasium's TimeLimit,
  `truncated` becomes True on the `max_steps`-th step even if that step also terminates the episode (callers should
  check `terminated` first). Several goals are allowed.
- The map generator of the in-context RL paper on LLaMA 3.1 (arXiv 2501.14176, §3.2): height and width
  uniform in a range; each tile is a start with p 0.1, else (a second draw) a goal with p 0.1, else a hole with
  p 0.2, else frozen; a map is kept only if every start reaches a goal through non-hole tiles and its nearest goal
  is at least 4 steps away; maps are unique within a set.

Where it deliberately differs:
- Standard library only; randomness comes from `random.Random`, so seeded runs differ from gymnasium's numpy
  generator (same distributions, different draws). Only `Random.random()` is used, the one method Python promises
  to keep stable, so a seed gives the same maps and episodes on every machine and Python version.
- Maps are validated: every start must be able to reach a goal (gymnasium accepts hopeless maps silently).
- The paper does not say whether a map's size is drawn once per map or once per attempt; here it is drawn once per
  map and only the tiles are redrawn until the map is valid, so a set's sizes are uniform in the range.
"""
import collections
import functools
import os
import random
import tempfile
from dataclasses import dataclass

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTION_NAMES = ("left", "down", "right", "up")
MOVES = {LEFT: (0, -1), DOWN: (1, 0), RIGHT: (0, 1), UP: (-1, 0)}  # action -> (d_row, d_col)
TILES = "SFHG"

MAP_4X4 = ["SFFF", "FHFH", "FFFH", "HFFG"]  # gymnasium's classic maps
MAP_8X8 = ["SFFFFFFF", "FFFFFFFF", "FFFHFFFF", "FFFFFHFF", "FFFHFFFF", "FHHFFFHF", "FHFFHFHF", "FFFHFFFG"]
# The paper's stitching test (6 rows x 4 cols): start 8, goal 22; a path down column 2 crosses the row of the start.
STITCHING_MAP = ["HHFF", "FFFF", "SFFH", "HFFF", "HFFF", "HFGF"]


# ---------------------------------------------------------------------------------------------------------------------
# Maps: validation and shortest paths


def _move(desc, state, action):
    """The tile reached by `action` from `state`; walking off the grid leaves the agent where it is."""
    nrow, ncol = len(desc), len(desc[0])
    row, col = divmod(state, ncol)
    d_row, d_col = MOVES[action]
    return min(max(row + d_row, 0), nrow - 1) * ncol + min(max(col + d_col, 0), ncol - 1)


def _tiles(desc, letter):
    return [s for s, tile in enumerate("".join(desc)) if tile == letter]


def goal_distances(desc):
    """Steps from each state to its nearest goal walking on non-hole tiles; 0 on a goal, None for holes and tiles
    that cannot reach a goal. One breadth-first search outward from all goals at once."""
    nrow, ncol = len(desc), len(desc[0])
    flat = "".join(desc)
    dist = [None] * (nrow * ncol)
    queue = collections.deque(_tiles(desc, "G"))
    for s in queue:
        dist[s] = 0
    while queue:
        s = queue.popleft()
        for a in MOVES:  # moves are symmetric, so a neighbour reached from s also reaches s in one step
            t = _move(desc, s, a)
            if dist[t] is None and flat[t] in "SF":
                dist[t] = dist[s] + 1
                queue.append(t)
    return dist


def optimal_actions(desc):
    """For each state, every action that brings a non-slippery agent one step closer to its nearest goal
    (empty for goals, holes and tiles that cannot reach a goal)."""
    dist = goal_distances(desc)
    return [[a for a in MOVES if d and dist[_move(desc, s, a)] == d - 1] for s, d in enumerate(dist)]


def validate_map(desc):
    """Return `desc` as a fresh list of row strings, or raise ValueError saying what is wrong with it."""
    if isinstance(desc, str) or not all(isinstance(row, str) for row in desc):
        raise ValueError(f"a map must be a list of row strings like {MAP_4X4}, got {desc!r}")
    desc = list(desc)
    if not desc or not desc[0]:
        raise ValueError("the map is empty: give at least one row with at least one tile")
    widths = sorted({len(row) for row in desc})
    if len(widths) > 1:
        raise ValueError(f"the map is not rectangular: rows have lengths {widths}; make every row equally long")
    unknown = sorted(set("".join(desc)) - set(TILES))
    if unknown:
        raise ValueError(f"unknown tile characters {unknown} in the map; use only S (start), F (frozen), "
                         f"H (hole) and G (goal)")
    if not _tiles(desc, "S"):
        raise ValueError("the map has no start tile 'S': add at least one")
    if not _tiles(desc, "G"):
        raise ValueError("the map has no goal tile 'G': add at least one")
    dist = goal_distances(desc)
    stuck = [s for s in _tiles(desc, "S") if dist[s] is None]
    if stuck:
        raise ValueError(f"no reachable goal from start state(s) {stuck}: holes cut them off from every goal; "
                         f"open a path of F tiles or remove those starts")
    return desc


# ---------------------------------------------------------------------------------------------------------------------
# The environment


@dataclass(frozen=True)
class Discrete:
    """The size of a finite space, like gymnasium's spaces.Discrete(n).n."""
    n: int


class FrozenLake:
    """gymnasium's FrozenLake-v1 with a step limit (its TimeLimit wrapper folded in); see the module docstring."""

    def __init__(self, desc, is_slippery=False, max_steps=100):
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.desc = validate_map(desc)
        self.nrow, self.ncol = len(self.desc), len(self.desc[0])
        self.is_slippery = is_slippery
        self.max_steps = max_steps
        self.observation_space = Discrete(self.nrow * self.ncol)
        self.action_space = Discrete(4)
        self.starts = _tiles(self.desc, "S")
        self.P = self._transitions()
        self.rng = random.Random()  # seeded from the OS until reset(seed=...) is called, as in gymnasium
        self.s, self.steps = None, 0

    def _transitions(self):
        flat = "".join(self.desc)
        # gymnasium computes the slip probabilities this way (1/3 intended, (1 - 1/3) / 2 each perpendicular); the
        # same arithmetic gives the same floats, so the tables compare equal entry for entry.
        success_rate = 1.0 / 3.0
        fail_rate = (1.0 - success_rate) / 2.0
        P = {}
        for s, tile in enumerate(flat):
            P[s] = {}
            for a in range(4):
                if tile in "GH":  # absorbing: the episode is already over
                    P[s][a] = [(1.0, s, 0.0, True)]
                    continue
                # slipping turns the agent 90 degrees either way: (a - 1) % 4, a, (a + 1) % 4 in gymnasium's order
                directions = [((a - 1) % 4, fail_rate), (a, success_rate), ((a + 1) % 4, fail_rate)]
                if not self.is_slippery:
                    directions = [(a, 1.0)]
                P[s][a] = []
                for b, prob in directions:
                    t = _move(self.desc, s, b)
                    P[s][a].append((prob, t, float(flat[t] == "G"), flat[t] in "GH"))
        return P

    def reset(self, seed=None):
        if seed is not None:
            self.rng = random.Random(seed)
        self.s = self.starts[int(self.rng.random() * len(self.starts))]
        self.steps = 0
        return self.s, {"prob": 1}

    def step(self, action):
        if self.s is None:
            raise RuntimeError("call reset() before step()")
        if action not in MOVES:
            raise ValueError(f"action must be 0 (left), 1 (down), 2 (right) or 3 (up), got {action!r}")
        transitions = self.P[self.s][action]
        # sample like gymnasium's categorical_sample: the first outcome whose cumulative probability exceeds u
        u, cumulative = self.rng.random(), 0.0
        for prob, next_state, reward, terminated in transitions:
            cumulative += prob
            if cumulative > u:
                break
        self.s = next_state
        self.steps += 1
        truncated = self.steps >= self.max_steps
        return next_state, reward, terminated, truncated, {"prob": prob}


# ---------------------------------------------------------------------------------------------------------------------
# The paper's random maps


def _randint(rng, low, high):
    """Uniform integer in [low, high] from Random.random() alone (randrange's algorithm may change between versions)."""
    return low + int(rng.random() * (high - low + 1))


def _random_tile(rng, p_start, p_goal, p_hole):
    """One raw tile, before any map is filtered: P(S) = p_start, P(G) = (1 - p_start)·p_goal, P(H) =
    (1 - p_start)(1 - p_goal)·p_hole, else F (sequential draws, as the paper's generator describes)."""
    if rng.random() < p_start:
        return "S"
    if rng.random() < p_goal:
        return "G"
    if rng.random() < p_hole:
        return "H"
    return "F"


def is_valid_map(desc, min_hops=4):
    """The paper's acceptance rule: at least one start and goal, and every start's nearest goal reachable and at
    least `min_hops` steps away."""
    starts = _tiles(desc, "S")
    if not starts or not _tiles(desc, "G"):
        return False
    dist = goal_distances(desc)
    return all(dist[s] is not None and dist[s] >= min_hops for s in starts)


def generate_maps(n, rows=(3, 5), cols=(3, 5), seed=0, p_start=0.1, p_goal=0.1, p_hole=0.2, min_hops=4,
                  exclude=(), max_tries=100_000):
    """`n` distinct random maps, none in `exclude`; each map's height and width are uniform in the inclusive ranges
    `rows` and `cols`, then its tiles are redrawn until it passes `is_valid_map` and is new."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    for name, (low, high) in (("rows", rows), ("cols", cols)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} must be a range (low, high) with 1 <= low <= high, got {(low, high)}")
    for name, p in (("p_start", p_start), ("p_goal", p_goal), ("p_hole", p_hole)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    rng = random.Random(seed)
    seen = {tuple(m) for m in exclude}
    maps = []
    while len(maps) < n:
        nrow, ncol = _randint(rng, *rows), _randint(rng, *cols)
        for _ in range(max_tries):
            desc = ["".join(_random_tile(rng, p_start, p_goal, p_hole) for _ in range(ncol)) for _ in range(nrow)]
            if tuple(desc) not in seen and is_valid_map(desc, min_hops):
                break
        else:
            raise ValueError(f"no new valid {nrow}x{ncol} map after {max_tries} tries (min_hops={min_hops}, "
                             f"{len(maps)} maps so far): ask for fewer maps, larger sizes or a smaller min_hops")
        seen.add(tuple(desc))
        maps.append(desc)
    return maps


@functools.lru_cache(maxsize=None)
def _map_set(name, n=None):
    if name == "train" and n is not None:  # more than the paper's 250: the same generator run on, avoiding test maps
        maps = generate_maps(n, rows=(3, 5), cols=(3, 5), seed=0, exclude=_map_set("test"))
        assert maps[:250] == [list(m) for m in _map_set("train")]  # test maps exclude the 250, so no draw changed
    elif name == "train":
        maps = generate_maps(250, rows=(3, 5), cols=(3, 5), seed=0)
    elif name == "test":  # held out: same distribution as training, never one of the training maps
        maps = generate_maps(50, rows=(3, 5), cols=(3, 5), seed=1, exclude=_map_set("train"))
    else:
        maps = generate_maps(50, rows=(6, 7), cols=(6, 7), seed=2)
    return tuple(tuple(m) for m in maps)  # immutable, so the cache cannot be edited through a returned map


def train_maps(n=250):
    """The first n training maps, 3-5 x 3-5: the paper's 250 by default; n > 250 continues the same random sequence
    (the first 250 unchanged), skipping the held-out test maps."""
    if n < 1:
        raise ValueError(f"need at least one training map, got n={n}")
    return [list(m) for m in (_map_set("train") if n <= 250 else _map_set("train", n))][:n]


def test_maps():
    """50 held-out in-distribution maps, 3-5 x 3-5, none of them a training map."""
    return [list(m) for m in _map_set("test")]


def ood_maps():
    """50 out-of-distribution maps, 6-7 x 6-7."""
    return [list(m) for m in _map_set("ood")]


# ---------------------------------------------------------------------------------------------------------------------
# Pictures


def render_text(desc, state=None):
    """The map as text, three characters per tile, the agent's tile in brackets: '[S] F  F  F' for state 0."""
    ncol = len(desc[0])
    lines = []
    for row, line in enumerate(desc):
        cells = [f"[{tile}]" if row * ncol + col == state else f" {tile} " for col, tile in enumerate(line)]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


TILE_COLORS = {"S": "#9be39b", "F": "#dff1fb", "H": "#27374d", "G": "#f7d154"}
PATH_COLORS = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def render_png(desc, trajectories, path, title=None):
    """Draw the map with each trajectory (a list of visited states) as a chain of arrows, and write a PNG to `path`.

    Tiles carry their state number; holes are dark, starts green, goals gold. Trajectories get their own colour and a
    small sideways offset, so paths that share tiles stay visible (as in the paper's stitching figure)."""
    # a bare Figure draws with the Agg canvas and leaves pyplot's global backend and figure list alone
    from matplotlib.figure import Figure

    desc = validate_map(desc)
    nrow, ncol = len(desc), len(desc[0])
    fig = Figure(figsize=(0.9 * ncol + 0.4, 0.9 * nrow + 0.6))
    draw_lake(fig.add_subplot(), desc, trajectories, title)
    fig.tight_layout()
    # write beside the target and rename, so a crash never leaves a half-written picture at `path`
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def draw_lake(ax, desc, trajectories, title=None):
    """render_png's picture on a matplotlib axis (so several lakes can share one figure)."""
    from matplotlib.patches import FancyArrowPatch, Rectangle

    desc = validate_map(desc)
    nrow, ncol = len(desc), len(desc[0])
    for k, states in enumerate(trajectories):
        bad = [s for s in states if not (isinstance(s, int) and 0 <= s < nrow * ncol)]
        if bad:
            raise ValueError(f"trajectory {k} has states {bad} outside this {nrow}x{ncol} map (0..{nrow * ncol - 1})")

    for s, tile in enumerate("".join(desc)):
        row, col = divmod(s, ncol)
        ax.add_patch(Rectangle((col, row), 1, 1, facecolor=TILE_COLORS[tile], edgecolor="#7f8c99", linewidth=1))
        text_color = "white" if tile == "H" else "#333333"
        ax.text(col + 0.06, row + 0.08, str(s), fontsize=7, color=text_color, ha="left", va="top")
        if tile != "F":
            ax.text(col + 0.94, row + 0.94, tile, fontsize=11, color=text_color, ha="right", va="bottom",
                    fontweight="bold", alpha=0.6)

    for k, states in enumerate(trajectories):
        color = PATH_COLORS[k % len(PATH_COLORS)]
        offset = 0.12 * (k - (len(trajectories) - 1) / 2) if len(trajectories) > 1 else 0.0
        for s, t in zip(states, states[1:]):
            (r0, c0), (r1, c1) = divmod(s, ncol), divmod(t, ncol)
            if s == t:  # bumped into the edge: mark the tile instead of drawing a zero-length arrow
                ax.plot(c0 + 0.5 + offset, r0 + 0.5 + offset, "o", color=color, markersize=4)
                continue
            # shift perpendicular to the move so two trajectories along the same edge do not overlap
            dx, dy = c1 - c0, r1 - r0
            ox, oy = -dy * offset, dx * offset
            ax.add_patch(FancyArrowPatch((c0 + 0.5 + ox, r0 + 0.5 + oy), (c1 + 0.5 + ox, r1 + 0.5 + oy),
                                         arrowstyle="-|>", mutation_scale=12, color=color, linewidth=1.8,
                                         shrinkA=4, shrinkB=4))
        if states:
            r0, c0 = divmod(states[0], ncol)
            ax.plot(c0 + 0.5 + offset, r0 + 0.5 + offset, "s", color=color, markersize=5)  # where it starts

    ax.set_xlim(0, ncol)
    ax.set_ylim(nrow, 0)  # row 0 at the top, as in the text render
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
