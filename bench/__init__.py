"""Speed and memory of mainlib's paths against the stock Hugging Face stack, side by side in one run.

    python -m bench sft --out results/bench/h100.json       # one suite (updates its key in the file)
    python -m bench all --out results/bench/h100.json       # sft, generate, score, tdpo, memory
    python -m bench all --profile smoke --out /tmp/b.json  # tiny shapes, seconds: checks the harness on a CPU

Models are random-weight Llama shapes built from a config (`shapes.py`; no download): speed and memory
do not depend on the weights. Every suite times ours and the stock path on the same data in the same
process, after warm-up, and records tokens/s (or step time), peak GPU memory, their ratio, and a
correctness check of the fast path against the plain one on the same batch.
"""
