"""The GPU check script's code paths, on the CPU at toy sizes.

``bench/gpu_check.sh`` only earns its keep on the day a GPU is lent (15 minutes of device time
per task): it must not be broken by then. ``GPU_CHECK_SMOKE=1`` runs every part of it on the CPU
with tiny batches; the numbers it prints mean nothing, the lines must be there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_in_cpu_smoke_mode():
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "PYTHON": sys.executable, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # part 1: both models' training steps timed, and their ratio
    for model in ("DAN-ResNet-50", "plain ResNet-50"):
        assert re.search(rf"{model}\s+batch 4 @ 64px bf16:\s+\d+ img/s", out), out[-4000:]
    ratio = float(re.search(r"DAN / plain cost ratio: ([0-9.]+)", out).group(1))
    assert ratio > 0
    # part 2: the real trainer, one epoch, its images/s read back from history.csv
    assert re.search(r"ferflow\.train end to end \(loader, 2 workers.*\): \d+ img/s", out), out[-4000:]
    # part 3: batched RetinaFace at each batch size
    assert "CPU smoke test" in out
    assert "part 3 failed" not in out
    # part 4: the paper's settings on one device and on all (two CPU ranks in the smoke mode), the
    # memory cap forcing micro-batches of 6
    for where in ("1 CPU process", "2 CPU processes"):
        line = re.search(rf"paper settings \(resnet50, 64 px, batch 1024\) on {where}: micro-batch (\d+) per device, "
                         rf"(\d+) img/s, peak memory ([0-9.]+) GiB per device, loss ([0-9.]+)", out)
        assert line, out[-4000:]
        assert int(line.group(1)) == 6 and float(line.group(3)) > 0 and float(line.group(4)) > 0
    # part 5: every fault check ran and passed
    for check in ("bf16 steps vs float32 CPU reference:", "kill -9 and resume:", "predict and extract:",
                  "claims with a preset multi-id CUDA_VISIBLE_DEVICES:"):
        assert check in out, out[-4000:]
    assert len(re.findall(r"step \d: loss float32 CPU [0-9.]+, bf16 cpu [0-9.]+", out)) == 3
    assert re.search(r"claims under CUDA_VISIBLE_DEVICES=0,1: (0 0 and 1 1|1 1 and 0 0)", out), out[-4000:]
    assert "part 5: all checks passed" in out and "GPU check: all parts passed" in out


# ------------------------------------------------------------------------------------------------
# the benchmarks' shared timing (bench/_abba.py) and each bench's smoke mode

sys.path.insert(0, str(REPO / "bench"))
import _abba  # noqa: E402

RATIO = re.compile(r"^(RATIO|[ ]+)(.*?): ([0-9.]+)x \(range ([0-9.]+)-([0-9.]+), median of (\d+) rounds\)", re.MULTILINE)


def test_rounds_run_the_sides_in_palindromic_order_and_give_one_ratio_per_round():
    calls = []
    costs = {"a": iter([1.0, 3.0, 2.0, 2.0, 5.0, 1.0]), "b": iter([2.0, 2.0, 4.0, 4.0, 1.0, 1.0])}

    def side(name):
        def run():
            calls.append(name)
            return next(costs[name])
        return run

    lines = []
    per_round = _abba.run_rounds({"a": side("a"), "b": side("b")}, 3, log=lines.append)
    assert calls == ["a", "b", "b", "a"] * 3
    # each side's cost in a round is the sum of its two runs
    assert per_round == [{"a": 4.0, "b": 4.0}, {"a": 4.0, "b": 8.0}, {"a": 6.0, "b": 2.0}]
    assert _abba.ratios(per_round, "b", "a") == [1.0, 2.0, 2.0 / 6.0]
    assert _abba.summary([1.0, 2.0, 1 / 3]) == (1.0, 1 / 3, 2.0)
    assert len(lines) == 3 and lines[1].startswith("  round 2: a 4.000 s, b 8.000 s")
    m = RATIO.search(_abba.ratio_line("RATIO x", [1.0, 2.0, 1 / 3], goal="goal >= 1"))
    assert m and m.group(3, 4, 5, 6) == ("1.00", "0.33", "2.00", "3") and "[goal >= 1]" in m.string


def test_three_sides_and_warmup():
    calls = []
    sides = {k: (lambda k=k: calls.append(k) or 1.0) for k in "abc"}
    _abba.run_rounds(sides, 1, warmup=1, log=None)
    assert calls == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a"]
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        _abba.run_rounds(sides, 0)


def test_load_line_gives_the_load_average_and_cpus():
    line = _abba.load_line()
    one = os.getloadavg()[0]
    m = re.match(r"load average ([0-9.]+) ([0-9.]+) ([0-9.]+) \(1, 5, 15 min\) on (\d+) CPUs", line)
    assert m and int(m.group(4)) == os.cpu_count() and abs(float(m.group(1)) - one) < 5


def run_bench(script: str, *args: str) -> tuple[str, dict[str, tuple[float, float, float, int]]]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert proc.stdout.startswith("load average "), out[:500]
    ratios = {}
    for m in RATIO.finditer(proc.stdout):
        med, lo, hi, n = float(m.group(3)), float(m.group(4)), float(m.group(5)), int(m.group(6))
        assert 0 < lo <= med <= hi, m.group(0)
        ratios[m.group(2).strip()] = (med, lo, hi, n)
    return proc.stdout, ratios


def test_evaluate_bench_smoke_mode():
    out, ratios = run_bench("evaluate.py", "--frames", "20000", "--variants", "2", "--rounds", "2")
    assert "results agree" in out
    assert [k.split(" (")[0] for k in ratios] == ["ours / polars", "ours / pandas"]
    assert all(n == 2 for *_, n in ratios.values())
    assert re.search(r"round 2: ours [0-9.]+ s, polars [0-9.]+ s, pandas [0-9.]+ s", out)


@pytest.mark.slow
def test_dag_bench_smoke_mode():
    out, ratios = run_bench("dag.py", "--videos", "12", "--variants", "1", "--rounds", "1")
    assert re.search(r"ferflow [0-9.]+ s \(\d+ jobs\)", out)
    assert list(ratios) == ["ferflow dry run / empty workflow's, time"]


@pytest.mark.slow
def test_train_step_bench_smoke_mode():
    out, ratios = run_bench("train_step.py", "--quick")
    (label, (med, *_)), = ratios.items()
    flop_ratio = float(re.search(r"FLOPs, ([0-9.]+)\)", label).group(1))
    assert 1.0 < flop_ratio < 2.0  # DAN does more arithmetic than the plain ResNet-18, not twice as much
    time_ratio = float(re.search(r"^resnet18\s+112 \|.*?\|\s+([0-9.]+) ", out, re.MULTILINE).group(1))
    assert abs(med - time_ratio / flop_ratio) < 0.02  # the headline is the time ratio over the FLOP ratio


@pytest.mark.slow
def test_train_step_bench_per_head_side_in_cpu_seconds():
    """``--per-head`` times DAN with its heads one by one as a third side: with one round, its
    ratio over FLOPs is the headline times (per-head / fused step time), as the three are
    computed from the same round's seconds."""
    out, ratios = run_bench("train_step.py", "--quick", "--per-head", "--threads", "1", "--cpu-time")
    assert "1 threads" in out and "CPU seconds" in out
    (head, *_), (per_head, *_), (slower, *_) = ratios.values()
    assert [k.split(":")[0] for k in ratios][1:] == ["resnet18 112px, heads one by one",
                                                    "resnet18 112px"]
    assert abs(per_head - head * slower) < 0.02 * per_head


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="bench/omp_regions.py compiles its shim with cc")
def test_omp_regions_counts_fewer_regions_with_the_heads_fused():
    out, _ = run_bench("omp_regions.py", "--batch-size", "4", "--size", "64")
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(.+?): (\d+) parallel regions per training step",
                                                                out, re.MULTILINE)}
    assert list(counts) == ["DAN, heads fused", "DAN, heads one by one", "plain"], out
    assert 0 < counts["plain"] < counts["DAN, heads fused"] < counts["DAN, heads one by one"], counts


