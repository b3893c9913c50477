"""Tracking as a user meets it: SwanLab's mode chosen from the API key, offline logs that hold config, metrics,
confusion matrix and samples, the local dashboard read back over HTTP, TensorBoard, and the per-step log lines."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import tiny_args


@pytest.fixture
def no_swanlab_key(monkeypatch, tmp_path):
    """No key in the environment nor saved by `swanlab login` (its .netrc lives under SWANLAB_ROOT)."""
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "swanlab-home"))
    monkeypatch.chdir(tmp_path)  # ./.swanlab/.netrc is looked up too
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "unused-swanlog"))  # local mode sets it; restore after


def test_swanlab_mode_follows_the_api_key(no_swanlab_key, monkeypatch, tmp_path):
    from llmcls.config import TrackConfig
    from llmcls.reporting.track import swanlab_mode

    assert swanlab_mode(TrackConfig(mode="auto")) == "offline"
    # A key saved by `swanlab login` is a .netrc: machine = API host, login = web host, password = key.
    root = tmp_path / "swanlab-home"
    root.mkdir()
    (root / ".netrc").write_text("machine https://api.swanlab.cn\n  login https://swanlab.cn\n"
                                 "  password 0123456789abcdefghijk\n")
    assert swanlab_mode(TrackConfig(mode="auto")) == "online"
    shutil.rmtree(root)
    monkeypatch.setenv("SWANLAB_API_KEY", "0123456789abcdefghijk")
    assert swanlab_mode(TrackConfig(mode="auto")) == "online"
    assert [swanlab_mode(TrackConfig(mode=m)) for m in ("cloud", "offline", "local", "disabled")] == \
        ["online", "offline", "local", "disabled"]


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "report.html", "baseline", "swanlog"))
    return dst


def read_swanlab_file(run_dir):
    """Records of an offline SwanLab run file, with SwanLab's own reader (what `swanlab sync` uploads)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (path,) = run_dir.glob("run-*.swanlab")
    reader = DataStoreReader()
    reader.open(path)
    out = []
    for raw in reader:
        rec = Record()
        rec.ParseFromString(raw)
        out.append(rec)
    reader.close()
    return out


