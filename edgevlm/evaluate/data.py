"""Evaluation data: the items CSV and the choices list, checked before anything runs."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import DataError

#: Columns every items CSV must have.
REQUIRED_COLUMNS = ("image", "label")
#: Problems listed in one refusal before "and N more".
MAX_LISTED = 5


@dataclass(frozen=True)
class Item:
    """One row of the items CSV.

    Attributes:
        row: the row's line number in the CSV (the header is line 1).
        image: the image path as written (relative to the CSV's folder, or absolute).
        path: the image path resolved against the CSV's folder.
        label: the expected answer (one of the choices).
        fields: the row's other columns (usable as ``{column}`` in prompts).
    """

    row: int
    image: str
    path: Path
    label: str
    fields: dict[str, str]


def load_choices(path: str | Path) -> tuple[str, ...]:
    """The choices of a text file: one a line; blank lines and lines starting with ``#`` skipped.

    Raises:
        DataError: the file is missing, has fewer than two choices or repeats one (naming the line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"choices file {path} not found: give a text file with one choice a line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"choices file {path} cannot be read ({exc}); it must be UTF-8 text") from None
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        choice = line.strip()
        if not choice or choice.startswith("#"):
            continue
        if choice in seen:
            raise DataError(f"{path} line {number}: {choice!r} repeats line {seen[choice]}; each choice once")
        seen[choice] = number
    return check_choice_list(tuple(seen), str(path))


def check_choice_list(choices: tuple[str, ...], where: str = "the choices") -> tuple[str, ...]:
    """Refuse fewer than two choices, blank or repeated ones.

    Raises:
        DataError: saying which.
    """
    if len(choices) < 2:
        raise DataError(f"{where} has {len(choices)} choice(s); give at least two")
    for i, choice in enumerate(choices):
        if not choice.strip():
            raise DataError(f"{where}: choice {i + 1} is empty")
        if choices.index(choice) != i:
            raise DataError(f"{where}: {choice!r} is given twice")
    return choices


def choices_digest(choices: tuple[str, ...]) -> str:
    """sha256 of the choices in order (what a run's manifest records)."""
    return hashlib.sha256("\n".join(choices).encode("utf-8")).hexdigest()


def load_items(path: str | Path, choices: tuple[str, ...]) -> list[Item]:
    """Every row of the items CSV, checked: columns, empty cells, labels that are not choices.

    Image files are not opened here: an image that is missing or unreadable
    fails its own item when it is evaluated, and the run goes on.

    Raises:
        DataError: the file is missing or malformed, or rows are wrong (each named by its line).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = tuple(reader.fieldnames or ())
            _check_columns(path, columns)
            items, problems = [], []
            for record in reader:
                item, problem = _item(path, reader.line_num, record, choices)
                if problem:
                    problems.append(problem)
                elif item is not None:
                    items.append(item)
    except FileNotFoundError:
        raise DataError(f"items file {path} not found: give a CSV with columns image,label") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"items file {path} cannot be read as UTF-8 CSV ({exc})") from None
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise DataError("; ".join(problems[:MAX_LISTED]) + more)
    if not items:
        raise DataError(f"{path} has no rows: add one row per image (image,label)")
    return items


def _check_columns(path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        found = ", ".join(columns) if columns else "none"
        raise DataError(f"{path} has no {' or '.join(repr(c) for c in missing)} column (columns found: "
                        f"{found}); the first line must name the columns, e.g. image,label")


def _item(path: Path, row: int, record: dict[str | None, str | list[str] | None],
          choices: tuple[str, ...]) -> tuple[Item | None, str | None]:
    """The row's item, or the problem with it (one line naming the row)."""
    where = f"{path.name} row {row}"
    if None in record:
        return None, f"{where}: more cells than columns"
    values = {str(k): (v or "").strip() if isinstance(v, str) else "" for k, v in record.items()}
    if not any(values.values()):
        return None, None  # a blank line
    image, label = values["image"], values["label"]
    if not image:
        return None, f"{where}: the image cell is empty"
    if not label:
        return None, f"{where}: the label cell is empty"
    if label not in choices:
        return None, f"{where}: label {label!r} is not one of the choices ({_short(choices)})"
    fields = {k: v for k, v in values.items() if k not in REQUIRED_COLUMNS}
    return Item(row=row, image=image, path=(path.parent / image), label=label, fields=fields), None


def _short(choices: tuple[str, ...]) -> str:
    shown = ", ".join(choices[:8])
    return shown + (", ..." if len(choices) > 8 else "")
