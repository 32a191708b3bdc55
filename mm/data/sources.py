"""Where samples come from: a ``data.txt`` of ``dataset_root,annotation`` lines (several lines,
several datasets), each annotation an OpenSoraPlan-style JSON list or a DiffSynth-style
``metadata.csv`` (``video,prompt``).

Entries whose files are missing are counted (by dataset) when the list is built and left out;
an empty result is an error naming the data.txt. A data.txt line whose dataset root is not a
directory, an annotation file that is missing, not UTF-8 or not valid JSON (named with line and
column), and records without ``path`` and ``cap`` are errors naming the data.txt line and the file.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mm.data.decoding import is_image


@dataclass(frozen=True)
class Sample:
    path: str  # absolute
    caption: str
    num_frames: int | None = None  # from the annotation, when given
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    aesthetic: float | None = None

    @property
    def is_image(self) -> bool:
        return is_image(self.path)


def _from_json(root: Path, annotation: Path) -> list[Sample]:
    try:
        records = json.loads(annotation.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {str(annotation)!r}: not valid JSON ({e.msg} at line {e.lineno}, "
                         f"column {e.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"annotation file {str(annotation)!r}: an annotation JSON must be a list of records, "
                         f"got {type(records).__name__}")
    samples = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"annotation file {str(annotation)!r} record {i}: expected a JSON object with 'path' "
                             f"and 'cap', got {rec!r:.80}")
        if "path" not in rec or "cap" not in rec:
            raise ValueError(f"{annotation} record {i}: needs 'path' and 'cap' (got keys {sorted(rec)})")
        cap = rec["cap"] if isinstance(rec["cap"], str) else rec["cap"][0]
        res = rec.get("resolution") or {}
        samples.append(Sample(str(root / rec["path"]), cap, rec.get("num_frames"), rec.get("fps"),
                              res.get("height"), res.get("width"), rec.get("aesthetic")))
    return samples


def _from_csv(root: Path, annotation: Path) -> list[Sample]:
    with annotation.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"video", "prompt"} <= set(reader.fieldnames):
            raise ValueError(f"{annotation}: a metadata.csv needs the columns 'video' and 'prompt' "
                             f"(got {reader.fieldnames})")
        return [Sample(str(root / row["video"]), row["prompt"]) for row in reader]


def read_data_txt(data_txt: str | Path) -> tuple[list[Sample], Counter]:
    """All samples of the datasets a data.txt lists, and the count of entries left out by reason."""
    data_txt = Path(data_txt)
    if not data_txt.is_file():
        raise FileNotFoundError(f"dataset_param.basic_parameters.data_path = {str(data_txt)!r}: no such file")
    samples: list[Sample] = []
    dropped: Counter = Counter()
    try:
        lines = data_txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"dataset_param.basic_parameters.data_path = {str(data_txt)!r}: not UTF-8 text (byte "
                         f"{e.start}: {e.reason})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            raise ValueError(f"{data_txt}:{number}: expected 'dataset_root,annotation_file', got {line!r}")
        root, annotation = Path(parts[0]), Path(parts[1])
        if not root.is_dir():
            raise FileNotFoundError(f"{data_txt}:{number}: dataset root {str(root)!r} is not a directory "
                                    f"({'no such path' if not root.exists() else 'a file'}); valid: the folder the "
                                    "annotation's paths are relative to")
        if not annotation.is_file():
            raise FileNotFoundError(f"{data_txt}:{number}: annotation file {str(annotation)!r} does not exist")
        try:
            found = _from_csv(root, annotation) if annotation.suffix == ".csv" else _from_json(root, annotation)
        except UnicodeDecodeError as e:
            raise ValueError(f"{data_txt}:{number}: annotation file {str(annotation)!r}: not UTF-8 text (byte "
                             f"{e.start}: {e.reason})") from None
        except (ValueError, csv.Error) as e:
            raise ValueError(f"{data_txt}:{number}: {e}") from None
        for sample in found:
            if Path(sample.path).is_file():
                samples.append(sample)
            else:
                dropped["missing at start-up"] += 1
    if not samples:
        raise ValueError(f"{data_txt}: no usable samples ({dict(dropped) or 'the annotations are empty'})")
    return samples, dropped
