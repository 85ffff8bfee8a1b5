"""The eval bundle of the CORE metric, in the layout DCLM and nanochat use:

    core.yaml            icl_tasks: label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter
    eval_meta_data.csv   one row per task: "Eval Task" (the label), "Random baseline" (percent)
    eval_data/<uri>      the task's items, one JSON object a line

Read from a folder the user gives, or downloaded once (the zip nanochat's `scripts/base_eval.py`
downloads) into the gpt2lab cache and unpacked there. Every item is checked for the fields its
task type needs when the bundle is read, so a bad line is reported before any scoring.
"""

from __future__ import annotations

import csv
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import cache_dir, download, file_sha256
from ..errors import UserError
from ..files import write_atomic

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# Neither nanochat nor DCLM publishes a checksum of the zip: the first download's sha256 is
# recorded beside it and every later use is checked against that record (as for HellaSwag).
BUNDLE_SHA256: str | None = None
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# The fields each task type reads from an item, and whether each is text or a list of texts.
ITEM_FIELDS = {
    "multiple_choice": {"query": "text", "choices": "texts", "gold": "index"},
    "schema": {"context_options": "texts", "continuation": "text", "gold": "index"},
    "language_modeling": {"context": "text", "continuation": "text"},
}
OFFLINE_HINT = f"download {BUNDLE_URL} elsewhere, unzip it and pass its eval_bundle folder with --bundle DIR"


@dataclass(frozen=True)
class TaskSpec:
    label: str
    dataset_uri: str
    num_fewshot: int
    task_type: str
    delimiter: str
    random_baseline: float  # percent, as eval_meta_data.csv gives it


@dataclass(frozen=True)
class Item:
    line: int  # 1-based line in the task's file, for messages
    fields: dict[str, Any]  # the item's texts (numbers written as text) and gold index


@dataclass(frozen=True)
class Bundle:
    folder: Path
    tasks: tuple[TaskSpec, ...]

    def select(self, labels: list[str] | None) -> tuple[TaskSpec, ...]:
        """The tasks named in `labels` (None: all), in the bundle's order."""
        if not labels:
            return self.tasks
        known = {task.label: task for task in self.tasks}
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise UserError(
                f"unknown CORE task {unknown[0]!r}: {self.folder / 'core.yaml'} has "
                f"{', '.join(known)}; pick labels from that list"
            )
        return tuple(task for task in self.tasks if task.label in labels)

    def items(self, task: TaskSpec) -> list[Item]:
        return read_items(self.folder / "eval_data" / task.dataset_uri, task)


# ---- core.yaml and eval_meta_data.csv ------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; an eval bundle holds core.yaml, eval_meta_data.csv and "
                        f"eval_data/ ({OFFLINE_HINT})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; it is not a bundle's core.yaml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{path}{where} is not valid YAML ({problem}); fix the file") from None


def _task_spec(entry: Any, index: int, path: Path, baselines: dict[str, float], csv_path: Path) -> TaskSpec:
    where = f"{path}: icl_tasks entry {index + 1}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} is not a mapping; each task needs label, dataset_uri, num_fewshot, icl_task_type")
    for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
        if key not in entry:
            raise UserError(f"{where} has no {key!r}; each task needs label, dataset_uri, num_fewshot, icl_task_type")
    label, uri, kind = entry["label"], entry["dataset_uri"], entry["icl_task_type"]
    if not isinstance(label, str) or not isinstance(uri, str) or not uri:
        raise UserError(f"{where}: label and dataset_uri must be text")
    where = f"{path}: task {label!r}"
    if kind not in TASK_TYPES:
        raise UserError(f"{where} has icl_task_type {kind!r}, which CORE does not know; use one of "
                        f"{', '.join(TASK_TYPES)}")
    # DCLM's file lists the shot counts to try; CORE (and nanochat) uses the first.
    shots = entry["num_fewshot"]
    shots = shots[0] if isinstance(shots, list) and shots else shots
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise UserError(f"{where}: num_fewshot {entry['num_fewshot']!r} is not a count (a number >= 0, or a list of them)")
    delimiter = entry.get("continuation_delimiter", " ")
    if not isinstance(delimiter, str):
        raise UserError(f"{where}: continuation_delimiter {delimiter!r} is not text")
    if label not in baselines:
        raise UserError(f"{csv_path} has no row for task {label!r} (column 'Eval Task'); add its random baseline")
    if not 0 <= baselines[label] < 100:
        raise UserError(f"{csv_path}: the random baseline of {label!r} is {baselines[label]}; give a percent from 0 "
                        "up to (not including) 100")
    return TaskSpec(label, uri, shots, kind, delimiter, baselines[label])


def _read_baselines(path: Path) -> dict[str, float]:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or ())
            if missing:
                raise UserError(f"{path} has no column {sorted(missing)[0]!r}; the bundle's eval_meta_data.csv "
                                "needs 'Eval Task' and 'Random baseline'")
            baselines = {}
            for row in reader:
                try:
                    baselines[row["Eval Task"]] = float(row["Random baseline"])
                except (TypeError, ValueError):
                    raise UserError(f"{path} line {reader.line_num}: random baseline {row['Random baseline']!r} "
                                    "is not a number (percent)") from None
            return baselines
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; an eval bundle holds core.yaml, eval_meta_data.csv and "
                        f"eval_data/ ({OFFLINE_HINT})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; it is not a bundle's eval_meta_data.csv") from None


