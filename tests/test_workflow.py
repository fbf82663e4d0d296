"""The whole workflow on the tiny demo config, and each stage's CLI on its own."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from ferflow.schemas import ACCOUNTING, LABELS, read_table
from workflow_helpers import CONFIG, TINY, env, snakemake

STAGES = ["demo", "index", "extract", "shards", "train", "predict", "temporal", "evaluate", "report"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_cli(stage):
    proc = subprocess.run([sys.executable, "-m", f"ferflow.{stage}", "--help"], env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


TEST_VIDEO = "t03-30-320x240"  # a validation video of the tiny demo, also listed as a test video


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny demo, with a test list: every stage runs, the ABAW3 submission included."""
    import yaml

    work = tmp_path_factory.mktemp("tiny")
    (work / "test_list.txt").write_text(f"{TEST_VIDEO}\n")
    sources = yaml.safe_load(CONFIG.read_text())["sources"]
    for src in sources:
        if src["kind"] == "affwild2":
            src["test_list"] = "test_list.txt"
    extra = work / "with_test_list.yaml"
    # the temporal stage on (tiny.yaml turns it off), and the submission from the temporal heads
    extra.write_text(yaml.safe_dump({"sources": sources, "evaluation": {"submission_source": "temporal"},
                                     "temporal": {"enabled": True}}))
    configs = (CONFIG, TINY, extra)
    proc = snakemake(work, configs=configs)
    return work, proc, configs


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tiny_run):
    work, proc, _ = tiny_run
    metrics = json.loads((work / "results" / "evaluation" / "metrics.json").read_text())
    keys = {"expr_f1", "va_ccc_valence", "va_ccc_arousal", "va_ccc_mean"}
    assert keys <= set(metrics["ensemble"])
    assert set(metrics["variants"]) == {"a", "b"}
    for m in [metrics["ensemble"], *metrics["variants"].values()]:
        assert 0.0 <= m["expr_f1"] <= 1.0 and -1.0 <= m["va_ccc_mean"] <= 1.0
    # the run prints the accounting table and the ensemble line at the end
    out = proc.stdout + proc.stderr
    assert "accounting:" in out and "ensemble: expr_f1=" in out
    # every annotated frame is accounted for: written rows are exactly the labelled shard samples
    acc = read_table(work / "results" / "accounting.parquet", ACCOUNTING)
    labels = read_table(work / "results" / "shards" / "labels.parquet", LABELS)
    assert acc.filter(pl.col("status") == "written").height == labels.height
    assert set(acc["source"]) == {"affwild2", "affectnet", "expw"}
    # the demo's +3-line annotation file shows up as beyond_video_end, never silently
    assert acc.filter(pl.col("reason") == "beyond_video_end").height == 3
    # every split has samples; the test video has every decoded frame, without labels
    assert set(labels["split"]) == {"train", "validation", "test"}
    test = labels.filter(pl.col("split") == "test")
    assert test["expression"].is_null().all() and test.height == 40


@pytest.mark.slow
def test_temporal_stage_runs_per_variant_and_is_scored_beside_frame_level(tiny_run):
    from ferflow.schemas import FEATURES, PREDICTIONS
    from ferflow.truth import SCORED_REASONS

    work, proc, _ = tiny_run
    results = work / "results"
    metrics = json.loads((results / "evaluation" / "metrics.json").read_text())
    acc = read_table(results / "accounting.parquet", ACCOUNTING)
    for split in ("train", "validation", "test"):
        scored = acc.filter((pl.col("split") == split) & (
            (pl.col("status") == "written") | pl.col("reason").is_in(list(SCORED_REASONS))))
        for variant in ("a", "b"):
            feats = read_table(results / "features" / variant / f"{split}.parquet", FEATURES)
            # one row per scored frame, has_face exactly where a crop was written
            assert feats.height == scored.height
            written = set(zip(scored.filter(pl.col("status") == "written")["video"],
                              scored.filter(pl.col("status") == "written")["frame"]))
            assert feats["has_face"].to_list() == [(v, f) in written for v, f in zip(feats["video"], feats["frame"])]
            assert feats.filter(pl.col("has_face"))["feature"].null_count() == 0
    for variant in ("a", "b"):
        assert (results / "temporal" / variant / "model.pt").is_file()
        pred = read_table(results / "temporal" / variant / "validation.parquet", PREDICTIONS)
        assert pred.height > 0 and set(pred["split"]) == {"validation"}
        assert "trained in" in (work / "logs" / "train_temporal" / f"{variant}.log").read_text()
    t = metrics["temporal"]
    assert set(t["variants"]) == {"a", "b"}
    for m in [t["ensemble"], *t["variants"].values()]:
        assert 0.0 <= m["expr_f1"] <= 1.0 and -1.0 <= m["va_ccc_mean"] <= 1.0
        assert m["n_frames"] == metrics["ensemble"]["n_frames"]
    assert "temporal head changes ensemble expr_f1" in (results / "evaluation" / "summary.txt").read_text()
    html = (results / "report" / "summary.html").read_text()
    assert "temporal head" in html
    sub = json.loads((results / "submission" / "metrics.json").read_text())["submission"]
    assert sub["source"] == "temporal" and not sub["problems"]


