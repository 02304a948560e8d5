"""Context-planner targets: the Q-values an optimistic model-based planner would give, planning with exactly the
transitions written in the context so far (our option `--targets planner`, not the paper's).

The paper regresses Q on double-DQN bootstraps of the data's own actions (Eq. 6); our Monte-Carlo option on the
return of the action's episode. Both only say how good the data's behaviour was, so on a lake where no episode in the
context has reached the goal every action is worth 0 and the greedy policy has nothing to go on: it steps into the
same hole again or loops (results/HISTORY.md: 0.000–0.100 greedy success on those maps). These targets say instead what
is worth doing given the context, for all four actions at every step:

    Q(h, s, a) = 1                      (s, a) is known from h to enter a goal
               = 0                      (s, a) is known to enter a hole (an episode ended there without reward)
               = u = γ^K                (s, a) has not been tried in h: optimism (R-max, Brafman & Tennenholtz 2002),
                                        "an untried move is worth a goal K steps away"
               = γ · max_a' Q(h, s', a') (s, a) is known to lead to s'

on the deterministic lake the context describes; multiplied by reward_scale like every other target. The greedy
policy of these values walks to the nearest untried move until a goal is known, then takes the shortest known path,
unless an untried move is more than K steps closer. Played under evaluate.py's warm-up schedule (its `planner`
baseline) it solves 0.998 of the held-out 3-5 x 3-5 lakes and 0.890 of the 6-7 x 6-7 ones in the greedy episodes
(K = 8, 10 seeds), against 0.487 / 0.211 for tabular Q-learning; the model's job is to read that planner off its
context.

Two ways to use them (train.py): `--targets planner` regresses all four Q-values on these targets: it did not learn
(greedy success 0.016, 71 % of greedy episodes loop: known holes stay at 16 instead of 0, the path values need a
multi-hop search the small model did not form in 1250 steps). `--targets optimistic` keeps the Monte-Carlo return
for the action taken and adds the planner's value only where it is one lookup away (`settled`: an untried move u, a
move known to end in a hole 0 or a goal 1) for the other three: the exploration the Monte-Carlo targets lack; it
raised greedy success (results/HISTORY.md). With `--settled-hops H` (the cpu default: 1) also a known move into a state
at most H - 1 known moves from an exit (`exits`: a goal-entering or an untried move), with `--settled-taken` for the
action taken too: one lookup further, which made the warm-up explore; longer paths (H = 3) hurt like `planner`.

The planner sees what the model sees: one slice's context, every episode in it, the current episode up to the step.
Slices may hold the end of one map's set and the start of the next: the planner then keeps the older map's moves
until the newer one contradicts them (the latest evidence about an (s, a) wins; a state an episode walked on is not
terminal), the rule a non-stationary lake needs too. No geometry: a state is only a number, as for the model.

The values are exact by breadth-first search instead of value iteration: on a deterministic lake a state's value is
that of its best reachable exit discounted by the path length, V(s) = max(γ^d_goal(s), u · γ^d_untried(s)), with d
the fewest known non-terminal moves from s to a state that has a goal-entering move (an untried move).
"""
import collections
from dataclasses import dataclass, field


