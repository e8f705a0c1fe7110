"""Zero-shot tasks through lm-evaluation-harness: ARC-Easy, ARC-Challenge, PIQA, HellaSwag, LAMBADA (OpenAI).

Each task runs from local files when the data directory has them (no hub access at run time), with the
official lm-eval task's prompt, choices, target and metrics; otherwise the official task is used as is
(Hugging Face datasets, online). Local files (``paths.data_dir`` / ``OMNIQ_DATA_DIR``):

| task | files | split |
|---|---|---|
| arc_easy, arc_challenge | ``arc/ARC-{Easy,Challenge}-Test.jsonl`` (AI2's release) | test |
| piqa | ``piqa/valid.jsonl`` + ``piqa/valid-labels.lst`` | validation |
| hellaswag | ``hellaswag/hellaswag_val_full.txt.bz2`` (six lines an item: context, label, four endings) | validation |
| lambada_openai | ``lambada/lambada_test.jsonl`` (OpenAI's file, the official task's data) | test |

HellaSwag's text file keeps the context as the dataset's ``ctx`` (the second sentence fragment is not
capitalised) and strips only some WikiHow tags; lm-eval's preprocessing is re-applied and the last fragment
capitalised, which reproduces the official prompts except for a handful of items with unusual tags.
``limit`` takes the first N documents of each task (quick runs; always reported).
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "lambada_openai")
MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
LAMBADA_METRICS = [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                   {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(split: str, rows: list[dict]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def arc_rows(path: Path) -> list[dict]:
    """AI2's ARC jsonl in the fields of the Hugging Face ``allenai/ai2_arc`` dataset the official task reads."""
    rows = []
    for r in _jsonl(path):
        choices = r["question"]["choices"]
        rows.append({"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
                     "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
    return rows


def piqa_rows(root: Path) -> list[dict]:
    docs = _jsonl(root / "piqa" / "valid.jsonl")
    labels = [int(x) for x in (root / "piqa" / "valid-labels.lst").read_text().split()]
    if len(docs) != len(labels):
        raise ValueError(f"piqa: {len(docs)} questions but {len(labels)} labels in {root / 'piqa'}")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y} for d, y in zip(docs, labels, strict=True)]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag preprocessing (WikiHow bracket artifacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_context(line: str) -> str:
    """The official query capitalises the context's second fragment (ActivityNet items, which do not end with a
    full stop): upper-case the first letter after the last sentence break."""
    if line.endswith("."):
        return line
    i = line.rfind(". ")
    j = i + 2 if i >= 0 else line.find(": ") + 2
    if 0 <= j < len(line) and line[j].islower():
        line = line[:j] + line[j].upper() + line[j + 1:]
    return line


def hellaswag_rows(path: Path) -> list[dict]:
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")  # (the file has bytes after its stream)
    rows = []
    for k in range(0, len(lines) - 5, 6):
        label = int(lines[k + 1])
        rows.append({"query": hellaswag_preprocess(hellaswag_context(lines[k])),
                     "choices": [hellaswag_preprocess(e) for e in lines[k + 2 : k + 6]], "label": label})
    return rows


# each task's local files under the data directory
LOCAL_FILES = {
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "lambada_openai": ("lambada/lambada_test.jsonl",),
}


def task_list(setting) -> list[str]:
    """``eval.tasks`` as a list of names: a list, or one string of comma-separated names."""
    if setting is None:
        return []
    if isinstance(setting, str):
        return [t.strip() for t in setting.split(",") if t.strip()]
    return [str(t) for t in setting]


def check_tasks(tasks: list[str], limit, data_dir: str | Path | None) -> int | None:
    """Refuse unknown tasks, a bad ``eval.limit`` and tasks whose local files are missing (before any work);
    returns the limit as an integer (or None)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"eval.tasks: unknown zero-shot task(s) {unknown}; available: {', '.join(TASKS)} (a list, "
                         "e.g. eval.tasks=[arc_easy,piqa], or one name)")
    if limit is not None:
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise ValueError(f"eval.limit must be a positive number of documents per task or null, got {limit!r}") from None
        if limit < 1:
            raise ValueError(f"eval.limit must be a positive number of documents per task or null, got {limit}")
    from omniq_lightning.data import data_dir_from

    root = data_dir_from(data_dir)
    if root is not None:
        for task in tasks:
            missing = [f for f in LOCAL_FILES[task] if not (root / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"eval.tasks: {task} needs {', '.join(str(root / f) for f in missing)}, which is not there: put the "
                    f"file(s) under the data directory ({root}), or set paths.data_dir=null to let lm-evaluation-harness "
                    "fetch the task from the Hugging Face hub (online)")
    return limit


def local_tasks(root: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    """lm-eval task configs (as dicts) for the tasks whose files are under ``root``."""
    mc = dict(output_type="multiple_choice", metric_list=MC_METRICS, metadata={"version": 1.0})
    arc = dict(test_split="test", doc_to_text="Question: {{question}}\nAnswer:",
               doc_to_target="{{choices.label.index(answerKey)}}", doc_to_choice="{{choices.text}}", **mc)
    present = {t for t, files in LOCAL_FILES.items() if all((root / f).is_file() for f in files)}
    found: dict[str, Callable[[], dict[str, Any]]] = {}
    for task in ("arc_easy", "arc_challenge"):
        if task in present:
            arc_file = root / LOCAL_FILES[task][0]
            found[task] = lambda task=task, arc_file=arc_file: dict(
                task=f"local_{task}", custom_dataset=lambda **_: _dataset("test", arc_rows(arc_file)), **arc)
    if "piqa" in present:
        found["piqa"] = lambda: dict(
            task="local_piqa", custom_dataset=lambda **_: _dataset("validation", piqa_rows(root)),
            validation_split="validation", doc_to_text="Question: {{goal}}\nAnswer:", doc_to_target="label",
            doc_to_choice="{{[sol1, sol2]}}", **mc)
    if "hellaswag" in present:
        hs = root / LOCAL_FILES["hellaswag"][0]
        found["hellaswag"] = lambda: dict(
            task="local_hellaswag", custom_dataset=lambda **_: _dataset("validation", hellaswag_rows(hs)),
            validation_split="validation", doc_to_text="{{query}}", doc_to_target="{{label}}", doc_to_choice="choices",
            **mc)
    if "lambada_openai" in present:
        lambada = root / LOCAL_FILES["lambada_openai"][0]
        found["lambada_openai"] = lambda: dict(
            task="local_lambada_openai", custom_dataset=lambda **_: _dataset("test", _jsonl(lambada)),
            output_type="loglikelihood", test_split="test", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
            doc_to_target="{{' '+text.split(' ')[-1]}}", metric_list=LAMBADA_METRICS, metadata={"version": 1.0})
    return found


def zero_shot(model, tokenizer, tasks: list[str], data_dir: str | Path | None = None, limit: int | None = None,
              batch_size: int = 8, device: str = "cpu", max_length: int | None = None) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of ``model`` on ``tasks``: acc and acc_norm (LAMBADA: acc and perplexity), the number
    of documents, and where each task's data came from."""
    limit = check_tasks(tasks, limit, data_dir)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("zero-shot tasks need lm-evaluation-harness: pip install 'lm-eval>=0.4.8,<0.5'") from exc
    from omniq_lightning.data import data_dir_from

    root = data_dir_from(data_dir)
    local = local_tasks(root) if root is not None else {}
    configs = [local[t]() if t in local else t for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, bootstrap_iters=0, log_samples=False,
                                  task_manager=TaskManager(include_defaults=any(t not in local for t in tasks)))
    results = {}
    for task in tasks:
        key = f"local_{task}" if task in local else task
        r = out["results"][key]
        entry = {m: float(r[f"{m},none"]) for m in ("acc", "acc_norm", "perplexity") if f"{m},none" in r}
        entry["documents"] = int(out.get("n-samples", {}).get(key, {}).get("effective", 0)) or None
        entry["limit"] = limit
        entry["source"] = f"local files under {root}" if task in local else "lm-eval's task (Hugging Face datasets)"
        results[task] = entry
    return results
