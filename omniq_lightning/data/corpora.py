"""Text corpora for calibration and evaluation: the local data directory first, Hugging Face second.

Each corpus has two roles: ``"calib"`` (the text calibration windows are drawn from) and ``"eval"``
(the perplexity text). Locally (``paths.data_dir`` / ``OMNIQ_DATA_DIR``):

| corpus      | eval file                        | calib file                               |
|-------------|----------------------------------|------------------------------------------|
| wikitext2   | wikitext2/test.raw.txt           | wikitext2/train.raw.txt, else valid.tokens.txt |
| ptb         | ptb/ptb.test.txt                 | ptb/ptb.train.txt, else ptb.valid.txt    |
| c4          | c4/c4-validation.jsonl           | c4/c4-train.jsonl                        |
| tinystories | tinystories/valid.sample.txt, second half of the stories | its first half   |

Online, the same roles come from Hugging Face datasets: wikitext-2-raw-v1 test/train, ptb_text_only
test/train, the allenai/c4 validation shard 0 and train shard 0 used by the GPTQ/OmniQuant papers, and
TinyStories validation/train. How text becomes tokens follows each corpus's convention: WikiText-2 and
PTB join their lines with blank lines and are tokenized as one text; TinyStories tokenizes each story
with its own BOS (as the model was trained); C4 joins its documents with spaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROLES = ("calib", "eval")


@dataclass(frozen=True)
class CorpusText:
    """Documents plus how to tokenize them: ``joiner`` set = join and tokenize once; None = per document."""

    name: str
    role: str
    documents: list[str]
    joiner: str | None
    origin: str


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _local_wikitext2(root: Path, role: str) -> tuple[list[str], Path] | None:
    if role == "eval":
        f = root / "wikitext2" / "test.raw.txt"
        return ([f.read_text(encoding="utf-8")], f) if f.is_file() else None
    for name in ("train.raw.txt", "valid.tokens.txt"):
        f = root / "wikitext2" / name
        if f.is_file():
            return [f.read_text(encoding="utf-8")], f
    return None


def _local_ptb(root: Path, role: str) -> tuple[list[str], Path] | None:
    names = ("ptb.test.txt",) if role == "eval" else ("ptb.train.txt", "ptb.valid.txt")
    for name in names:
        f = root / "ptb" / name
        if f.is_file():
            return [line.strip() for line in _read_lines(f)], f
    return None


def _local_c4(root: Path, role: str) -> tuple[list[str], Path] | None:
    f = root / "c4" / ("c4-validation.jsonl" if role == "eval" else "c4-train.jsonl")
    if not f.is_file():
        return None
    docs = [json.loads(line)["text"] for line in _read_lines(f) if line.strip()]
    return (docs[:1100] if role == "eval" else docs), f


def _local_tinystories(root: Path, role: str) -> tuple[list[str], Path] | None:
    f = root / "tinystories" / "valid.sample.txt"
    if not f.is_file():
        return None
    stories = [s.strip() for s in _read_lines(f) if s.strip()]
    half = len(stories) // 2
    return (stories[half:] if role == "eval" else stories[:half]), f


def _hub(path: str, config: str | None, split: str, field: str, data_files: dict | None = None) -> list[str]:
    from datasets import load_dataset  # imported lazily: only the online path needs it

    ds = load_dataset(path, config, split=split, data_files=data_files)
    return list(ds[field])


def _hub_wikitext2(role: str) -> list[str]:
    return ["\n\n".join(_hub("wikitext", "wikitext-2-raw-v1", "test" if role == "eval" else "train", "text"))]


def _hub_ptb(role: str) -> list[str]:
    return _hub("ptb_text_only", "penn_treebank", "test" if role == "eval" else "train", "sentence")


def _hub_c4(role: str) -> list[str]:
    if role == "eval":
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        return _hub("allenai/c4", None, "validation", "text", files)[:1100]
    return _hub("allenai/c4", None, "train", "text", {"train": "en/c4-train.00000-of-01024.json.gz"})


def _hub_tinystories(role: str) -> list[str]:
    return _hub("roneneldan/TinyStories", None, "validation" if role == "eval" else "train", "text")


@dataclass(frozen=True)
class CorpusSpec:
    local: Callable[[Path, str], tuple[list[str], Path] | None]
    hub: Callable[[str], list[str]]
    hub_name: str
    joiner: str | None
    local_hint: str


CORPORA: dict[str, CorpusSpec] = {
    "wikitext2": CorpusSpec(_local_wikitext2, _hub_wikitext2, "wikitext (wikitext-2-raw-v1)", "\n\n",
                            "wikitext2/test.raw.txt (eval), wikitext2/train.raw.txt or valid.tokens.txt (calibration)"),
    "ptb": CorpusSpec(_local_ptb, _hub_ptb, "ptb_text_only", "\n\n",
                      "ptb/ptb.test.txt (eval), ptb/ptb.train.txt or ptb.valid.txt (calibration)"),
    "c4": CorpusSpec(_local_c4, _hub_c4, "allenai/c4 (en shard 0)", " ",
                     "c4/c4-validation.jsonl (eval), c4/c4-train.jsonl (calibration), one {\"text\": ...} per line"),
    "tinystories": CorpusSpec(_local_tinystories, _hub_tinystories, "roneneldan/TinyStories", None,
                              "tinystories/valid.sample.txt (one story per line)"),
}


def data_dir_from(setting: str | os.PathLike | None) -> Path | None:
    """The data directory: the explicit setting, else ``OMNIQ_DATA_DIR``, else None (online only)."""
    value = setting if setting not in (None, "") else os.environ.get("OMNIQ_DATA_DIR")
    return Path(value).expanduser() if value else None


def load_corpus(name: str, role: str, data_dir: str | os.PathLike | None = None, online: bool = True) -> CorpusText:
    """The documents of corpus ``name`` for ``role``; local files first, then Hugging Face datasets."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus '{name}'; available corpora: {', '.join(CORPORA)}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    spec = CORPORA[name]
    root = data_dir_from(data_dir)
    if root is not None:
        found = spec.local(root, role)
        if found is not None:
            docs, path = found
            return CorpusText(name, role, docs, spec.joiner, f"local file {path}")
    hub_error = "online loading disabled"
    if online:
        try:
            return CorpusText(name, role, spec.hub(role), spec.joiner, f"Hugging Face dataset {spec.hub_name}")
        except Exception as exc:  # noqa: BLE001 - reported below with both places looked
            hub_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    local_where = f"data directory {root}" if root is not None else "no data directory set (OMNIQ_DATA_DIR)"
    raise FileNotFoundError(
        f"corpus '{name}' ({role}) not found. Looked in: {local_where}, expecting {spec.local_hint}; "
        f"and the Hugging Face dataset {spec.hub_name} ({hub_error}). Provide it by putting those files under "
        "OMNIQ_DATA_DIR (or paths.data_dir), or run online so the dataset can be downloaded"
    )
