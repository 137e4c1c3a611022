"""Write the offline MMLU task YAMLs (mainlib/tasks/mmlu/): one task per subject, like lm-eval's `mmlu`
(same prompt, choices, few-shot split and metric), reading local CSVs through `mainlib.benchmarks.mmlu`.

The subject list is lm-eval's own (its installed mmlu/default/*.yaml). Run it again after upgrading lm-eval.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval

import mainlib
from mainlib.benchmarks import BUNDLED_MMLU_SUBJECTS

OUT = Path(mainlib.__file__).parent / "tasks" / "mmlu"


def main() -> None:
    default = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    subjects = sorted(p.stem.removeprefix("mmlu_") for p in default.glob("mmlu_*.yaml"))
    if len(subjects) != 57:
        raise SystemExit(f"expected lm-eval's 57 MMLU subjects in {default}, found {len(subjects)}")
    for old in OUT.glob("mainlib_mmlu_*.yaml"):
        old.unlink()
    for subject in subjects:
        words = subject.replace("_", " ")
        (OUT / f"mainlib_mmlu_{subject}.yaml").write_text(
            "include: _template_yaml\n"
            f"task: mainlib_mmlu_{subject}\n"
            f"task_alias: {subject}\n"
            f'description: "The following are multiple choice questions (with answers) about {words}.\\n\\n"\n'
            f"dataset_kwargs:\n  subject: {subject}\n"
        )
    for name, members in (("mainlib_mmlu", subjects), ("mainlib_mmlu_bundled", list(BUNDLED_MMLU_SUBJECTS))):
        tasks = "".join(f"  - mainlib_mmlu_{s}\n" for s in members)
        (OUT / f"_{name}.yaml").write_text(
            f"group: {name}\ntask:\n{tasks}aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
            "metadata:\n  version: 1.0\n"
        )
    print(f"wrote {len(subjects)} subject tasks and 2 groups to {OUT}")


if __name__ == "__main__":
    main()