def test_offline_by_default_logs_everything_and_eval_resumes_the_run(trained_run, tmp_path, no_swanlab_key):
    from llmcls.cli import main

    run = _copy_run(trained_run, tmp_path / "run")
    assert main(["eval", str(run), "--tracker", "swanlab", "--max-rows", "24"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    record = json.loads((run / "swanlog" / "llmcls-run.json").read_text())
    assert record["mode"] == "offline"
    (first,) = (run / "swanlog").glob("run-*")

    recs = read_swanlab_file(first)
    kinds = [r.WhichOneof("record_type") for r in recs]
    start = next(r.start for r in recs if r.HasField("start"))
    import yaml

    track = yaml.safe_load((run / "config.yaml").read_text())["track"]
    assert (start.project, start.name, start.id) == (track["project"], track["experiment"], record["id"])
    scalars = {r.scalar.key: r.scalar.value.number for r in recs if r.HasField("scalar")}
    assert scalars["eval/accuracy"] == pytest.approx(m["accuracy"])
    assert scalars["eval/macro_f1"] == pytest.approx(m["macro_f1"])
    for label, v in m["per_class"].items():
        assert scalars[f"eval/f1/{label}"] == pytest.approx(v["f1"])
    columns = {r.column.column_key: r.column.column_type for r in recs if r.HasField("column")}
    from swanlab.proto.swanlab.metric.column.v1.column_pb2 import ColumnType

    assert columns["eval/confusion_matrix"] == ColumnType.COLUMN_TYPE_ECHARTS
    assert columns["eval/confusion_matrix_image"] == ColumnType.COLUMN_TYPE_IMAGE
    assert columns["eval/samples"] == ColumnType.COLUMN_TYPE_TEXT
    assert "finish" in kinds

    # The confusion matrix sent is the one in metrics.json (the ECharts JSON holds the cell counts).
    (chart,) = (first / "media" / "echarts").glob("*.json")
    series = json.loads(chart.read_text())["series"][0]["data"]
    cm = m["confusion_matrix"]["matrix"]
    assert sorted(tuple(x) for x in series) == sorted((j, i, cm[i][j]) for i in range(len(cm))
                                                      for j in range(len(cm[i])))
    samples = [p.read_text() for p in (first / "media" / "text").glob("*.txt")]
    assert len(samples) == 10
    wrong = m["rows"] - round(m["accuracy"] * m["rows"])
    assert sum(s.startswith("[WRONG]") for s in samples) == min(5, wrong)
    assert sum(s.startswith("[OK]") for s in samples) == 10 - min(5, wrong)
    cfg_yaml = (first / "files" / "config.yaml").read_text()
    assert "max_length" in cfg_yaml and "128" in cfg_yaml  # the resolved config, not an empty one

    # A second eval continues the same SwanLab run (one experiment per run directory, after `swanlab sync`).
    assert main(["eval", str(run), "--tracker", "swanlab", "--max-rows", "12"]) == 0
    dirs = sorted((run / "swanlog").glob("run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(record["id"]) for d in dirs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.slow  # a training run and a dashboard server: the second tier keeps the default one under 8 minutes on 2 cores
def test_local_dashboard_serves_the_run_over_http(tmp_path, learnable_data, tokenizer_dir, no_swanlab_key):
    from llmcls.reporting.track import swanboard_available

    if not swanboard_available():
        pytest.skip("the SwanLab dashboard is not installed (pip install 'swanlab[dashboard]')")
    from llmcls.cli import main

    run = tmp_path / "local-run"
    args = tiny_args(learnable_data["train"], learnable_data["test"], run, **{
        "train.max_steps": 6, "train.logging_steps": 2, "data.max_train_rows": 96, "data.max_eval_rows": 20,
        "track.tracker": "swanlab", "track.mode": "local", "track.experiment": "tiny-local"})
    assert main(["run", *args, "--no-baseline"]) == 0
    train_log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in train_log if "loss" in r}
    m = json.loads((run / "eval" / "metrics.json").read_text())

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "swanlab", "watch", str(run / "swanlog"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline, project = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                project = _get(f"{base}/project")["data"]
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                time.sleep(0.5)
        assert project is not None, "dashboard did not answer within 60 s"
        exps = {e["name"]: e for e in project["experiments"]}
        train_exp = exps["tiny-local"]
        assert train_exp["config"]["train"]["value"]["max_steps"] == 6  # the resolved config reached it

        def tag(exp, key):
            return _get(f"{base}/experiment/{exp['id']}/tag/{urllib.parse.quote(key, safe='')}")["data"]

        served = {p["index"]: p["data"] for p in tag(train_exp, "train/loss")["list"]}
        assert served.keys() == losses.keys() and len(losses) >= 3
        assert all(served[k] == pytest.approx(v, rel=1e-6) for k, v in losses.items())
        # Eval resumes the training run's id; the local dashboard lists it as a second experiment of the project.
        eval_exp = next(e for e in project["experiments"] if e["id"] != train_exp["id"])
        (acc,) = tag(eval_exp, "eval/accuracy")["list"]
        assert acc["data"] == pytest.approx(m["accuracy"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tensorboard_tracker(trained_run, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is the alternative tracker: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmcls.cli import main

    run = _copy_run(trained_run, tmp_path / "run")
    assert main(["eval", str(run), "--tracker", "tensorboard", "--max-rows", "24"]) == 0
    m = json.loads((run / "eval" / "metrics.json").read_text())
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert acc.Scalars("eval/accuracy")[-1].value == pytest.approx(m["accuracy"], abs=1e-6)
    assert {f"eval/f1/{c}" for c in m["per_class"]} <= set(tags["scalars"])
    assert "eval/confusion_matrix" in tags["images"]
    assert any(t.startswith("eval/samples") for t in tags["tensors"])  # add_text lands as a text tensor


def test_one_log_line_per_logging_step(trained_run):
    """train_log.jsonl: every logging step has loss, lr, tokens/s and a memory figure (RSS on a CPU)."""
    cfg_steps = 5  # tiny_args: train.logging_steps 5
    total = json.loads((trained_run / "train_summary.json").read_text())["global_step"]
    log = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1] + list(range(cfg_steps, total + 1, cfg_steps))
    for r in steps:
        assert r["learning_rate"] >= 0 and r["tokens_per_s"] > 0, r
        assert ("peak_mem_gib" in r) or (0.05 < r["peak_rss_gib"] < 64), r
    assert all(r.get("tokens_per_s", 1) > 0 for r in log)  # the closing summary record carries no false 0


def test_dev_metrics_reach_the_tracker(tmp_path, learnable_data, tokenizer_dir):
    """The dev evaluations during training go through the Trainer's log: the tracker (TensorBoard here; SwanLab
    gets the same records through its callback) holds every value train_log.jsonl holds."""
    pytest.importorskip("tensorboard", reason="pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import tiny_args
    from llmcls.cli import main

    run = tmp_path / "run"
    assert main(["train", *tiny_args(learnable_data["train"], learnable_data["test"], run, **{
        "track.tracker": "tensorboard", "data.dev_fraction": 0.25, "eval.every_steps": 4, "train.epochs": 2,
        "train.select_best": "accuracy"})]) == 0
    logged = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    dev = {r["step"]: r["dev_accuracy"] for r in logged if "dev_accuracy" in r}
    acc = EventAccumulator(str(run / "tensorboard")).Reload()
    (tag,) = [t for t in acc.Tags()["scalars"] if t.endswith("dev_accuracy")]
    seen = {e.step: e.value for e in acc.Scalars(tag)}
    assert len(dev) >= 5 and seen.keys() == dev.keys()
    assert all(seen[s] == pytest.approx(v, abs=1e-6) for s, v in dev.items())
