"""MuSC: multi-granularity self-contrastive training (ALGORITHMS.md §2).

`coarse`: constraint-aware preference pairs (decompose, corrupt, recombine, respond).
"""
