"""mainlib: MAIN (mutual alignment) and MuSC (self-contrastive) instruction tuning, notebook first.

Modules, one concern each: `paths` (env vars and cache locations), `models` (loading, LoRA/QLoRA),
`prompts` (forward/reverse templates), `data` (pairs, loaders, cleaning, bundled pack), `sft`
(weighted forward/reverse SFT), `generate` (batched sampling), `results` (JSON with provenance),
`plots`.
"""

__version__ = "0.1.0"
