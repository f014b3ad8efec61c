"""edgevlm.evaluate without a model: data checks, prompt layout, metrics, pictures, the run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgevlm.errors import DataError, InvalidRequestError, RunConflictError
from edgevlm.evaluate import compute_metrics, load_choices, load_items
from edgevlm.evaluate import prompts, store
from edgevlm.evaluate.runner import EvalConfig, check_settings, todo_items
from edgevlm.evaluate.metrics import Outcome
from edgevlm.evaluate.plots import DPI, bar_size, figure_size, save_confusion, save_f1

CHOICES = ("cat", "dog", "bird")


def _csv(tmp_path, text):
    path = tmp_path / "items.csv"
    path.write_text(text)
    return path


def test_items_and_choices_load(tmp_path):
    (tmp_path / "c.txt").write_text("# animals\ncat\n\ndog\nbird\n")
    assert load_choices(tmp_path / "c.txt") == CHOICES
    items = load_items(_csv(tmp_path, "image,label,where\na.png,cat,garden\nsub/b.png,dog,park\n\n"), CHOICES)
    assert [(i.row, i.image, i.label, i.fields) for i in items] == [
        (2, "a.png", "cat", {"where": "garden"}), (3, "sub/b.png", "dog", {"where": "park"})]
    assert items[1].path == tmp_path / "sub" / "b.png"


@pytest.mark.parametrize("text, words", [
    ("picture,label\na.png,cat\n", "no 'image' column"),
    ("image,label\na.png,cow\nb.png,cat\nc.png,horse\n", "row 2: label 'cow' is not one of the choices"),
    ("image,label\na.png,cat\n,dog\n", "row 3: the image cell is empty"),
    ("image,label\na.png,\n", "row 2: the label cell is empty"),
    ("image,label\na.png,cat,extra\n", "row 2: more cells than columns"),
    ("image,label\n", "no rows"),
])
def test_bad_items_name_the_row(tmp_path, text, words):
    with pytest.raises(DataError, match=words):
        load_items(_csv(tmp_path, text), CHOICES)


def test_every_bad_row_is_listed(tmp_path):
    with pytest.raises(DataError) as info:
        load_items(_csv(tmp_path, "image,label\na.png,cow\nb.png,cat\nc.png,horse\n"), CHOICES)
    assert "row 2" in str(info.value) and "row 4" in str(info.value)


def test_bad_choices(tmp_path):
    (tmp_path / "c.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match="line 3: 'cat' repeats line 1"):
        load_choices(tmp_path / "c.txt")
    (tmp_path / "one.txt").write_text("cat\n")
    with pytest.raises(DataError, match="at least two"):
        load_choices(tmp_path / "one.txt")
    with pytest.raises(DataError, match="not found"):
        load_choices(tmp_path / "none.txt")


def test_the_shared_head_goes_first():
    wikiart = ("There are 11 possible genres: {choices}. What is the genre of painting by {artist} in style "
               "{style}? Choose from the given list. Say only the number of genre, do not output anything else.")
    lay = prompts.layout(wikiart, ("0: Portrait", "1: Landscape"), ("artist", "style"))
    assert lay.head == "There are 11 possible genres: 0: Portrait, 1: Landscape."
    assert lay.rest.startswith("What is the genre of painting by {artist}") and lay.fields == ("artist", "style")
    msgs = prompts.messages(lay, "a.png", ("0: Portrait", "1: Landscape"), {"artist": "Monet", "style": "Impressionism"},
                            system="You are an art historian.")
    assert msgs[0] == {"role": "system", "content": "You are an art historian.\n" + lay.head}
    assert msgs[1]["content"][0] == {"type": "image", "image": "a.png"}
    assert msgs[1]["content"][1]["text"].startswith("What is the genre of painting by Monet in style Impressionism?")
    plain = prompts.layout("Look at it. Which is it: {choices}? One word.", CHOICES)
    assert plain.head == "Look at it. Which is it: cat, dog, bird?" and plain.rest == "One word."


@pytest.mark.parametrize("template, words", [("Is it {colour}?", "no 'colour' column"), ("{", "invalid"),
                                             ("{0} {choices}", "not allowed")])
def test_bad_templates(template, words):
    with pytest.raises(DataError, match=words):
        prompts.layout(template, CHOICES, ("where",))


def test_a_field_without_a_csv_is_refused_as_classify_has_no_columns():
    with pytest.raises(DataError) as info:
        prompts.layout("Is it {colour}?", CHOICES)  # classify: one image, no CSV
    message = str(info.value)
    assert "{colour}" in message and "classifying one image fills in only {choices}" in message
    assert "items have no" not in message and "besides image and label" not in message


def test_metrics_by_hand():
    pairs = [("cat", "cat"), ("cat", "dog"), ("dog", "dog"), ("dog", "dog"), ("bird", "cat"), ("cat", "cat")]
    m = compute_metrics([Outcome(label, pred, ms=500.0) for label, pred in pairs], CHOICES)
    assert m.items == 6 and m.correct == 4 and m.accuracy == pytest.approx(4 / 6)
    cat, dog, bird = m.per_class
    assert (cat.precision, cat.recall, cat.support) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (dog.precision, dog.recall, dog.f1) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    assert (bird.precision, bird.recall, bird.f1, bird.support) == (0.0, 0.0, 0.0, 1)
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert m.confusion == ((2, 1, 0), (0, 2, 0), (1, 0, 0)) and m.malformed == 0
    assert m.items_per_s == pytest.approx(2.0)
    assert compute_metrics([Outcome("cat", "horse")], CHOICES).malformed == 1


def test_pictures_have_the_expected_size(tmp_path):
    from PIL import Image

    m = compute_metrics([Outcome("cat", "dog"), Outcome("bird", "bird")], CHOICES)
    for save, size in ((save_confusion, figure_size(3)), (save_f1, bar_size(3))):
        path = save(m, tmp_path / f"{save.__name__}.png")
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (round(size[0] * DPI), round(size[1] * DPI))
            assert len(np.unique(np.asarray(img.convert("L")))) > 10  # something is drawn


def _manifest(**changes):
    base = dict(version=1, model="m", prompt="p", system="", choices=CHOICES, choices_sha256="x", method="score",
                cot=False, cot_tokens=0, image_tokens=None, compare=None)
    return store.RunManifest(**{**base, **changes})


def test_a_run_folder_refuses_another_run(tmp_path):
    out = tmp_path / "run"
    store.prepare(out, _manifest(), restart=False)
    store.prepare(out, _manifest(), restart=False)  # the same run resumes
    (out / store.PREDICTIONS).write_text('{"row": 2}\n')
    with pytest.raises(RunConflictError, match="different prompt, choices"):
        store.prepare(out, _manifest(prompt="q", choices=("a", "b")), restart=False)
    store.prepare(out, _manifest(prompt="q"), restart=True)
    assert not (out / store.PREDICTIONS).exists()
    assert json.loads((out / store.MANIFEST).read_text())["prompt"] == "q"


def test_a_torn_last_line_is_dropped_and_earlier_lines_kept(tmp_path):
    log = store.PredictionLog(tmp_path / "p.jsonl")
    log.append({"row": 2})
    log.append({"row": 3})
    with log.path.open("a") as fh:
        fh.write('{"row": 4, "lab')
    before = log.path.read_bytes()
    assert log.read() == [{"row": 2}, {"row": 3}]
    assert before.startswith(log.path.read_bytes()) and log.path.read_bytes().endswith(b"\n")
    log.path.write_text('{"row": 2}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        log.read()


def test_a_manifest_written_before_direct_too_resumes_as_not_direct(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    old = _manifest().to_json()
    del old["direct"]  # a folder from before --direct-too
    (out / store.MANIFEST).write_text(json.dumps(old))
    store.prepare(out, _manifest(), restart=False)
    with pytest.raises(RunConflictError, match="different direct"):
        store.prepare(out, _manifest(direct=True), restart=False)


def test_an_edited_label_or_field_is_refused_on_resume(tmp_path):
    csv = _csv(tmp_path, "image,label,where\na.png,cat,garden\nb.png,dog,park\n")
    config = EvalConfig(data=csv, choices=CHOICES, out=tmp_path / "run")
    items = load_items(csv, CHOICES)
    earlier = [{"row": 2, "image": "a.png", "label": "cat", "fields": {"where": "garden"}}]
    todo, remaining = todo_items(items, earlier, config)
    assert [i.row for i in todo] == [3] and remaining == 0
    for text, words in (("a.png,dog,garden", "row 2 now has label 'dog' (was 'cat')"),
                        ("a.png,cat,house", "row 2 now has fields {'where': 'house'} (was {'where': 'garden'})"),
                        ("z.png,cat,garden", "row 2 now has image 'z.png' (was 'a.png')")):
        edited = load_items(_csv(tmp_path, f"image,label,where\n{text}\nb.png,dog,park\n"), CHOICES)
        with pytest.raises(RunConflictError, match=r"the CSV changed under the run") as info:
            todo_items(edited, earlier, config)
        assert words in str(info.value) and "--restart" in str(info.value)
    with pytest.raises(RunConflictError, match="row 4 now has no such row"):
        todo_items(items, [{"row": 4, "image": "c.png", "label": "cat", "fields": {}}], config)


@pytest.mark.parametrize("changes, words", [
    (dict(limit=0), "--limit must be at least 1, got 0"),
    (dict(direct_too=True), "--direct-too .* add --cot"),
    (dict(method="grammar", compare=True), "--compare needs the score method"),
    (dict(cot=True, reference=True), "--reference transformers times the direct prompt"),
])
def test_settings_are_refused_without_a_model(tmp_path, changes, words):
    flags = {k: changes.pop(k) for k in ("compare", "reference") if k in changes}
    config = EvalConfig(data=tmp_path / "items.csv", choices=CHOICES, out=tmp_path / "run", **changes)
    with pytest.raises(InvalidRequestError, match=words):
        check_settings(config, **flags)
