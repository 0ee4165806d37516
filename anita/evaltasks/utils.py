"""Loaders for anita's offline lm-eval tasks: JSONL files that sit next to this module (no Hub access)."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

def load_jsonl(data_file=None, **kwargs):
    "A `datasets.DatasetDict` with one split per distinct `split` value of the rows of `HERE/data_file`."
    import datasets
    if not data_file: raise ValueError("anita evaltasks: dataset_kwargs.data_file is required")
    path = HERE/data_file
    if not path.exists(): raise FileNotFoundError(f"{path}: evaluation data file not found")
    splits = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip(): continue
        try: row = json.loads(line)
        except json.JSONDecodeError as e: raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        splits.setdefault(row.pop("split", "test"), []).append(row)
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})

