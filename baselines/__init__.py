"""Non-learning prefetch policies and oracles: no prefetch, static buffer, periodic (MassiveGNN), Belady MIN."""
