"""A prefetch agent of one's own, in one file, for rudder to load by reference (docs/agents.md, "Write your own agent"):

    python evaluate.py --agents periodic,./my_agent.py:MyAgent --agent-kwargs threshold=0.5
    python train.py gnn --graph synth-tiny --agent ./my_agent.py:MyAgent --agent-kwargs threshold=0.5

The rule: refresh the buffer (admit the top ranked candidates that have a slot, as MassiveGNN's periodic policy
does every window) only after a window whose miss rate -- remote rows pulled on demand over remote rows needed --
exceeded ``threshold``; otherwise keep the buffer and save the prefetch traffic.
"""

import numpy as np
from rudder.env.contract import BufferSettings, admissible, top_j


class MyAgent:
    name = "missgate"  # its label in tables and plots
    settings = BufferSettings()  # optional: the buffer it plays with (here the run's own)

    def __init__(self, threshold: float = 0.5, fraction: float = 1.0):
        self.threshold = float(threshold)  # refresh after windows missing more than this share of remote rows
        self.fraction = float(fraction)  # share of the admissible candidates a refresh admits

    def reset(self) -> None:
        self.refreshes = 0

    def act(self, observation: dict, info: dict) -> np.ndarray:
        window = info["window"]  # sums over the last decision window (rudder.env.contract.WindowInfo)
        miss_rate = window["misses"] / max(window["remote_sampled"], 1)
        k = observation["candidates"].shape[0]  # the action is MultiBinary(K) over info["candidate_ids"]
        if miss_rate <= self.threshold:
            return top_j(k, 0)
        self.refreshes += 1
        return top_j(k, round(self.fraction * admissible(info)))
