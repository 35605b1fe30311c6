"""Images as paths, bytes structs, PIL images and data URLs load alike; parquet written by `datasets`,
`save_to_disk` folders and `hub:` datasets (here a local folder through `datasets.load_dataset`) give the same
records; record bounds and image-path rules skip and count, naming the record."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrlsd.data.images import MAX_ASPECT_RATIO, load_image
from mmrlsd.data.sources import FieldMap, RecordLimits, load_dataset_files
from mmrlsd.errors import ImageError


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _picture(size=(70, 50), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def _datasets_images(imgs: list[list[Image.Image]], tmp: Path, single: bool = False):
    """A `datasets.Dataset` with an Image column (a list of images per row, or one image with `single`)."""
    from datasets import Dataset, Sequence
    from datasets import Image as HFImage

    n = len(imgs)
    data = {"id": [f"r{i}" for i in range(n)], "problem": [f"question {i}?" for i in range(n)],
            "answer": [str(i) for i in range(n)], "problem_type": ["numeric"] * n,
            "images": [(row[0] if row else None) for row in imgs] if single else imgs}  # fmt: skip
    return Dataset.from_dict(data).cast_column("images", HFImage() if single else Sequence(HFImage()))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_every_kind_of_image_loads_identically(mode, tmp_path):
    """A path, raw bytes, a `{"bytes", "path": None}` struct, a PIL image and a data URL of the same picture give
    the same RGB pixels (modes converted the same way: transparency onto white)."""
    img = _picture(mode="RGBA" if mode == "RGBA" else "RGB")
    if mode in ("L", "P"):
        img = img.convert(mode)
    data = _png_bytes(img)
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    kinds = [tmp_path / "a.png", data, {"bytes": data, "path": None}, Image.open(io.BytesIO(data)), img, url]
    arrays = [np.asarray(load_image(k)) for k in kinds]
    assert all(a.shape == (50, 70, 3) for a in arrays)
    for a in arrays[1:]:
        assert np.array_equal(a, arrays[0])
    if mode == "RGBA":  # alpha composited on white, not dropped
        alpha = np.asarray(img)[..., 3:] / 255.0
        expect = np.asarray(img)[..., :3] * alpha + 255 * (1 - alpha)
        assert np.abs(arrays[0].astype(float) - expect).max() <= 1.0


def test_bytes_and_pil_images_get_the_path_checks():
    """The decompression-bomb limit, the pixel budget and the aspect-ratio limit apply to bytes and PIL images."""
    import struct
    import zlib

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    def png(side: int) -> bytes:
        head = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        return (
            b"\x89PNG\r\n\x1a\n"
            + head
            + chunk(b"IDAT", zlib.compress(b"\x00" * (side + 1)))
            + chunk(b"IEND", b"")
        )

    for src in (png(25_000), {"bytes": png(25_000), "path": None}):
        with pytest.raises(
            ImageError, match=r"^rec7 image 0: 25000x25000 exceeds the 400,000,000-pixel limit"
        ):
            load_image(src, name="rec7 image 0")
    with pytest.raises(ImageError, match=r"^rec7 image 0: exceeds the 400,000,000-pixel limit"):
        load_image(png(30_000), name="rec7 image 0")  # beyond twice the limit PIL itself refuses
    big = Image.new("L", (3000, 2000), 200)
    out = load_image(big, 112 * 112)
    assert out.mode == "RGB" and out.width * out.height <= 112 * 112
    assert load_image(_png_bytes(big), 112 * 112).size == out.size
    with pytest.raises(ImageError, match=rf"rec7 image 0: image aspect ratio beyond the vision processor's "
                                         rf"{MAX_ASPECT_RATIO}:1 \(300x1\)"):  # fmt: skip
        load_image(_png_bytes(Image.new("RGB", (300, 1))), name="rec7 image 0")
    with pytest.raises(ImageError, match=r"image bytes are empty"):
        load_image(b"")
    with pytest.raises(ImageError, match=r"unreadable image"):
        load_image({"bytes": b"\x89PNG garbage", "path": None})


def test_datasets_parquet_save_to_disk_and_hub_give_the_same_records(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    imgs = [[_picture((56, 40))], [], [_picture((40, 56)), _picture((30, 30))]]
    ds = _datasets_images(imgs, tmp_path)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "hubdir").mkdir()
    ds.to_parquet(str(tmp_path / "hubdir" / "train.parquet"))
    expected = [np.asarray(load_image(_png_bytes(i))) for row in imgs for i in row]
    sources = [str(tmp_path / "train.parquet"), str(tmp_path / "saved"), str(tmp_path / "saved_dict"),
               f"hub:{tmp_path / 'hubdir'}"]  # fmt: skip
    for source in sources:
        data = load_dataset_files([source], FieldMap(), shuffle=False)
        assert not data.skipped, (source, data.skipped)
        assert [s.id for s in data.samples] == ["r0", "r1", "r2"]
        assert [len(s.images) for s in data.samples] == [1, 0, 2]
        assert data.samples[0].problem_type == "numeric" and data.samples[2].answer == "2"
        batch = data.next_batch(3)
        got = [np.asarray(i) for s in batch for i in s.pil_images]
        assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, expected)), source
        assert all(s.pil_images == [] for s in data.samples)  # the dataset keeps no decoded images
    test_split = load_dataset_files([str(tmp_path / "saved_dict")], FieldMap(), split="test")
    assert [s.id for s in test_split.samples] == ["r0"]


def test_single_image_column_and_python_rows(tmp_path):
    """An `Image()` column (one image or None per row) from parquet; rows holding PIL images or bytes directly."""
    from mmrlsd.data.sources import to_sample

    imgs = [[_picture((56, 40))], []]
    _datasets_images(imgs, tmp_path, single=True).to_parquet(str(tmp_path / "one.parquet"))
    data = load_dataset_files([str(tmp_path / "one.parquet")], FieldMap(), shuffle=False)
    assert [len(s.images) for s in data.samples] == [1, 0] and not data.skipped
    (a, b) = data.next_batch(2)
    assert np.array_equal(np.asarray(a.pil_images[0]), np.asarray(load_image(_png_bytes(imgs[0][0]))))
    pic = _picture((40, 40))
    for entry in (pic, _png_bytes(pic), {"bytes": _png_bytes(pic), "path": None}):
        s = to_sample({"problem": "q?", "answer": "1", "images": [entry]}, "py:0", FieldMap(), tmp_path)
        assert s.images == ["py:0 image 0 (PIL)" if entry is pic else "py:0 image 0 (embedded)"]
        loaded = load_dataset_files.__globals__["Dataset"]([s]).next_batch(1)[0]
        assert np.array_equal(np.asarray(loaded.pil_images[0]), np.asarray(pic))


def test_struct_paths_without_bytes_resolve_in_the_data_folder(tmp_path):
    """EasyR1-style parquet: `{"bytes": None, "path": "images/x.png"}` structs load from the parquet's folder;
    a struct path leaving it is skipped at draw time, naming the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "images").mkdir()
    _picture((40, 40)).save(tmp_path / "images" / "x.png")
    _picture((40, 40)).save(tmp_path.parent / "outside.png")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([[{"bytes": None, "path": "images/x.png"}], [{"bytes": None, "path": "../outside.png"}],
                       [{"bytes": None, "path": "images/x.png"}]], pa.list_(struct))  # fmt: skip
    table = pa.table(
        {"id": ["in", "out", "good"], "problem": ["q?"] * 3, "answer": ["1"] * 3, "images": images}
    )
    pq.write_table(table, tmp_path / "t.parquet")
    data = load_dataset_files([str(tmp_path / "t.parquet")], FieldMap(), shuffle=False)
    batch = data.next_batch(2)
    assert [s.id for s in batch] == ["in", "good"]
    assert [(s.id, s.reason) for s in data.skipped] == [
        ("out", "'../outside.png': image path leaves the data folder (an absolute path, '..' or a symlink "
                f"outside {tmp_path}; set data.allow_external_images: true to allow it)")]  # fmt: skip


