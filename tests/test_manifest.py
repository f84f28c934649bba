import json

import pytest

from cervl.data.manifest import ManifestError, Record, read_manifest, write_manifest


def _rec(**kw):
    base = dict(image="a.jpg", label="Sadly Angry", label_set="rafdb-compound", split="train", dataset="x")
    base.update(kw)
    return base


def _write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_round_trip_and_relative_root(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "manifests" / "m.jsonl"
    recs = [Record(**_rec(landmarks=[[1, 2]] * 5, bbox=[0, 0, 10, 12], aus={"AU01": 0.5}, variant="aligned")),
            Record(**_rec(image="b.jpg", label=None, split="test"))]
    assert write_manifest(out, recs, root=data) == 2
    m = read_manifest(out)
    assert [r.label for r in m] == ["Sadly Angry", None]
    assert m.records[0].root == "../data"
    assert m.image_path(m.records[1]) == (data / "b.jpg").resolve()
    assert m.records[0].landmarks == [[1, 2]] * 5
    assert len(m.split("test")) == 1


@pytest.mark.parametrize("bad, field", [
    (_rec(label="Happiness"), "label"),
    (_rec(split="training"), "split"),
    (_rec(lable="Sadly Angry"), "lable"),
    ({k: v for k, v in _rec().items() if k != "image"}, "image"),
    (_rec(landmarks=[[1, 2]] * 4), "landmarks"),
    (_rec(bbox=[5, 5, 1, 1]), "bbox"),
    (_rec(frame=-3), "frame"),
    (_rec(variant="warped"), "variant"),
    (_rec(label_set="rafdb"), "label_set"),
])
def test_bad_record_names_file_line_and_field(tmp_path, bad, field):
    path = _write_lines(tmp_path / "m.jsonl", [_rec(), bad])
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert err.value.line == 2 and err.value.field == field
    assert f"{path}:2: field '{field}'" in str(err.value)


def test_unknown_field_suggests_closest(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [_rec(lable="x")])
    with pytest.raises(ManifestError, match="did you mean 'label'"):
        read_manifest(path)


def test_malformed_json_line(tmp_path):
    path = _write_lines(tmp_path / "m.jsonl", [_rec(), "{not json"])
    with pytest.raises(ManifestError, match=r"m.jsonl:2: malformed JSON"):
        read_manifest(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_failed_write_keeps_previous_file(tmp_path):
    out = tmp_path / "m.jsonl"
    write_manifest(out, [Record(**_rec())])
    before = out.read_bytes()
    with pytest.raises(ManifestError):
        write_manifest(out, [Record(**_rec()), Record(**_rec(split="bogus"))])
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]  # no temp file left behind
