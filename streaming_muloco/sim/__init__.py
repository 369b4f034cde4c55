"""The single-process K-replica simulator and its in-process collectives (quality sweeps).

It runs the very same outer loop (`OuterSync`, schedule, exchange, compression) as the
distributed path; only the network (`inprocess.py`) and the inner optimizer's host
(`inner_optimizer.py`: what DeepSpeed builds from the JSON, in one process) differ.
"""
from .simulator import ModuleShard, simulate

__all__ = ["simulate", "ModuleShard"]