def load_bundle(folder: str | Path) -> Bundle:
    """The bundle in `folder`, its task list and baselines checked (items are read per task)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"eval bundle folder {folder} does not exist ({OFFLINE_HINT})")
    config_path, csv_path = folder / "core.yaml", folder / "eval_meta_data.csv"
    config = _read_yaml(config_path)
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{config_path} has no list 'icl_tasks'; it is not a CORE bundle's core.yaml")
    baselines = _read_baselines(csv_path)
    tasks = tuple(_task_spec(entry, i, config_path, baselines, csv_path) for i, entry in enumerate(entries))
    labels = [task.label for task in tasks]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"{config_path} lists task {repeated[0]!r} twice; give each task its own label")
    return Bundle(folder, tasks)


# ---- the items ----------------------------------------------------------------------------------


def _as_text(value: Any) -> str | None:
    # The reference renders with Jinja, which writes a number as str() does.
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def parse_item(text: str, line: int, path: Path, task: TaskSpec) -> Item:
    where = f"{path} line {line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{where} is not valid JSON ({error.msg} at column {error.colno}); fix or remove the line") from None
    needed = ITEM_FIELDS[task.task_type]
    if not isinstance(record, dict):
        raise UserError(f"{where} is not a JSON object; a {task.task_type} item has {', '.join(needed)}")
    fields: dict[str, Any] = {}
    for name, kind in needed.items():
        if name not in record:
            raise UserError(f"{where} has no {name!r} field; a {task.task_type} item (task {task.label!r}) "
                            f"needs {', '.join(needed)}")
        value = record[name]
        if kind == "text":
            fields[name] = _as_text(value)
        elif kind == "texts" and isinstance(value, list) and value:
            texts = [_as_text(v) for v in value]
            fields[name] = None if None in texts else texts
        elif kind == "index" and isinstance(value, int) and not isinstance(value, bool):
            fields[name] = value
        else:
            fields[name] = None
        if fields[name] is None:
            expected = {"text": "a string", "texts": "a non-empty list of strings", "index": "an integer"}[kind]
            raise UserError(f"{where}: {name!r} should be {expected}, got {json.dumps(value)[:60]}")
    options = fields.get("choices") or fields.get("context_options")
    if "gold" in fields and not 0 <= fields["gold"] < len(options):
        raise UserError(f"{where}: gold {fields['gold']} is not the index of one of its {len(options)} options")
    return Item(line, fields)


def read_items(path: Path, task: TaskSpec) -> list[Item]:
    """The items of a task's file, each line checked; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            items = [parse_item(text, number, path, task) for number, text in enumerate(handle, start=1)
                     if text.strip()]
    except FileNotFoundError:
        raise UserError(f"{path}, the data of task {task.label!r} (its dataset_uri), does not exist; "
                        "the bundle is incomplete") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason}); the bundle is damaged") from None
    if not items:
        raise UserError(f"{path} holds no items; task {task.label!r} has nothing to score")
    return items


# ---- the download ---------------------------------------------------------------------------------


def _unpack(archive: Path, target: Path) -> None:
    """Unzip `archive`'s eval_bundle folder as `target`, whole or not at all."""
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".unpack-") as temp:
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.namelist():
                    # A member outside the archive's own folder would be written elsewhere on disk.
                    if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                        raise UserError(f"{archive} holds the path {member!r}, outside its folder; it is not the "
                                        f"eval bundle ({OFFLINE_HINT})")
                bundle.extractall(temp)
            unpacked = Path(temp) / "eval_bundle"
            if not (unpacked / "core.yaml").is_file():
                raise UserError(f"{archive} has no eval_bundle/core.yaml; it is not the eval bundle ({OFFLINE_HINT})")
            try:
                unpacked.rename(target)
            except OSError:
                if not target.is_dir():  # else another process (a rank beside this one) unpacked it first
                    raise
    except zipfile.BadZipFile:
        raise UserError(f"{archive} is not a zip file, so not the eval bundle ({OFFLINE_HINT})") from None


def cached_bundle() -> Path:
    """The eval bundle unpacked in the gpt2lab cache, downloaded on first use.

    The zip's sha256 is recorded beside it at the first download; a later download (the zip
    deleted or damaged before it was unpacked) must match that record. The folder takes its name
    only when unpacked whole, so one that exists is complete."""
    target = cache_dir() / "core" / "eval_bundle"
    if target.is_dir():
        return target
    archive_name = "core/eval_bundle.zip"
    sidecar = cache_dir() / (archive_name + ".sha256")
    recorded = BUNDLE_SHA256
    if recorded is None and sidecar.is_file():
        recorded = sidecar.read_text().strip() or None
    archive = download(BUNDLE_URL, archive_name, recorded, hint=OFFLINE_HINT)
    if recorded is None:
        digest = file_sha256(archive)
        write_atomic(sidecar, lambda p: p.write_text(digest + "\n"))
    try:
        _unpack(archive, target)
    except UserError:
        # A first download that is not the bundle must not become the record later ones match.
        if recorded is None:
            sidecar.unlink(missing_ok=True)
            archive.unlink(missing_ok=True)
        raise
    return target