def test_train_step_bench_refuses_cpu_time_with_two_threads():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--cpu-time", "--threads", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--cpu-time needs --threads 1" in proc.stderr


@pytest.mark.slow
def test_loader_bench_smoke_mode():
    out, ratios = run_bench("loader.py", "--n", "192", "--batch-size", "32", "--rounds", "1")
    assert [k.split(" (")[0].split(" with")[0] for k in ratios] == [
        "ferflow / folder loader", "ferflow / torchvision ImageFolder + DAN's standard transforms", "ferflow / decode limit"]


@pytest.mark.slow
def test_extract_bench_smoke_mode():
    out, ratios = run_bench("extract.py", "--quick")
    labels = list(ratios)
    assert labels[0].startswith("equal settings (ours, batch 1 / predict_jsons(max_size=160)")  # auto: 1 on a CPU
    assert labels[1].startswith("same rounds, ours at batch 2")
    assert labels[2].startswith("settings, not implementation")
    assert "mean IoU of detect_every=5 boxes" in out


@pytest.mark.slow
def test_annotate_bench_smoke_mode():
    out, ratios = run_bench("annotate.py", "--quick")
    assert list(ratios) == ["runner, folded / unfolded speed"] + [
        f"{d}, {b}, annotate / plain loop frames/s" for d in ("mtcnn", "haar") for b in ("torch", "onnx")]
    assert "detects every 5th frame" in out and "plain loop: detects every frame" in out
    # where the time goes: every side split into detector, networks and the rest, and the plain
    # loop detected all 8 frames while annotate detected fewer
    sides = re.findall(r"^  (loop|annotate) (torch|onnx) .*?detector +([0-9.]+)%, networks +([0-9.]+)%, rest +"
                       r"(-?[0-9.]+)%; (\d+) of 8 frames detected", out, re.MULTILINE)
    assert len(sides) == 8, out
    for kind, _, det, nets, rest, detected in sides:
        assert abs(float(det) + float(nets) + float(rest) - 100) < 0.3
        assert (int(detected) == 8) if kind == "loop" else (int(detected) < 8)


