"""Nothing a user has is lost (issue 18): outputs replaced as a set or not at all, leftovers of a crash cleaned,
no file overwritten unasked, a failed start no obstacle to the retry, result files readable by others."""

import errno
import json
import os
import stat

import pytest

from conftest import learnable_rows, write_jsonl
from llmcls.config import load_config
from llmcls.files import atomic_dir, atomic_open, clean_leftovers
from llmcls.rundir import RunDir

DEAD_PID = 999_999_999  # above any pid_max: no such process


def _tmp_leftovers(*folders):
    return [p for f in folders if f.is_dir() for p in f.iterdir() if p.name.endswith((".tmp", ".old"))]


# ----------------------------------------------------------------------------------------------- prepare
def _prep_cfg(train, **extra):
    return load_config(None, {"model.name_or_path": "tiny", "data.train_file": str(train), "data.max_length": 128,
                              "data.dev_fraction": 0.2, **extra})


def test_prepare_replaces_its_outputs_as_a_set_or_not_at_all(tokenizer, tmp_path, monkeypatch):
    import llmcls.recipes.prepare as prep

    train = write_jsonl(tmp_path / "train.jsonl", learnable_rows(40, 1))
    out = tmp_path / "run" / "data"
    first = prep.prepare(_prep_cfg(train), tokenizer, out, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    write_jsonl(train, learnable_rows(40, 2))  # an edited input: everything is recomputed
    calls = []

    def full_disk(path, obj):  # the summary is the last file written: the others are already written aside
        calls.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep, "atomic_write_json", full_disk)
    with pytest.raises(OSError):
        prep.prepare(_prep_cfg(train), tokenizer, out, progress=False)
    assert calls  # the failure did happen after the other files
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the old run's outputs, all of them, unmixed
    assert not _tmp_leftovers(out, out.parent)
    monkeypatch.undo()
    again = prep.prepare(_prep_cfg(train), tokenizer, out, progress=False)
    assert again["cache_key"] != first["cache_key"] and not again["cached"]


def test_prepare_refuses_a_folder_of_other_files(tokenizer, tmp_path):
    from llmcls.recipes.prepare import prepare

    train = write_jsonl(tmp_path / "train.jsonl", learnable_rows(20, 1))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not 'llmcls prepare' outputs"):
        prepare(_prep_cfg(train), tokenizer, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_prepare_cuts_a_huge_text_before_tokenising_it(tokenizer, tmp_path, monkeypatch):
    from llmcls.encode import PromptBuilder
    from llmcls.recipes.prepare import CHARS_PER_TOKEN, prepare

    rows = learnable_rows(10, 1)
    rows[0]["text"] = "word " * 400_000  # 2 MB on one line
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    seen = []
    orig = PromptBuilder.batch_prompt_ids
    monkeypatch.setattr(PromptBuilder, "batch_prompt_ids",
                        lambda self, rs: seen.extend(len(r.text) for r in rs) or orig(self, rs))
    s = prepare(_prep_cfg(train, **{"data.dev_fraction": 0}), tokenizer, tmp_path / "prep", progress=False)
    assert max(seen) <= 128 * CHARS_PER_TOKEN
    assert s["rows"] == 10 and s["shortened"] >= 1 and s["answer_kept"] == 10
    # the instruction file keeps the whole text (only what is tokenised is cut)
    first = json.loads((tmp_path / "prep" / "train.instruct.jsonl").read_text().splitlines()[0])
    assert len(json.dumps(first)) > 1_000_000


# --------------------------------------------------------------------------------------------- leftovers
def test_clean_leftovers_removes_a_dead_writers_files_only(tmp_path):
    dead_dir = tmp_path / f".adapter.{DEAD_PID}.abcdefgh.tmp"
    dead_dir.mkdir()
    (dead_dir / "w.bin").write_bytes(b"x")
    dead_file = tmp_path / f".train_log.jsonl.{DEAD_PID}.k2j3h4g5.tmp"
    dead_file.write_text("half")
    live = tmp_path / f".eval.{os.getpid()}.abcdefgh.tmp"
    live.mkdir()
    moved_aside = tmp_path / f".model.{DEAD_PID}.zzzzzzzz.old"  # crash between atomic_dir's two renames
    moved_aside.mkdir()
    (moved_aside / "config.json").write_text("{}")
    user = tmp_path / "my.tmp"
    user.write_text("a user's file")
    removed = clean_leftovers(tmp_path)
    assert set(removed) == {dead_dir, dead_file, moved_aside}
    assert live.is_dir() and user.is_file()
    assert (tmp_path / "model" / "config.json").is_file()  # the earlier result is put back


def test_atomic_writers_give_usual_modes_and_leave_nothing_on_error(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "a.json") as fh:
            fh.write("{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
            os.chmod(d / "f", 0o600)  # as safetensors makes its files
        with pytest.raises(OSError):
            with atomic_open(tmp_path / "a.json") as fh:
                fh.write("partial")
                raise OSError(errno.ENOSPC, "No space left on device")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert (tmp_path / "a.json").read_text() == "{}" and not _tmp_leftovers(tmp_path)


# ------------------------------------------------------------------------------------------ run directory
def test_only_a_finished_step_makes_a_run(tmp_path):
    run = RunDir(tmp_path)
    assert not run.started
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)  # a failed start, a half-saved checkpoint
    assert not run.started and run.checkpoint_steps() == []
    (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert run.started and run.checkpoint_steps() == [4]
    (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "adapter").mkdir()
    assert run.started


def test_trim_log_and_whole_run_loss(tmp_path):
    from llmcls.reporting.track import trim_log, whole_run_loss

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    assert trim_log(log, 4) == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    # logged every 2 steps up to the checkpoint at 4 (means 3.0 and 1.0), then 4 steps more with mean 0.5
    hist = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 1.0}, {"step": 6, "loss": 0.6}, {"step": 4, "dev": 1}]
    assert whole_run_loss(hist, 4, 0.5, 8) == pytest.approx((3.0 * 2 + 1.0 * 2 + 0.5 * 4) / 8)


