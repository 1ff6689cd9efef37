"""tools/make_shards.py: annotation JSON + image root -> shards; merged captions, report, resumability."""
from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from epic.data import build_eval_loader

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_bytes(fmt: str, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def dataset(tmp_path):
    """Images (one png, one missing, one broken), two annotation files, one image captioned in two entries."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    files = {"a.jpg": image_bytes("JPEG", (200, 0, 0)), "sub/b.png": image_bytes("PNG", (0, 200, 0)),
             "c.jpg": image_bytes("JPEG", (0, 0, 200)), "broken.jpg": b"\xff\xd8 not really a jpeg"}
    for name, data in files.items():
        (images / name).write_bytes(data)
    first = [{"image": "a.jpg", "caption": "a red box"}, {"image": "sub/b.png", "caption": ["green", " green box "]},
             {"image": "missing.jpg", "caption": "gone"}, {"image": "a.jpg", "caption": "red again"},
             {"image": "broken.jpg", "caption": "broken"}, {"image": "blank.jpg", "caption": "  "}]
    second = [{"image": "c.jpg", "caption": ["a blue box"]}]
    (tmp_path / "first.json").write_text(json.dumps(first))
    (tmp_path / "second.json").write_text(json.dumps(second))
    return tmp_path, files


def run(tmp_path, *extra):
    args = ["--annotations", str(tmp_path / "first.json"), str(tmp_path / "second.json"), "--image-root",
            str(tmp_path / "images"), "--out", str(tmp_path / "shards"), "--shard-size", "2", "--workers", "1", *extra]
    return load_tool("make_shards").main(args)


def members(tar_path: Path) -> dict:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_converts_merges_captions_and_reports_problems(dataset, shapes_world):
    tmp_path, files = dataset
    assert run(tmp_path, "--no-shuffle") == 0
    out = tmp_path / "shards"
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    report = json.loads((out / "report.json").read_text())
    assert report["missing"] == ["missing.jpg"] and [b["image"] for b in report["broken"]] == ["broken.jpg"]
    assert report["without_caption"] == ["blank.jpg"] and report["images"] == 5 and report["written"] == 3
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 0, "00002.tar": 1}
    counts = json.loads((out / "counts.json").read_text())  # a + b: 2 images, 4 captions; c: 1 image, 1 caption
    assert counts["shards"] == {"00000.tar": {"images": 2, "captions": 4}, "00001.tar": {"images": 0, "captions": 0},
                                "00002.tar": {"images": 1, "captions": 1}}
    assert (counts["images"], counts["captions"]) == (3, 5) and report["captions"] == 5
    counted = tmp_path / "recounted"  # tools/count_shards.py, reading the shards, finds the same counts
    counted.mkdir()
    for tar in out.glob("*.tar"):
        (counted / tar.name).write_bytes(tar.read_bytes())
    assert load_tool("count_shards").main([str(counted)]) == 0
    assert json.loads((counted / "counts.json").read_text()) == counts
    shard0 = members(out / "00000.tar")
    assert shard0["000000000.jpg"] == files["a.jpg"] and shard0["000000001.png"] == files["sub/b.png"]
    assert json.loads(shard0["000000000.json"])["caption"] == ["a red box", "red again"]
    assert json.loads(shard0["000000001.json"])["caption"] == ["green", "green box"]
    assert shard0["000000000.txt"] == b"a red box"
    loader = build_eval_loader(str(out / "{00000..00002}.tar"), shapes_world / "tokenizer", image_size=8,
                               max_text_len=8, batch_size=16)
    batches = list(loader)
    assert batches[0]["image_index"].tolist() == [0, 0, 1, 1, 2] and sum(loader.skip_counts().values()) == 0


def test_rerun_keeps_completed_shards_and_redoes_the_rest(dataset):
    tmp_path, _ = dataset
    assert run(tmp_path) == 0
    out = tmp_path / "shards"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    (out / "00001.tar").unlink()  # as if the run died while writing shard 1 ...
    (out / "00001.tar.tmp123").write_bytes(b"partial")  # ... leaving a temporary file behind
    assert run(tmp_path) == 0
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert after["00000.tar"] == before["00000.tar"] and after["00002.tar"] == before["00002.tar"]
    assert after["00001.tar"][1] == before["00001.tar"][1]  # rewritten, identical bytes
    assert json.loads((out / "report.json").read_text())["shards_reused"] == 2
    assert not list(out.glob("*.tmp*"))


def test_other_inputs_into_the_same_folder_are_refused(dataset, capsys):
    tmp_path, _ = dataset
    assert run(tmp_path) == 0
    assert run(tmp_path, "--seed", "1") == 2
    assert "different inputs" in capsys.readouterr().err


def test_malformed_annotations_stop_with_the_entry(dataset):
    tmp_path, _ = dataset
    (tmp_path / "second.json").write_text(json.dumps([{"img": "c.jpg", "caption": "x"}]))
    with pytest.raises(SystemExit, match="second.json entry 0 lacks 'image'"):
        run(tmp_path)
