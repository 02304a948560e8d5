"""The baselines an in-context RL model must beat, as policies of evaluate.py's harness (`run_episodes`).

Each runs under exactly the paper's warm-up schedule and random stream that the model gets (evaluate.py), one row
per map, with the four methods the harness calls (reset, add_context, greedy_actions, observe):
- RandomPolicy: a uniform random action, the floor.
- QLearningPolicy: tabular Q-learning from scratch on the same 30 episodes; what a classical RL agent learns from
  the same experience (an ICRL model is interesting only above it).
- PlannerPolicy: an optimistic (R-max) planner on exactly what its own history shows (planner.py): what a learner
  with a perfect reading of the same context could do (ours, not the paper's).
- OraclePolicy: a shortest path on the known map (BFS), the ceiling.
"""
import collections
import random

import frozenlake
import planner


class RandomPolicy:
    name = "random"

    def __init__(self, seed=0):
        self.seed = seed

    def reset(self, n_rows):  # one stream per row: a row's draws do not depend on which other rows are still playing
        self.rngs = [random.Random(f"random-policy/{self.seed}/{row}") for row in range(n_rows)]

    def add_context(self, row, episode):
        pass

    def greedy_actions(self, rows, maps, episodes):
        return [int(self.rngs[row].random() * 4) for row in rows]

    def observe(self, row, episode, terminated, done):
        pass


class OraclePolicy:
    """Always a shortest-path action (BFS over the known map); the first one when several tie."""
    name = "oracle"

    def reset(self, n_rows):
        self.tables = {}

    def add_context(self, row, episode):
        pass

    def greedy_actions(self, rows, maps, episodes):
        actions = []
        for desc, ep in zip(maps, episodes):
            key = tuple(desc)
            if key not in self.tables:
                self.tables[key] = frozenlake.optimal_actions(desc)
            best = self.tables[key][ep.observations[-1]]
            actions.append(best[0] if best else frozenlake.LEFT)
        return actions

    def observe(self, row, episode, terminated, done):
        pass


class QLearningPolicy:
    """Tabular Q-learning from scratch per map: Q(s,a) += α (r + γ max_a' Q(s',a') [not terminal] - Q(s,a))."""
    name = "q-learning"

    def __init__(self, lr=0.5, gamma=0.9, seed=0):
        self.lr, self.gamma, self.seed = lr, gamma, seed

    def reset(self, n_rows):
        self.q = [collections.defaultdict(lambda: [0.0] * 4) for _ in range(n_rows)]
        self.rngs = [random.Random(f"q-learning-ties/{self.seed}/{row}") for row in range(n_rows)]

    def add_context(self, row, episode):
        for t in range(len(episode.actions)):
            terminal = t == len(episode.actions) - 1 and not episode.truncated
            self._update(row, episode.observations[t], episode.actions[t], episode.rewards[t],
                         episode.observations[t + 1], terminal)

    def greedy_actions(self, rows, maps, episodes):
        actions = []
        for row, ep in zip(rows, episodes):
            q = self.q[row][ep.observations[-1]]
            best = [a for a in range(4) if q[a] == max(q)]
            actions.append(best[int(self.rngs[row].random() * len(best))])  # random tie-break: a zero table explores
        return actions

    def observe(self, row, episode, terminated, done):
        self._update(row, episode.observations[-2], episode.actions[-1], episode.rewards[-1],
                     episode.observations[-1], terminated)

    def _update(self, row, s, a, r, s_next, terminal):
        q = self.q[row]
        target = r + (0.0 if terminal else self.gamma * max(q[s_next]))  # truncation is not terminal: bootstrap
        q[s][a] += self.lr * (target - q[s][a])


class PlannerPolicy:
    """The context planner of planner.py acting on its own history. Ties broken at random."""
    name = "planner"

    def __init__(self, gamma=0.9, untried=0.9 ** 8, seed=0):
        self.gamma, self.untried, self.seed = gamma, untried, seed

    def reset(self, n_rows):
        self.lakes = [planner.ContextModel() for _ in range(n_rows)]
        self.rngs = [random.Random(f"planner-ties/{self.seed}/{row}") for row in range(n_rows)]

    def add_context(self, row, episode):
        self.lakes[row].learn_episode(episode)

    def greedy_actions(self, rows, maps, episodes):
        actions = []
        for row, ep in zip(rows, episodes):
            q = self.lakes[row].q(ep.observations[-1], self.gamma, self.untried)
            best = [a for a in range(4) if q[a] == max(q)]
            actions.append(best[int(self.rngs[row].random() * len(best))])
        return actions

    def observe(self, row, episode, terminated, done):
        self.lakes[row].learn(episode.observations[-2], episode.actions[-1], episode.observations[-1], terminated,
                              episode.rewards[-1])