def test_ten_thousand_images_are_skipped_by_count_before_any_image_is_read(tmp_path):
    """A parquet row with 10,000 embedded images is skipped from the list length alone; the next record loads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = _png_bytes(_picture((32, 32)))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [[{"bytes": png, "path": None}] * 10_000, [{"bytes": png, "path": None}]]
    table = pa.table({"id": ["many", "good"], "problem": ["q?", "q?"], "answer": ["1", "1"],
                      "images": pa.array(rows, pa.list_(struct))})  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    t0 = time.monotonic()
    data = load_dataset_files([str(tmp_path / "t.parquet")], FieldMap(), limits=RecordLimits(max_images=32))
    assert time.monotonic() - t0 < 10
    assert [(s.id, s.reason) for s in data.skipped] == [
        ("many", "too many images (10,000; data.max_images is 32)")
    ]
    assert [s.id for s in data.samples] == ["good"]
    json_rows = tmp_path / "t.jsonl"
    json_rows.write_text(
        json.dumps({"id": "many", "problem": "q", "answer": "1", "images": ["a.png"] * 10_000})
    )
    data = load_dataset_files([str(json_rows)], FieldMap())
    assert [s.id for s in data.skipped] == ["many"] and "too many images (10,000" in data.skipped[0].reason


def test_image_paths_stay_in_the_data_folder(tmp_path):
    """Absolute paths, `..` and symlinks that leave the data file's folder are skipped, naming the record;
    `allow_external_images` allows them; paths inside (absolute ones too, and symlinks within) load."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    _picture((40, 40)).save(tmp_path / "secret.png")
    _picture((40, 40)).save(root / "images" / "ok.png")
    os.symlink(tmp_path / "secret.png", root / "images" / "link_out.png")
    os.symlink(root / "images" / "ok.png", root / "images" / "link_in.png")
    recs = [("abs_out", str(tmp_path / "secret.png")), ("dotdot", "../secret.png"),
            ("link_out", "images/link_out.png"), ("abs_in", str(root / "images" / "ok.png")),
            ("link_in", "images/link_in.png"), ("rel", "images/ok.png")]  # fmt: skip
    path = root / "t.jsonl"
    path.write_text("".join(json.dumps({"id": i, "problem": "q?", "answer": "1", "images": [p]}) + "\n"
                            for i, p in recs))  # fmt: skip
    data = load_dataset_files([str(path)], FieldMap(), shuffle=False)
    assert [s.id for s in data.skipped] == ["abs_out", "dotdot", "link_out"]
    assert all("image path leaves the data folder" in s.reason and "data.allow_external_images" in s.reason
               for s in data.skipped)  # fmt: skip
    assert len(data.next_batch(3)) == 3
    data = load_dataset_files([str(path)], FieldMap(), limits=RecordLimits(allow_external_images=True))
    assert not data.skipped and len(data.next_batch(6)) == 6


