"""Write the offline MMLU task YAMLs (mainlib/tasks/mmlu/): one task per subject, like lm-eval's `mmlu`
(same prompt, choices, few-shot split and metric), reading local CSVs through `mainlib.benchmarks.mmlu`;
and the same subjects in the cloze form (`mainlib_mmlu_cloze_*`, like lm-eval's `mmlu_continuation`: the
answer text is scored, not its letter), the form small models' cards report.

The subject list is lm-eval's own (its installed mmlu/default/*.yaml). Run it again after upgrading lm-eval.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval

import mainlib
from mainlib.benchmarks import BUNDLED_MMLU_SUBJECTS

OUT = Path(mainlib.__file__).parent / "tasks" / "mmlu"
# task-name infix -> (template, what the description calls the items, aggregated metrics); acc_norm is the
# answer's log-likelihood per byte, which the cloze form needs (the answers differ in length)
FORMS = {
    "": ("_template_yaml", "multiple choice questions", ("acc",)),
    "cloze_": ("_cloze_template_yaml", "questions", ("acc", "acc_norm")),
}


def main() -> None:
    default = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    subjects = sorted(p.stem.removeprefix("mmlu_") for p in default.glob("mmlu_*.yaml"))
    if len(subjects) != 57:
        raise SystemExit(f"expected lm-eval's 57 MMLU subjects in {default}, found {len(subjects)}")
    for old in OUT.glob("*mainlib_mmlu_*.yaml"):
        old.unlink()
    for form, (template, kind, metrics) in FORMS.items():
        for subject in subjects:
            words = subject.replace("_", " ")
            (OUT / f"mainlib_mmlu_{form}{subject}.yaml").write_text(
                f"include: {template}\n"
                f"task: mainlib_mmlu_{form}{subject}\n"
                f"task_alias: {subject}\n"
                f'description: "The following are {kind} (with answers) about {words}.\\n\\n"\n'
                f"dataset_kwargs:\n  subject: {subject}\n"
            )
        for suffix, members in (("", subjects), ("_bundled", list(BUNDLED_MMLU_SUBJECTS))):
            name = f"mainlib_mmlu_{form}".rstrip("_") + suffix
            tasks = "".join(f"  - mainlib_mmlu_{form}{s}\n" for s in members)
            aggregate = "".join(f"  - metric: {m}\n    weight_by_size: true\n" for m in metrics)
            (OUT / f"_{name}.yaml").write_text(
                f"group: {name}\ntask:\n{tasks}aggregate_metric_list:\n{aggregate}metadata:\n  version: 1.0\n"
            )
    print(f"wrote {len(subjects)} subject tasks in 2 forms and 4 groups to {OUT}")


if __name__ == "__main__":
    main()
