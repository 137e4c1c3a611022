"""MuSC: multi-granularity self-contrastive training (ALGORITHMS.md §2).

- `prompts`: the few-shot prompts the policy answers (our own demos).
- `coarse`: constraint-aware preference pairs (self-instruct, decompose, corrupt, recombine, respond).
- `tokens`: per-token weights from how much each token depends on the constraints (KL, bi-KL, PMI).
- `tdpo`: token-weighted DPO on TRL's `DPOTrainer`.
- `pipeline`: the resumable MuSC stages (`run_musc`, notebook 04).
"""
