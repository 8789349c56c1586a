"""The decision-quality objectives, defined once for every report of the bench.

They are the issue's bounds; a cell that misses any of them is lost, and no report may
call a loss "met".
"""

CLEAN_GAP = -0.02
"""Clean: lowest BCSFL - FedAvg accuracy in any configuration."""
CLEAN_MEDIAN_GAP = -0.005
"""Clean: lowest median of BCSFL - FedAvg over the configurations."""
ATTACK_GAP = -0.03
"""Attacked: lowest BCSFL - best baseline accuracy in any configuration."""
BACKDOOR_ACCURACY_GAP = -0.01
"""Backdoor at alpha >= 0.3 and IID: lowest BCSFL - FedAvg clean accuracy."""
BACKDOOR_MILD = 0.05
"""Backdoor success allowed at alpha >= 0.3 and IID."""
BACKDOOR_SKEWED = 0.20
"""Backdoor success allowed at alpha <= 0.1 (and no more than the best baseline's)."""
HONEST_EXCLUDED = 0.10
"""Honest clients left out per round (mean over a configuration's rounds), at most."""
HONEST_EXCLUDED_MEAN = 0.05
"""Honest clients left out per round, mean over the configurations, at most."""
STAKE_RATIO = 3.0
"""Largest stake over the median stake at the end of a clean run, at most."""
ROLLBACKS = 2
"""Rollbacks in any run, at most."""
DISTINCT_VALIDATORS = 15
"""Distinct validators that serve over 20 rounds with at least 20 clients, at least."""
