"""The reference study (`make study`): does MAIN's mutual filter select better-aligned pairs and train a better
model, do the mutual-alignment rounds help, and do MuSC's token weights beat plain DPO — measured with 95%
bootstrap intervals on the bundled model, on this machine.

    python -m mainlib.study --profile smoke      # the whole path on tiny sizes (minutes)
    python -m mainlib.study --profile cpu        # the committed study (hours; resumable, run it again)

What is measured is declared in `sweeps/study_main.yaml` and `sweeps/study_musc.yaml` (recipe, per-profile config
overrides and sizes, `spec`); the work is a list of cells (`main.cells`, `musc.cells`), each one JSON file in
`runs/study/<profile>/cells/` written when the cell finishes (`cells.run_cells`), so an interrupted run loses
at most the cell in progress, and that cell resumes from its pipeline stages and lm-eval's request cache.
`report` turns the cells into the claims' tables and verdicts (notebook 07 writes them to results/study/).
"""