@pytest.mark.slow
def test_submission_has_a_line_per_frame(tiny_run):
    work, _, _ = tiny_run
    sub = work / "results" / "submission" / "abaw3"
    expr = (sub / "EXPR" / f"{TEST_VIDEO}.txt").read_text().splitlines()
    va = (sub / "VA" / f"{TEST_VIDEO}.txt").read_text().splitlines()
    assert expr[0] == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
    assert va[0] == "valence,arousal"
    assert len(expr) == len(va) == 1 + 40   # the tiny demo's videos have 40 frames
    assert all(0 <= int(x) < 8 for x in expr[1:])
    assert all(-1 <= float(v) <= 1 for line in va[1:] for v in line.split(","))


@pytest.mark.slow
def test_the_demo_ends_by_annotating_its_two_person_video(tiny_run):
    from ferflow.schemas import ANNOTATIONS

    work, _, _ = tiny_run
    out = work / "results" / "annotated"
    table = read_table(out / "t01-30-480x270.parquet", ANNOTATIONS)
    assert sorted(set(table["frame"])) == list(range(40))  # the tiny demo's videos have 40 frames
    assert table["track"].drop_nulls().n_unique() >= 2  # both people have a track
    assert (out / "t01-30-480x270.png").read_bytes()[:4] == b"\x89PNG"
    from ferflow.extract import count_frames

    assert count_frames(str(out / "t01-30-480x270.mp4")) == 40


@pytest.mark.slow
def test_second_run_has_nothing_to_do(tiny_run):
    work, _, configs = tiny_run
    proc = snakemake(work, "-n", configs=configs)
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_temporal_setting_reruns_only_the_temporal_stage_and_what_follows(tiny_run, tmp_path):
    work, _, configs = tiny_run
    change = tmp_path / "window.yaml"
    change.write_text("temporal:\n  window: 33\n")  # tiny.yaml: 16
    out = snakemake(work, "-n", configs=(*configs, change))
    jobs = _jobs_to_run(out)
    assert jobs["train_temporal"] == 2 and jobs["predict_temporal"] == 4  # 2 variants x (validation, test)
    # features, frame-level predictions and training are not redone
    assert set(jobs) <= {"train_temporal", "predict_temporal", "evaluate_ensemble", "export_submission",
                         "report_evaluation", "annotate_video", "all"}, jobs
    (reason,) = {line for line in (out.stdout + out.stderr).splitlines()
                  if "Params have changed" in line and "temporal.window" in line}
    assert "temporal.window=16" in reason and "temporal.window=33" in reason and "temporal.epochs" not in reason


def test_config_error_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards:\n  samples_per_shard: 0\n")
    proc = snakemake(tmp_path, "-n", configs=(CONFIG, bad), check=False)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "samples_per_shard" in err and "minimum" in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "demo_data").exists()


