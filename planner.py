"""The context model: the lake exactly as a context of episodes describes it, and a planner on it.

Frozen Lake is deterministic, so every step written in a context is a fact: (s, a) leads to s', an episode ended on
entering s' with reward r. `ContextModel` collects those facts, with no geometry (a state is only a number, as for the
model). Two users:
- the cpu preset's facts target (compact.context_facts, a training target the model must infer, never an input):
  `facts(s)` says for each of the 4 moves of s whether the context shows it untried (0), a dead end (1: a hole or a
  bump into the edge) or open (2);
- the context-planner baseline (baselines.PlannerPolicy): an optimistic model-based planner (R-max, Brafman &
  Tennenholtz 2002) on the same facts, what a learner could do with exactly the model's context:

    Q(h, s, a) = 1                       (s, a) is known to enter a goal
               = 0                       (s, a) is known to enter a hole
               = u = γ^K                 (s, a) is untried: "worth a goal K steps away"
               = γ · max_a' Q(h, s', a') (s, a) is known to lead to s'

The latest evidence about an (s, a) wins (a state an episode walked on is not terminal), the rule a context that
holds the end of one map's set and the start of the next needs. Values are exact by breadth-first search: on a
deterministic lake V(s) = max(γ^d_goal(s), u · γ^d_untried(s)), d the fewest known non-terminal moves from s to a
state with a goal-entering (an untried) move.
"""
import collections
from dataclasses import dataclass, field


@dataclass
class ContextModel:
    """The lake as the context describes it so far; `q` plans on it (values cached until the next new fact)."""
    moves: dict = field(default_factory=dict)  # (s, a) -> s', the latest outcome written in the context
    ends: dict = field(default_factory=dict)   # s -> reward of an episode that terminated on entering s
    _plans: dict = field(default_factory=dict, repr=False)  # (γ, untried) -> V, until a new fact

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

    def facts(self, s: int) -> list[int]:
        """[what the context shows about a] for a in 0..3: 0 untried, 1 a dead end (known to enter a hole or to bump
        into the edge), 2 open (known to reach another tile or the goal): the one-lookup facts of the move."""
        out = []
        for a in range(4):
            t = self.moves.get((s, a))
            out.append(0 if t is None else 1 if t == s or self.ends.get(t, 1) == 0 else 2)
        return out

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