@dataclass
class ContextModel:
    """The lake as the context describes it so far; `q` plans on it (values cached until the next new fact)."""
    moves: dict = field(default_factory=dict)  # (s, a) -> s', the latest outcome written in the context
    ends: dict = field(default_factory=dict)   # s -> reward of an episode that terminated on entering s
    _plans: dict = field(default_factory=dict, repr=False)  # (γ, untried) -> V, "exits" -> hops, until a new fact

    def learn(self, s: int, a: int, s_next: int, terminated: bool, reward: float):
        changed = self.moves.get((s, a)) != s_next or s in self.ends or (s_next in self.ends) != terminated
        self.moves[(s, a)] = s_next
        self.ends.pop(s, None)  # an episode stood on s: not terminal (any more)
        if terminated:
            changed = changed or self.ends.get(s_next) != reward
            self.ends[s_next] = reward
        else:
            self.ends.pop(s_next, None)
        if changed:
            self._plans.clear()

    def copy(self) -> "ContextModel":
        return ContextModel(dict(self.moves), dict(self.ends))

    def learn_episode(self, ep):
        """Every step of a finished or unfinished dqn.Episode; its last step ends it unless it was truncated."""
        n = len(ep.actions)
        for t in range(n):
            self.learn(ep.observations[t], ep.actions[t], ep.observations[t + 1], t == n - 1 and not ep.truncated,
                       ep.rewards[t])

    def values(self, gamma: float, untried: float) -> dict:
        """V(s) for every state the context names (others: all moves untried, V = untried)."""
        into, states, goal_entries, untried_moves = self._graph()
        d_goal, d_untried = _hops_to(into, goal_entries), _hops_to(into, untried_moves)
        values = {}
        for s in states - self.ends.keys():  # V(s) = max(γ^d_goal, u·γ^d_untried), 0 if neither is reachable
            exits = [gamma ** d_goal[s]] if s in d_goal else []
            exits += [untried * gamma ** d_untried[s]] if s in d_untried else []
            values[s] = max(exits, default=0.0)
        return values

    def q(self, s: int, gamma: float, untried: float) -> list[float]:
        """[Q(s, a) for a in 0..3] by the module docstring's rule (unscaled: a goal-entering move is 1)."""
        if (gamma, untried) not in self._plans:
            self._plans[gamma, untried] = self.values(gamma, untried)
        values = self._plans[gamma, untried]
        out = []
        for a in range(4):
            t = self.moves.get((s, a))
            out.append(untried if t is None else self.ends[t] if t in self.ends else gamma * values.get(t, untried))
        return out

    def walls(self, s: int) -> list[bool]:
        """[a is known to leave s unchanged (into the lake's edge)] for a in 0..3: never the best move on a
        deterministic lake, since its value γ·V(s) is below V(s) whenever V(s) > 0."""
        return [self.moves.get((s, a)) == s for a in range(4)]

    def facts(self, s: int) -> list[int]:
        """[what the context shows about a] for a in 0..3: 0 untried, 1 a dead end (known to enter a hole or to bump
        into the edge), 2 open (known to reach another tile or the goal): the one-lookup facts of the move."""
        out = []
        for a in range(4):
            t = self.moves.get((s, a))
            out.append(0 if t is None else 1 if t == s or self.ends.get(t, 1) == 0 else 2)
        return out

    def settled(self, s: int, hops: int = 0) -> list[bool]:
        """[a is untried, or known to end the episode] for a in 0..3: the moves whose value is one lookup away
        (u, or the end's reward), not a path through the lake; with hops = H > 0 also a known move off s to a state
        within H - 1 further known moves of an exit (a goal-entering or an untried move): a path of at most H hops."""
        reach = self.exits() if hops else {}
        return [(s, a) not in self.moves or self.moves[s, a] in self.ends
                or (self.moves[s, a] != s and reach.get(self.moves[s, a], hops) < hops) for a in range(4)]

    def exits(self) -> dict:
        """Fewest known non-terminal moves from each state to one with an exit (a goal-entering or an untried
        move), cached like the plans."""
        if "exits" not in self._plans:
            into, _, goal_entries, untried_moves = self._graph()
            self._plans["exits"] = _hops_to(into, goal_entries | untried_moves)
        return self._plans["exits"]

    def goal_hops(self) -> dict:
        """Fewest known non-terminal moves from each state to one with a known goal-entering move (d_goal above;
        states with no known path to a goal are absent)."""
        into, _, goal_entries, _ = self._graph()
        return _hops_to(into, goal_entries)

    def _graph(self):
        """(s' -> states with a known non-terminal, non-wall move to it; the states the context names; those with a
        known goal-entering move; the non-terminal ones with an untried move)."""
        into = collections.defaultdict(list)
        for (s, a), t in self.moves.items():
            if t not in self.ends and t != s:
                into[t].append(s)
        tried = collections.Counter(s for s, _ in self.moves)
        states = {s for s, _ in self.moves} | set(self.moves.values())
        goal_entries = {s for (s, _), t in self.moves.items() if self.ends.get(t, 0) > 0}
        return into, states, goal_entries, {s for s in states if tried[s] < 4 and s not in self.ends}


def _hops_to(into: dict, sources: set) -> dict:
    """Fewest known moves from each state to any source: breadth-first search backwards along `into`."""
    hops, queue = {s: 0 for s in sources}, collections.deque(sources)
    while queue:
        t = queue.popleft()
        for s in into[t]:
            if s not in hops:
                hops[s] = hops[t] + 1
                queue.append(s)
    return hops