def test_remote_images_are_off_by_default(tmp_path):
    path = tmp_path / "t.jsonl"
    rec = {"id": "web", "problem": "q?", "answer": "1", "images": ["https://example.com/a.png"]}
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "good", "images": []}) + "\n")
    data = load_dataset_files([str(path)], FieldMap())
    assert [(s.id, s.reason) for s in data.skipped] == [
        ("web", "https://example.com/a.png: remote images are off (set data.allow_remote_images: true)")
    ]
    with pytest.raises(ImageError, match="remote images are off"):
        load_image("https://example.com/a.png")  # no policy: never fetched


def test_huge_problem_is_skipped_before_tokenising(tmp_path):
    """A 200,000-character question is skipped at load time from its length (no tokenizer involved)."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "long", "problem": "x " * 100_000, "answer": "1"}) + "\n"
                    + json.dumps({"id": "good", "problem": "q?", "answer": "1"}) + "\n")  # fmt: skip
    data = load_dataset_files([str(path)], FieldMap(), limits=RecordLimits(max_prompt_tokens=4096))
    assert [s.id for s in data.skipped] == ["long"]
    assert data.skipped[0].reason == ("prompt too long (question and answer hold 200,001 characters, over 16 per "
                                      "token of data.max_prompt_tokens: 4,096)")  # fmt: skip
    assert not load_dataset_files([str(path)], FieldMap(), limits=RecordLimits(max_prompt_tokens=0)).skipped


def test_geometry3k_recipe_reads_easyr1_layout_through_hub(tmp_path, monkeypatch):
    """`configs/geometry3k_qwen25vl_3b.yaml`'s data section on a local folder in geometry3k's layout (`images`
    as a list of Image structs, `problem` with an `<image>` marker, `answer`), loaded as `hub:FOLDER` by the
    same code path as `hub:hiyouga/geometry3k`, both splits."""
    import datasets

    from mmrlsd.config import load_config
    from mmrlsd.data.sources import FieldMap

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "geometry3k_qwen25vl_3b.yaml")
    assert cfg.data.train_files == ["hub:hiyouga/geometry3k"] and cfg.data.val_split == "test"
    folder = tmp_path / "geometry3k" / "data"
    folder.mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        ds = _datasets_images([[_picture((60, 40))] for _ in range(n)], tmp_path).remove_columns(
            ["id", "problem_type"]
        )
        ds = ds.map(
            lambda r, i: {"problem": f"<image>Find x in triangle {i}.", "answer": str(10 + i)},
            with_indices=True,
        )
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    source = f"hub:{tmp_path / 'geometry3k'}"
    limits = RecordLimits.from_config(cfg.data)
    train = load_dataset_files([source], FieldMap.from_config(cfg.data), cfg.data.train_split, limits=limits)
    test = load_dataset_files([source], FieldMap.from_config(cfg.data), cfg.data.val_split, limits=limits)
    assert (len(train.samples), len(test.samples)) == (3, 2) and not train.skipped and not test.skipped
    s = train.next_batch(1)[0]
    assert (
        s.problem.startswith("<image>Find x") and len(s.pil_images) == 1 and s.pil_images[0].size == (60, 40)
    )


def test_parquet_with_path_strings_resolves_like_jsonl(tmp_path):
    """A parquet whose `images` column holds path strings: relative to the parquet's folder, the folder rule
    applied at load time (a `..` path skipped, named), exactly as for JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d" / "images").mkdir(parents=True)
    _picture((40, 40)).save(tmp_path / "d" / "images" / "a.png")
    _picture((40, 40)).save(tmp_path / "b.png")
    table = pa.table({"id": ["in", "out"], "problem": ["q?", "q?"], "answer": ["1", "2"],
                      "images": [["images/a.png"], ["../b.png"]]})  # fmt: skip
    pq.write_table(table, tmp_path / "d" / "t.parquet")
    data = load_dataset_files([str(tmp_path / "d" / "t.parquet")], FieldMap())
    assert [s.id for s in data.skipped] == ["out"] and "image path leaves the data folder" in data.skipped[
        0
    ].reason
    (s,) = data.next_batch(1)
    assert s.images == [str(tmp_path / "d" / "images" / "a.png")] and s.pil_images[0].size == (40, 40)