# ---------------------------------------------------------------------------------------------- commands
def test_make_dataset_refuses_to_overwrite(tmp_path, capsys):
    from llmcls.cli import main

    src = tmp_path / "src"
    rows = [{"text": f"t{i}", "category": ["A", "B"], "output": "AB"[i % 2]} for i in range(20)]
    write_jsonl(src / "train.jsonl", rows), write_jsonl(src / "test.jsonl", rows[:6])
    out = tmp_path / "out"
    out.mkdir()
    (out / "test.jsonl").write_text("a user's test file\n")
    args = ["make-dataset", "multilabel", "--source", str(src), "--out", str(out)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "test.jsonl").read_text() == "a user's test file\n" and not (out / "train.jsonl").exists()
    assert main([*args, "--overwrite"]) == 0
    assert (out / "train.jsonl").is_file() and (out / "test.jsonl").read_text() != "a user's test file\n"


def test_predict_names_stdin_in_a_data_error(tmp_path, monkeypatch):
    import io

    import llmcls.recipes.predict as pred
    from llmcls.data import DataError

    cfg = load_config(None, {})
    monkeypatch.setattr(pred, "model_for_run", lambda path, cfg, model, tok: (None, None, cfg))
    with pytest.raises(DataError) as e:
        pred.predict(tmp_path, "-", labels=["A", "B"], cfg=cfg, progress=False,
                     stdin=io.StringIO('{"text": "fine"}\n{"text": ""}\n'))
    assert str(e.value).startswith("<stdin>:2: field 'text'"), str(e.value)


def test_an_evaluation_replaces_predictions_and_metrics_together(tmp_path):
    from llmcls.files import write_results

    pred, met = tmp_path / "eval" / "predictions.jsonl", tmp_path / "eval" / "metrics.json"
    write_results(pred, [{"i": 0}], met, {"accuracy": 0.5})
    old = pred.read_bytes(), met.read_bytes()

    def rows():  # the disk fills while the predictions are written
        yield {"i": 1}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_results(pred, rows(), met, {"accuracy": 0.9})
    assert (pred.read_bytes(), met.read_bytes()) == old and not _tmp_leftovers(pred.parent)
    write_results(pred, [{"i": 1}], met, {"accuracy": 0.9})
    assert json.loads(met.read_text()) == {"accuracy": 0.9}
