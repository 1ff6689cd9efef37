"""tools/gpu_check.py's non-GPU parts: phase time limits, reading each phase's output, the table, and the table read
back by tools/plan_run.py --measured. (The whole script at toy sizes on CPU: `python tools/gpu_check.py --dry-run`.)"""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402
import plan_run  # noqa: E402


def test_a_phase_over_its_limit_is_killed_with_its_children(tmp_path):
    start = time.time()
    cmd = [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"]
    phase = gpu_check.run_phase("slow", cmd, 1.0, tmp_path, {"PATH": "/usr/bin:/bin"})
    assert phase["status"] == "timeout" and time.time() - start < 15
    ok = gpu_check.run_phase("quick", [sys.executable, "-c", "print('hi')"], 30, tmp_path, {})
    assert ok["status"] == "ok" and "hi" in Path(ok["log"]).read_text()


def test_phase_outputs_are_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 10, "perf/samples_per_s": 90.0, "perf/mfu": 0.2}, {"step": 11, "epic/x": 1.0},
            {"step": 20, "perf/samples_per_s": 100.0, "perf/tflops_per_device": 76.5, "perf/mfu": 0.25,
             "perf/peak_mem_gib": 40.0, "perf/flops_per_sample": 7.65e11, "train/loss": 11.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    perf = gpu_check.last_perf(run)
    assert perf["step"] == 20 and perf["mfu"] == 0.25 and perf["windows"] == 2
    assert gpu_check.last_perf(tmp_path / "missing") == {}

    bench = {"results": [
        {"op": "tok", "provider": "fused (triton)", "ms": 1.0, "peak_mib": 10.0},
        {"op": "tok", "provider": "eager", "ms": 3.0, "peak_mib": 50.0},
        {"op": "voc", "provider": "fused (triton tiles + cuBLAS)", "ms": 2.0, "peak_mib": 100.0},
        {"op": "voc", "provider": "streaming reference (torch tiles)", "ms": 9.0, "peak_mib": 120.0},
        {"op": "voc", "provider": "eager linear+log_softmax+multinomial", "ms": 2.5, "peak_mib": 800.0},
        {"op": "sal", "provider": "eager (vectorised torch)", "ms": None, "peak_mib": None, "error": "x"}]}
    (tmp_path / "k.json").write_text(json.dumps(bench))
    kernels = {k["op"]: k for k in gpu_check.kernel_rows(tmp_path / "k.json")}
    assert set(kernels) == {"tok", "voc"}  # an op without both timings is left out
    assert kernels["tok"]["speedup"] == 3.0 and kernels["voc"]["memory_ratio"] == 8.0
    assert kernels["voc"]["fused"].startswith("fused")

    log = tmp_path / "probe.log"
    lines = [{"probe": "on", "batch": b, "fits": b <= 96, "peak_gib": b / 2, "s_per_sample": 0.01, "cap": 1024}
             for b in (32, 64, 128, 96, 112)]
    log.write_text("noise\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    assert gpu_check.probe_result(str(log)) == {"largest": 96, "peak_gib": 48.0, "s_per_sample": 0.01, "tries": 5,
                                                "capped": False}


def fabricated_report(mfu_bf16=0.312):
    return {"meta": {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "deepspeed": "0.19.8",
                     "date": "today", "dry_run": False},
            "sizes": gpu_check.sizes(False),
            "phases": {"prepare": {"status": "ok", "seconds": 40.0},
                       "epic_fp16": {"status": "failed (rc 1)", "seconds": 12.0, "note": "boom"}},
            "runs": {"epic_bf16": {"samples_per_s": 400.0, "tflops": 308.6, "mfu": mfu_bf16, "peak_mem_gib": 55.5,
                                   "flops_per_sample": 7.715e11, "loss": 11.1}, "epic_fp16": {}},
            "probes": {"probe_off": {"largest": 120, "peak_gib": 130.0, "s_per_sample": 0.002, "capped": False},
                       "probe_on": {"largest": 1024, "peak_gib": 90.0, "s_per_sample": 0.003, "capped": True}},
            "kernels": [{"op": "tok", "fused": "fused", "fused_ms": 1.0, "eager_ms": 2.5, "speedup": 2.5,
                         "fused_mib": 10.0, "eager_mib": 20.0, "memory_ratio": 2.0}]}


def test_the_table_reads_back_into_plan_run(tmp_path):
    table = gpu_check.render_table(fabricated_report())
    assert "| EPIC-METER, VLM bf16 + generator fp16 | 400.0 | 308.6 | 0.312 | 55.5 | 771.5 | 11.100 |" in table
    assert "| on | 1024+ (cap) |" in table and "| epic_fp16 | failed (rc 1) | 12 | boom |" in table
    assert "| tok | 1.000 | 2.500 | 2.50x |" in table
    path = tmp_path / "gpu_check.txt"
    path.write_text(table)
    mfu, source = plan_run.read_measured_mfu(str(path), torch.bfloat16)
    assert mfu == 0.312 and "NVIDIA H200" in source
    with pytest.raises(SystemExit, match="fp16"):
        plan_run.read_measured_mfu(str(path), torch.float16)


def test_run_overrides_name_every_path_the_packaged_config_reads(tmp_path):
    """The GPU runs must not read ${EPIC_DATA}/${EPIC_PRETRAINED} paths that do not exist there."""
    from epic.config import load_config

    s = gpu_check.sizes(False)
    overrides = gpu_check.run_overrides(s, tmp_path / "world", tmp_path / "teacher", tmp_path / "run")
    cfg = load_config(s["config"], overrides)
    assert cfg.data.sources == [] and cfg.data.val_shards is None and cfg.epic.generator.pretrained is None
    assert cfg.model.vit_pretrained is None and cfg.model.text_pretrained is None
    assert cfg.data.micro_batch_size == cfg.train.global_batch_size == 32 and cfg.model.image_size == 288
    assert cfg.epic.generator.ds_config == "ds_configs/generator_fp16.json"
