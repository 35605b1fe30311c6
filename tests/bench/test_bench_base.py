"""The benchmark interface: registry, result schema, file readers, eval config and summary."""

from __future__ import annotations

import json

import pytest

import mmrlsd.bench as bench_pkg
from mmrlsd.bench.base import (
    BENCHES,
    Bench,
    as_response,
    get_bench,
    make_result,
    read_jsonl,
    register,
    require,
    rows_by_id,
    tally,
)
from mmrlsd.bench.run import EvalConfig, load_eval_config, summary_markdown


def test_registry_has_our_benchmarks_and_unknown_lists_them():
    assert {"mathvista", "mmmu"} <= set(bench_pkg.BENCHES)
    with pytest.raises(KeyError) as e:
        get_bench("mathvistaa")
    assert "known:" in str(e.value) and "mathvista" in str(e.value) and "mmmu" in str(e.value)


def test_every_registered_bench_declares_its_interface():
    for name, cls in BENCHES.items():
        b = cls()
        assert b.name == name and b.hub_id and b.default_split in b.splits
        assert "official" in b.modes and b.generate_mode in b.modes
        assert set(b.unscored_splits) <= set(b.splits)


def test_register_rejects_a_second_class_under_one_name():
    with pytest.raises(ValueError, match="registered twice"):

        @register("mathvista")
        class Other(Bench):
            pass


def test_tally_counts_list_values_under_each_element():
    # a: True, False, True (from the list) -> 2/3; b: True (from the list) -> 1/1
    t = tally([("a", True), ("a", False), (["a", "b"], True)])
    assert t == {
        "a": {"correct": 2, "total": 3, "accuracy": 2 / 3},
        "b": {"correct": 1, "total": 1, "accuracy": 1.0},
    }


def test_make_result_schema_and_arithmetic():
    items = {"1": {"prediction": "x", "correct": True}, "2": {"prediction": None, "correct": False}}
    labels = {"1": {"grade": "a", "skills": ["s", "t"]}, "2": {"grade": "a", "skills": ["s"]}}
    r = make_result("b", "test", "official", items, labels, warnings=[])
    # n=2, correct=1 -> 0.5; grade a: 1/2; skills s: 1/2, t: 1/1
    assert (r["bench"], r["split"], r["mode"], r["n"], r["correct"], r["accuracy"]) == (
        "b",
        "test",
        "official",
        2,
        1,
        0.5,
    )
    assert r["breakdown"]["grade"] == {"a": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert r["breakdown"]["skills"]["t"] == {"correct": 1, "total": 1, "accuracy": 1.0}
    assert r["items"]["2"] == {"prediction": None, "correct": False}
    assert r["warnings"] == []
    assert make_result("b", "s", "m", {})["accuracy"] == 0.0  # empty: no ZeroDivisionError
    with pytest.raises(ValueError, match=r"\['accuracy'\] would overwrite the result schema"):
        make_result("b", "s", "m", items, accuracy={"S1": 0.5})
    json.dumps(r)  # serialisable


def test_read_jsonl_tolerates_bad_utf8_and_names_bad_lines(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'{"id": "1", "response": "caf\xe9 \xff"}\n\n{"id": "2", "response": "ok"}\n')
    rows = read_jsonl(p)
    assert rows[0]["response"] == "caf\ufffd \ufffd" and rows[1]["id"] == "2"
    p.write_bytes(b'{"id": "1"}\n{"id": \n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        read_jsonl(p)
    p.write_bytes(b"[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_jsonl(p)


def test_rows_by_id_and_require_name_the_record():
    with pytest.raises(ValueError, match="row 1: missing required field 'id'"):
        rows_by_id([{"id": 1}, {"response": "x"}])
    with pytest.raises(ValueError, match="duplicate id '1'"):
        rows_by_id([{"id": 1}, {"id": "1"}])
    with pytest.raises(KeyError, match="record 'q7': missing required field 'answer'"):
        require({"question": "?"}, "answer", "q7")
    assert as_response(None) == "" and as_response(b"\xff") == "\ufffd" and as_response(3) == "3"


def test_eval_config_rejects_unknown_keys_with_a_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("split: testmini\nmax_new_token: 8\n")
    with pytest.raises(ValueError, match="did you mean 'max_new_tokens'"):
        load_eval_config(p)
    p.write_text("max_new_tokens: many\n")
    with pytest.raises(ValueError, match="'max_new_tokens' must be int"):
        load_eval_config(p)
    p.write_text("max_new_tokens: 8\ntemperature: 0\n")
    assert load_eval_config(p) == EvalConfig(max_new_tokens=8, temperature=0)


def test_eval_config_samples_must_not_be_negative(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("samples: -1\n")
    with pytest.raises(ValueError, match="samples must be >= 0"):
        load_eval_config(p)
    p.write_text("samples: 3\nsample_temperature: 1\n")
    assert load_eval_config(p) == EvalConfig(samples=3, sample_temperature=1)


def test_read_records_one_loader_for_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmrlsd.bench.base import read_records

    rows = [{"id": "1", "q": "a"}, {"id": "2", "q": "b\tc"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "keyed.json").write_text(json.dumps({"1": {"q": "a"}, "2": {"id": "2", "q": "b\tc"}}))
    (tmp_path / "r.tsv").write_text('id\tq\n1\ta\n2\t"b\tc"\n')
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "hub/data/test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "hub/data/test-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub/data/dev-00000-of-00001.parquet")
    for name in ("r.jsonl", "r.json", "r.tsv", "hub/data/dev-00000-of-00001.parquet"):
        assert read_records(tmp_path / name) == rows, name
    assert read_records(tmp_path / "keyed.json", id_field="id") == rows  # the key becomes the id field
    assert read_records(tmp_path / "hub", split="test") == rows  # a folder: <split>-*.parquet, in order
    with pytest.raises(FileNotFoundError, match="no validation-\\*.parquet"):
        read_records(tmp_path / "hub", split="validation")
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        read_records(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: expected a list of records"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text('{"1": 5}')
    with pytest.raises(ValueError, match="bad2.json: expected {id: record}"):
        read_records(tmp_path / "bad2.json")


def test_summary_markdown_has_every_breakdown_and_warnings():
    items = {"1": {"prediction": "x", "correct": True}, "2": {"prediction": "y", "correct": False}}
    r = make_result("b", "dev", "rule-v1", items, {"1": {"g": "u"}, "2": {"g": "v"}}, warnings=["w1"],
                    label="not official", leaderboard={"ALL": 50.0})  # fmt: skip
    md = summary_markdown(r)
    assert "# b dev (mode: rule-v1)" in md and "**not official**" in md
    assert "| 2 | 1 | 50.00% |" in md
    assert "| u | 1 | 1 | 100.00% |" in md and "| v | 0 | 1 | 0.00% |" in md
    assert "| ALL |" in md and "| 50.0 |" in md and "- w1" in md