def test_unknown_config_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainig:\n  epochs: 2\n")
    proc = snakemake(tmp_path, "-n", configs=(CONFIG, bad), check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # one line for the problem (ferflow.config_check), not the whole schema
    assert "\n  trainig: unknown key (closest valid: 'training')\n" in out
    assert "additionalProperties" not in out and len(out.splitlines()) < 15, out


@pytest.mark.slow
def test_report_holds_metrics_and_plots(tiny_run):
    work, _, configs = tiny_run
    snakemake(work, "--report", "report.html", configs=configs)
    html = (work / "report.html").read_text(errors="replace")
    for name in ("metrics.json", "summary.txt", "confusion.png", "f1_per_class.png", "va_hist.png", "curves.png"):
        assert name in html, name
    assert html.count("data:image/png;base64") + html.count("image/png") >= 4


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_report_landing_page_in_a_browser(tiny_run, tmp_path):
    """Opens the report in headless Chromium: the landing page (what the report shows first) holds
    the metrics table and the per-video table; a screenshot is taken; the figures are non-empty PNGs."""
    work, _, configs = tiny_run
    for name in ("summary.html", "per_video.csv", "per_video.png", "va_over_time.png", "class_support.png"):
        data = (work / "results" / "report" / name).read_bytes()
        assert len(data) > 100, name
        if name.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (.ci/system-deps installs Debian's chromium): the report is not opened in a browser")
    snakemake(work, "--report", str(tmp_path / "landing.html"), configs=configs)
    page = (tmp_path / "landing.html").as_uri()
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1400,2000"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=300)
    assert dom.returncode == 0, dom.stderr[-3000:]
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.rows, self._table = [], {}, None

        def handle_starttag(self, tag, attrs):
            if tag == "table" and dict(attrs).get("id", "").startswith("ferflow-"):
                self._table = dict(attrs)["id"]
                self.ids.append(self._table)
                self.rows[self._table] = 0
            elif tag == "tr" and self._table:
                self.rows[self._table] += 1

        def handle_endtag(self, tag):
            if tag == "table":
                self._table = None

    tables = Tables()
    tables.feed(dom.stdout)
    # rendered by the report's own JavaScript on its first view, not only present in its source
    assert tables.ids[:2] == ["ferflow-metrics", "ferflow-per-video"], tables.ids
    metrics = json.loads((work / "results" / "evaluation" / "metrics.json").read_text())
    n_models = (len(metrics["variants"]) + 1) * (2 if metrics["smoothed"] else 1)
    if metrics.get("temporal"):  # the temporal heads' rows: one per variant and the ensemble
        n_models += len(metrics["temporal"]["variants"]) + 1
    assert tables.rows["ferflow-metrics"] == 1 + n_models
    per_video = (work / "results" / "report" / "per_video.csv").read_text().splitlines()
    assert tables.rows["ferflow-per-video"] == len(per_video)  # header + one row per video, both
    shot = tmp_path / "landing.png"
    proc = subprocess.run([*browser, f"--screenshot={shot}", page], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-3000:]


def test_even_smoothing_window_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluation:\n  smoothing: 4\n")
    proc = snakemake(tmp_path, "-n", configs=(CONFIG, bad), check=False)
    assert proc.returncode != 0 and "smoothing" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cropped_aligned_faces_replace_detection(tmp_path):
    """With `cropped_aligned` set, Aff-Wild2's own 1-based NNNNN.jpg faces are used, no detection."""
    import cv2
    import numpy as np

    from ferflow import demo

    plan = demo.generate(tmp_path / "data", seed=0, size="tiny")
    unit = next(u for u in plan.units if len(u.annotations) == 1)
    name = unit.annotations[0].name
    crops = tmp_path / "cropped_aligned" / name
    crops.mkdir(parents=True)
    for i in range(1, unit.n_frames + 1, 2):  # every other frame has a face file (1-based names)
        cv2.imwrite(str(crops / f"{i:05d}.jpg"), np.full((112, 112, 3), i % 255, np.uint8))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
demo: {{enabled: false}}
sources:
  - name: aw
    kind: affwild2
    root: {tmp_path / 'data' / 'affwild2'}
    cropped_aligned: {tmp_path / 'cropped_aligned'}
extract: {{detector: retinaface, retinaface_weights: null}}  # no weights reachable here: detection would fail
""")
    snakemake(tmp_path, f"results/faces/aw/{unit.stem}.parquet", configs=(CONFIG, TINY, cfg))
    faces = pl.read_parquet(tmp_path / "results" / "faces" / "aw" / f"{unit.stem}.parquet")
    assert faces.height == unit.n_frames
    # frame f is file f+1: files exist for odd numbers, i.e. even frames
    got = dict(faces.select("frame", "status").iter_rows())
    assert {f for f, s in got.items() if s == "missing"} == set(range(1, unit.n_frames, 2))
    assert {s for f, s in got.items() if f % 2 == 0} == {"provided"}
    assert set(faces.filter(pl.col("status") == "provided")["crop"]) == {"cropped_aligned"}


def _jobs_to_run(proc) -> dict[str, int]:
    """``{rule: count}`` from the job stats of a dry run (empty when there is nothing to do)."""
    import re

    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    stats = out.split("Job stats:", 1)[1]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE) if rule != "total"}


def _replace_keeping_an_old_mtime(path, data: bytes, tmp_dir) -> None:
    """As `cp -p` / `rsync -t` / unzip do: new content, with a modification time a day older."""
    import os
    import shutil

    new = tmp_dir / f"new{path.suffix}"
    new.write_bytes(data)
    old = path.stat().st_mtime - 86400
    os.utime(new, (old, old))
    shutil.copy2(new, path)  # content and times, like cp -p
    assert path.stat().st_mtime == old and path.read_bytes() == data


@pytest.mark.slow
def test_content_change_with_an_older_mtime_reruns_what_depends_on_it(tmp_path):
    """Aff-Wild2 in its native layout (the tiny demo's, as a user's data): after a run, an
    annotation file and a video replaced by files with new content and an older mtime rerun exactly
    the jobs that read them and what follows; unchanged inputs rerun nothing."""
    from ferflow import demo

    plan = demo.generate(tmp_path / "data", seed=0, size="tiny")
    root = tmp_path / "data" / "affwild2"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"demo: {{enabled: false}}\nsources:\n  - {{name: aw, kind: affwild2, root: {root}}}\n")
    configs = (CONFIG, TINY, cfg)
    target = "results/accounting.parquet"
    snakemake(tmp_path, target, configs=configs)
    assert _jobs_to_run(snakemake(tmp_path, "-n", target, configs=configs)) == {}
    assert len(plan.units) >= 3  # so that "exactly" means something: the other videos are not extracted again

    # an annotation file: one label changed, the file's mtime a day older than before
    ann = sorted(root.glob("EXPR_Classification_Challenge/*/*.txt"))[0]
    lines = ann.read_text().splitlines()
    lines[1] = "7" if lines[1].strip() != "7" else "0"
    _replace_keeping_an_old_mtime(ann, ("\n".join(lines) + "\n").encode(), tmp_path)
    assert _jobs_to_run(snakemake(tmp_path, "-n", target, configs=configs)) == {"index_source": 1, "write_shards": 1}
    snakemake(tmp_path, target, configs=configs)
    assert _jobs_to_run(snakemake(tmp_path, "-n", target, configs=configs)) == {}
    manifest = pl.read_parquet(tmp_path / "results" / "manifest" / "aw.parquet")
    row = manifest.filter((pl.col("video") == ann.stem) & (pl.col("frame") == 0))
    assert row["expression"].to_list() == [int(lines[1])]  # the new label is in the manifest

    # a video: another video's content (new size and bytes), the mtime a day older (the
    # fingerprints of the first run are cached: the replaced file's new ctime makes it computed again)
    video, other = sorted((root / "videos").iterdir())[:2]
    _replace_keeping_an_old_mtime(video, other.read_bytes(), tmp_path)
    assert _jobs_to_run(snakemake(tmp_path, "-n", target, configs=configs)) == {"extract_video_faces": 1,
                                                                                 "write_shards": 1}


def _dry_run_resources(proc, rule: str) -> dict[str, dict[str, str]]:
    """``{output file name: {resource: value}}`` of the jobs of ``rule`` in a dry run's job list."""
    import re

    out, jobs = proc.stdout + proc.stderr, {}
    for block in out.split("\nrule ")[1:]:
        if not block.startswith(rule + ":"):
            continue
        output = re.search(r"^\s+output: ([^,\s]+)", block, re.MULTILINE).group(1)
        res = re.search(r"^\s+resources: (.+)$", block, re.MULTILINE).group(1)
        jobs[Path(output).name] = dict(kv.split("=", 1) for kv in res.split(", "))
    return jobs


def test_extraction_asks_for_time_and_disk_by_the_video_length_and_flat_memory(tmp_path):
    """extract_video_faces' resources come from bench/scale.py's figures (common.smk): runtime and
    disk grow with the frames of the unit (its annotation files' lines), memory does not; RetinaFace
    asks for more than its measured peak (1042 MiB) and costs more time per frame than MTCNN."""
    from ferflow import demo

    plan = demo.generate(tmp_path / "data", seed=0, size="tiny")
    root = tmp_path / "data" / "affwild2"
    asked = {}
    for detector in ("retinaface", "mtcnn"):
        cfg = tmp_path / f"{detector}.yaml"
        cfg.write_text(f"demo: {{enabled: false}}\nsources:\n  - {{name: aw, kind: affwild2, root: {root}}}\n"
                       f"extract: {{detector: {detector}, device: cpu}}\n")
        proc = snakemake(tmp_path, "-n", "-p", "results/accounting.parquet", configs=(CONFIG, TINY, cfg))
        asked[detector] = _dry_run_resources(proc, "extract_video_faces")
    units = {f"{u.stem}.tar": u for u in plan.units}
    assert set(asked["retinaface"]) == set(units)
    for name, res in asked["retinaface"].items():
        unit = units[name]
        lines = max((tmp_path / "data" / f).read_bytes().count(b"\n") for f in plan.files  # a header + a line per frame
                    if f.endswith(".txt") and Path(f).stem in {a.name for a in unit.annotations})
        persons = len(unit.annotations)
        assert int(res["disk_mb"]) == int(100 + lines * persons * 20 / 1000)  # 20 kB per crop, 100 MB spare
        assert int(res["runtime"]) == int(10 + 2 * lines * 0.15 / 60)  # twice 0.15 CPU-s per frame, 10 min spare
        assert int(res["mem_mb"]) >= 1100 and res["mem_mb"] == next(iter(asked["retinaface"].values()))["mem_mb"]
        assert int(asked["mtcnn"][name]["runtime"]) <= int(res["runtime"])