def test_peak_reports_the_stage_process_own_peak_not_the_parent_size(tmp_path):
    """bench/_peak.py: the child's VmHWM counts what the child allocated (a 300 MB buffer it fills)
    and not the memory of the process that started it, which the child's ru_maxrss does carry over
    (the bug it replaces in bench/scale.py: a parent holding a big input read as the stage's peak)."""
    import resource

    script = tmp_path / "alloc.py"
    script.write_text("import sys\nbuf = bytearray(int(sys.argv[1]) * 2**20)\nbuf[::4096] = b'x' * len(buf[::4096])\n")
    parent_ballast = bytearray(600 * 2**20)
    parent_ballast[::4096] = b"y" * len(parent_ballast[::4096])  # resident in this process
    results = {}
    for mb in (50, 300):
        peak_file = tmp_path / f"peak{mb}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, str(REPO / "bench" / "_peak.py"), str(script), str(mb)], check=True,
                       env={**os.environ, "FERFLOW_PEAK_FILE": str(peak_file)})
        results[mb] = int(peak_file.read_text()) / 1024  # MiB
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    del parent_ballast
    # the script's own peak: its buffer plus a Python interpreter (tens of MB), never the parent's 600 MB
    assert 300 <= results[300] < 300 + 150, results
    assert 50 <= results[50] < 50 + 150, results
    assert 240 <= results[300] - results[50] <= 260, results
    # what ru_maxrss says of the same children: at least the parent's ballast (why it is not used)
    assert max(before, after) / 1024 >= 600, (before, after)


def test_peak_runs_a_module_with_its_arguments_and_exit_status(tmp_path):
    peak_file = tmp_path / "peak"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "_peak.py"), "-m", "json.tool", "--no-such-flag"],
                          env={**os.environ, "FERFLOW_PEAK_FILE": str(peak_file)}, capture_output=True, text=True)
    assert proc.returncode == 2 and "--no-such-flag" in proc.stderr  # argparse of json.tool saw the argument
    assert int(peak_file.read_text()) > 1000  # KiB: written on sys.exit too