def test_null_and_empty_structs_in_a_table_are_named_skips(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = _png_bytes(_picture((40, 40)))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [[None], [{"bytes": None, "path": None}], [{"bytes": png, "path": None}]]
    table = pa.table({"id": ["null", "empty", "good"], "problem": ["q?"] * 3, "answer": ["1"] * 3,
                      "images": pa.array(rows, pa.list_(struct))})  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    data = load_dataset_files([str(tmp_path / "t.parquet")], FieldMap(), shuffle=False)
    assert [s.id for s in data.next_batch(1)] == ["good"]
    assert [(s.id, s.reason) for s in data.skipped] == [
        ("null", "null image 0 (embedded): empty image entry (null)"),
        ("empty", "empty image 0 (embedded): image entry has neither bytes nor a path")]  # fmt: skip


def test_validation_set_loads_each_record_once(tmp_path):
    """`load_all`: a skipped validation record is counted, and no other record is drawn twice in its place."""
    path = tmp_path / "val.jsonl"
    recs = [{"id": "a", "problem": "q?", "answer": "1"}, {"id": "bad", "problem": "q?", "answer": "1",
            "images": ["missing.png"]}, {"id": "c", "problem": "q?", "answer": "1"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = load_dataset_files([str(path)], FieldMap(), shuffle=False)
    assert [s.id for s in data.load_all()] == ["a", "c"]
    assert [(s.id, s.reason) for s in data.skipped] == [
        ("bad", f"{tmp_path / 'missing.png'}: image file not found")
    ]
