#!/usr/bin/env python
"""The GPU check: everything that needs a GPU, in one time-boxed run, ending in one table (tools/gpu_check.sh).

    bash tools/gpu_check.sh [--out DIR] [--budget 470]      on a GPU machine (what is missing is installed first)
    python tools/gpu_check.py --dry-run --out DIR            on a CPU: the same phases at toy sizes (plumbing test)

Phases (each a subprocess under its own time limit, killed with its process group when over; a failure is
recorded in the table and the next phase runs):

    prepare       the shapes world at 288 px (random images and captions, offline tokenizer) and a random-weight
                  METER-B/16 teacher export (fp16)
    epic_bf16     epic/pretrain.py, EPIC-METER-B/16@288, random weights, 30 steps of micro batch 32: the VLM
                  engine in bf16 (ds_configs/zero2_bf16.json), the generator's in fp16 (generator_fp16.json)
    kernel_tests  pytest tests/test_kernel_*.py -k cuda (compiled Triton kernels against their references)
    kernel_bench  tools/bench_kernels.py (fused kernels vs eager: speed-up and peak-memory ratio)
    epic_fp16     as epic_bf16 with both engines in fp16 (ds_configs/zero2_fp16.json)
    probe_off/on  the largest micro batch whose EPIC VLM step (MLM + ITM + ITC passes, forward + backward, bf16
                  weights, with the ZeRO-2 optimizer state of one GPU and the fp16 teacher reserved) fits, without
                  and with train.activation_checkpointing (doubling, then bisection)
    epic_bf16_fast  as epic_bf16 with train.compile=true and train.activation_checkpointing=true (whatever budget
                  is left; a part that does not compile is named in its log and runs eagerly)

The table goes to stdout and to DIR/gpu_check.txt (with DIR/gpu_check.json and each phase's log under DIR/logs):
DIR is --out, else $OUT, else ./gpu_check_out. ``tools/plan_run.py --measured DIR/gpu_check.txt`` plans with the
measured MFU instead of an assumed one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Seconds each phase may take at most (the remaining --budget caps them further), in the order they run.
PHASE_LIMITS = {"prepare": 75, "epic_bf16": 150, "kernel_tests": 90, "kernel_bench": 90, "epic_fp16": 120,
                "probe_off": 50, "probe_on": 50, "epic_bf16_fast": 150}
RESERVE_S = 5  # kept for writing the table
RUN_TITLES = {"epic_bf16": "EPIC-METER, VLM bf16 + generator fp16", "epic_fp16": "EPIC-METER, VLM fp16 + generator fp16",
              "epic_bf16_fast": "as the first + train.compile + activation checkpointing"}
FAST_PATH = ["train.compile=true", "train.activation_checkpointing=true"]


# ------------------------------------------------------------------------------------------------- sizes
def sizes(dry_run: bool) -> dict:
    """What the runs use: METER-B/16@288 on a GPU; the tiny shapes config on a CPU dry run."""
    if dry_run:
        return {"config": "epic_shapes_tiny", "image_size": 64, "train_images": 64, "micro_batch": 4, "steps": 4,
                "log_every": 2, "workers": 1, "ds_bf16": "ds_configs/cpu_zero2_bf16.json",
                "ds_fp16": "ds_configs/cpu_zero2.json", "generator_ds": "null", "vocab": 0, "probe_max": 8,
                "probe_start": 2, "extra": ["epic.log_saliency_every=0"]}
    return {"config": "epic_meter_4m", "image_size": 288, "train_images": 1024, "micro_batch": 32, "steps": 30,
            "log_every": 10, "workers": 8, "ds_bf16": "ds_configs/zero2_bf16.json", "ds_fp16": "ds_configs/zero2_fp16.json",
            "generator_ds": "ds_configs/generator_fp16.json", "vocab": 50265, "probe_max": 1024, "probe_start": 32,
            "extra": ["model.vit_pretrained=null", "model.text_pretrained=null", "epic.generator.pretrained=null",
                      "data.val_shards=null", "epic.log_saliency_every=0", "train.eval_every=0"]}


def run_overrides(s: dict, world: Path, teacher: Path, run_dir: Path) -> list[str]:
    out = [f"data.root={world}", "data.sources=[]", f"data.tokenizer={world / 'tokenizer'}",
           f"data.image_size={s['image_size']}", f"model.image_size={s['image_size']}", f"epic.teacher={teacher}",
           f"data.micro_batch_size={s['micro_batch']}", f"train.global_batch_size={s['micro_batch']}",
           f"train.max_steps={s['steps']}", f"train.log_every={s['log_every']}", "train.save_every=1000000",
           f"data.num_workers={s['workers']}", f"run.dir={run_dir}", f"epic.generator.ds_config={s['generator_ds']}"]
    if s["vocab"]:
        out.append(f"model.vocab_size={s['vocab']}")
    return out + s["extra"]


# ------------------------------------------------------------------------------------------------- phases
def run_phase(name: str, cmd: list[str], limit: float, logs: Path, env: dict) -> dict:
    """Run ``cmd`` in its own process group for at most ``limit`` seconds; its output goes to logs/NAME.log."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    start = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, limit))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = -9, True
    seconds = time.time() - start
    status = "ok" if rc == 0 else ("timeout" if timed_out else f"failed (rc {rc})")
    print(f"[gpu_check] {name}: {status} in {seconds:.0f} s (log {log})", flush=True)
    return {"status": status, "rc": rc, "seconds": round(seconds, 1), "log": str(log)}


def tail(path: str, lines: int = 3) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip()[:160] for line in text[-lines:])


def last_perf(run_dir: Path) -> dict:
    """The last logged window of a run (perf/* over the steps since the previous log line)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/samples_per_s" in r]
    if not rows:
        return {}
    last = rows[-1]
    return {"step": last["step"], "samples_per_s": last.get("perf/samples_per_s"),
            "tflops": last.get("perf/tflops_per_device"), "mfu": last.get("perf/mfu"),
            "peak_mem_gib": last.get("perf/peak_mem_gib"), "loss": last.get("train/loss"),
            "flops_per_sample": last.get("perf/flops_per_sample"), "windows": len(rows)}


def kernel_rows(path: Path) -> list[dict]:
    """Per op: fused vs eager time and peak memory from bench_kernels.py's JSON."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())["results"]
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op and r.get("ms")]
        fused = next((r for r in mine if r["provider"].startswith(("fused", "reference", "streaming"))), None)
        eager = next((r for r in mine if r["provider"].startswith("eager")), None)
        if fused and eager:
            out.append({"op": op, "fused": fused["provider"], "fused_ms": fused["ms"], "eager_ms": eager["ms"],
                        "speedup": eager["ms"] / fused["ms"], "fused_mib": fused["peak_mib"],
                        "eager_mib": eager["peak_mib"],
                        "memory_ratio": eager["peak_mib"] / fused["peak_mib"] if fused["peak_mib"] else None})
    return out


def probe_result(log: str) -> dict:
    """The probe prints one JSON line per batch size tried; the largest that fitted wins (partial logs count)."""
    tries = []
    for line in Path(log).read_text(errors="replace").splitlines() if Path(log).is_file() else []:
        if line.startswith("{\"probe\""):
            tries.append(json.loads(line))
    fitted = [t for t in tries if t["fits"]]
    if not fitted:
        return {"tries": len(tries)}
    best = max(fitted, key=lambda t: t["batch"])
    capped = best["batch"] >= max(t.get("cap", 0) for t in tries)
    return {"largest": best["batch"], "peak_gib": best["peak_gib"], "s_per_sample": best["s_per_sample"],
            "tries": len(tries), "capped": capped}


def compile_note(log: str) -> str:
    """Which parts fell back to eager (the warnings of epic.models.fast_path), for the phase line."""
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    failed = [line.split("train.compile: ")[1].split(" did not compile")[0] for line in text.splitlines()
              if "did not compile" in line and "train.compile: " in line]
    return f"eager fallback: {', '.join(failed)}" if failed else ""


def tests_summary(log: str) -> str:
    for line in reversed(Path(log).read_text(errors="replace").splitlines() if Path(log).is_file() else []):
        if " passed" in line or " failed" in line or " skipped" in line or "deselected" in line:
            return line.strip("= ")
    return tail(log, 1)


# ------------------------------------------------------------------------------------------------- the table
def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def render_table(report: dict) -> str:
    meta, lines = report["meta"], []
    lines.append(f"GPU check: {meta['device']} | torch {meta['torch']} | triton {meta.get('triton')} | deepspeed "
                 f"{meta.get('deepspeed')} | {meta['date']}{' | DRY RUN (CPU, toy sizes)' if meta['dry_run'] else ''}")
    lines.append("")
    lines.append("| phase | status | seconds | note |")
    lines.append("|---|---|---|---|")
    for name, phase in report["phases"].items():
        lines.append(f"| {name} | {phase['status']} | {phase['seconds']:.0f} | {phase.get('note', '')} |")
    lines.append("")
    s = report["sizes"]
    lines.append(f"Training runs ({s['config']}, random weights, {s['image_size']} px, micro batch {s['micro_batch']}, "
                 f"{s['steps']} steps; figures of the last {s['log_every']} steps)"
                 + ("; dry run: the engines run bf16 / fp32 (DeepSpeed has no fp16 on CPU)" if meta["dry_run"] else ""))
    lines.append("| run | samples/s | TFLOP/s | MFU | peak mem GiB | GFLOP/sample | loss |")
    lines.append("|---|---|---|---|---|---|---|")
    for key, title in RUN_TITLES.items():
        r = report["runs"].get(key, {})
        gflop = r["flops_per_sample"] / 1e9 if r.get("flops_per_sample") else None
        lines.append(f"| {title} | {fmt(r.get('samples_per_s'))} | {fmt(r.get('tflops'))} | {fmt(r.get('mfu'), '.3f')} "
                     f"| {fmt(r.get('peak_mem_gib'))} | {fmt(gflop)} | {fmt(r.get('loss'), '.3f')} |")
    lines.append("")
    lines.append("Largest micro batch that fits (EPIC VLM step, bf16 weights, ZeRO-2 optimizer state + teacher reserved)")
    lines.append("| activation checkpointing | largest micro batch | peak mem GiB | s per sample |")
    lines.append("|---|---|---|---|")
    for key, label in (("probe_off", "off"), ("probe_on", "on")):
        p = report["probes"].get(key, {})
        largest = p.get("largest")
        shown = "-" if largest is None else f"{largest}{'+ (cap)' if p.get('capped') else ''}"
        lines.append(f"| {label} | {shown} | {fmt(p.get('peak_gib'))} | {fmt(p.get('s_per_sample'), '.4f')} |")
    lines.append("")
    lines.append("Kernels (tools/bench_kernels.py)")
    lines.append("| op | fused ms | eager ms | speed-up | fused MiB | eager MiB | memory ratio |")
    lines.append("|---|---|---|---|---|---|---|")
    for k in report["kernels"]:
        lines.append(f"| {k['op']} | {fmt(k['fused_ms'], '.3f')} | {fmt(k['eager_ms'], '.3f')} | "
                     f"{fmt(k['speedup'], '.2f')}x | {fmt(k['fused_mib'])} | {fmt(k['eager_mib'])} | "
                     f"{fmt(k['memory_ratio'], '.2f')}x |")
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import torch

    meta = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime())}
    meta["device"] = torch.cuda.get_device_name() if meta["cuda"] else "CPU"
    for name in ("triton", "deepspeed", "webdataset", "transformers", "timm"):
        try:
            meta[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 (reported, not fatal: the phases that need it fail on their own)
            meta[name] = f"missing ({type(err).__name__})"
    return meta


def check(args) -> dict:
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    logs = out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    s = sizes(args.dry_run)
    meta = dict(environment(), dry_run=args.dry_run)
    if not meta["cuda"] and not args.dry_run:
        print("[gpu_check] no CUDA device: nothing to measure here (use --dry-run for the CPU plumbing check)",
              file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               TOKENIZERS_PARALLELISM="false", EPIC_DATA=str(work), EPIC_PRETRAINED=str(work),
               EPIC_TEACHER=str(work / "teacher"))
    if args.dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    deadline = time.time() + args.budget
    report = {"meta": meta, "sizes": s, "phases": {}, "runs": {}, "probes": {}, "kernels": []}
    py = sys.executable
    world, teacher = work / "world", work / "teacher"
    wanted = args.phases.split(",") if args.phases else list(PHASE_LIMITS)

    def limit(name):
        return max(1.0, min(PHASE_LIMITS[name], deadline - time.time() - RESERVE_S))

    for name in PHASE_LIMITS:
        if name not in wanted:
            continue
        if deadline - time.time() - RESERVE_S < 10:
            report["phases"][name] = {"status": "skipped (budget)", "seconds": 0.0}
            continue
        common = ["--config", s["config"], *run_overrides(s, world, teacher, work / "unused")]
        if name == "prepare":
            cmd = [py, __file__, "_prepare", "--world", str(world), "--teacher", str(teacher), "--images",
                   str(s["train_images"]), "--image-size", str(s["image_size"]), *common]
        elif name in RUN_TITLES:
            run_dir = work / f"run_{name}"
            subprocess.run(["rm", "-rf", str(run_dir)])
            ds = s["ds_fp16"] if name == "epic_fp16" else s["ds_bf16"]
            cmd = [py, "epic/pretrain.py", "--ds_config", ds, "--config", s["config"],
                   *run_overrides(s, world, teacher, run_dir), *(FAST_PATH if name == "epic_bf16_fast" else []),
                   "--resume", "none"]
        elif name == "kernel_tests":
            cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sorted(map(str, ROOT.glob("tests/test_kernel_*.py"))),
                   "-k", "cuda"]
        elif name == "kernel_bench":
            cmd = [py, "tools/bench_kernels.py", "--out", str(out / "kernels.json"), "--compile", "off"]
            if args.dry_run:
                cmd += ["--small", "--ops", "token,saliency", "--reps", "1", "--warmup", "0"]
        else:  # probes
            cmd = [py, __file__, "_probe", "--checkpointing", "on" if name == "probe_on" else "off",
                   "--start", str(s["probe_start"]), "--max", str(s["probe_max"]), *common]
        phase_env = dict(env, EPIC_COMPILE_BACKEND="aot_eager") if args.dry_run and name == "epic_bf16_fast" else env
        phase = run_phase(name, cmd, limit(name), logs, phase_env)
        if name in RUN_TITLES:
            report["runs"][name] = last_perf(work / f"run_{name}")
            subprocess.run(["rm", "-rf", str(work / f"run_{name}" / "checkpoints")])  # GBs of optimizer state
        elif name == "kernel_tests":
            phase["note"] = tests_summary(phase["log"])
        elif name == "kernel_bench":
            report["kernels"] = kernel_rows(out / "kernels.json")
        elif name.startswith("probe"):
            report["probes"][name] = probe_result(phase["log"])
        if name == "epic_bf16_fast":
            phase["note"] = compile_note(phase["log"])
        if phase["status"] != "ok" and not phase.get("note"):
            phase["note"] = tail(phase["log"]).replace("|", "/")
        report["phases"][name] = phase
    table = render_table(report)
    (out / "gpu_check.txt").write_text(table)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(table, flush=True)
    print(f"[gpu_check] table: {out / 'gpu_check.txt'} (json beside it, logs in {logs})", flush=True)
    return report


# ------------------------------------------------------------------------------------------------- sub-commands
def load_run_config(config: str, overrides: list[str]):
    from epic.config import load_config

    return load_config(config, overrides)


def prepare(args) -> None:
    """The shapes world and a random-weight teacher export of the run's METER (fp16 on GPU)."""
    import torch

    from epic.data.synthetic import generate_shapes_world
    from epic.engine.build import build_model, resolve_data_paths

    if not (Path(args.world) / "tokenizer").is_dir():
        per_shard = max(16, args.images // 8)
        generate_shapes_world(args.world, n_train=args.images, n_val=0 if args.images > 64 else 8,
                              image_size=args.image_size, seed=0, samples_per_shard=per_shard)
    cfg = load_run_config(args.config, args.overrides)
    torch.manual_seed(0)
    model, _ = build_model(cfg, resolve_data_paths(cfg))
    if torch.cuda.is_available():
        model = model.half()
    model.save_pretrained(args.teacher)
    print(json.dumps({"world": args.world, "teacher": args.teacher,
                      "params": sum(p.numel() for p in model.parameters())}))


def probe(args) -> None:
    """Largest micro batch of the EPIC VLM step that fits; one JSON line per batch size tried."""
    import torch

    from epic.engine.build import build_model, resolve_data_paths
    from epic.models.fast_path import set_activation_checkpointing
    from epic.objectives.consistency import epic_vlm_passes
    from epic.objectives.saliency import real_text_tokens

    cfg = load_run_config(args.config, args.overrides)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    model, _ = build_model(cfg, resolve_data_paths(cfg))
    model = model.to(device, dtype).train()
    if args.checkpointing == "on":
        set_activation_checkpointing(model)
    params = sum(p.numel() for p in model.parameters())
    # ZeRO-2 on one GPU: fp32 master weights + Adam m, v (12 bytes/param) beside the bf16 weights and gradients;
    # plus the frozen fp16 teacher (2 bytes/param). Reserved so the probe leaves room for what a run also holds.
    reserve = torch.empty(14 * params if on_gpu else 1, dtype=torch.uint8, device=device)
    model_cfg, text_len = cfg.model, cfg.data.max_text_len

    def step(batch_size: int) -> float:
        g = torch.Generator(device="cpu").manual_seed(batch_size)
        ids = torch.randint(5, max(6, model_cfg.vocab_size - 1), (batch_size, text_len), generator=g).to(device)
        special = torch.zeros_like(ids, dtype=torch.bool)
        special[:, 0] = special[:, -1] = True
        labels = torch.where(torch.rand(ids.shape, generator=g).to(device) < 0.15, ids, torch.full_like(ids, -100))
        batch = {"pixel_values": torch.randn(batch_size, 3, model_cfg.image_size, model_cfg.image_size,
                                             generator=g).to(device, dtype),
                 "input_ids": ids, "attention_mask": torch.ones_like(ids), "special_tokens_mask": special,
                 "mlm_input_ids": ids, "mlm_labels": labels}
        real = real_text_tokens(batch)
        inconsistent = real & (torch.rand(ids.shape, generator=g).to(device) < 0.2)
        model.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        image_embeds = model.encode_image(batch["pixel_values"])
        out = epic_vlm_passes(model, batch, image_embeds, ids, inconsistent, real, g, 8.0)
        out["loss"].float().backward()
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def fits(batch_size: int) -> bool:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step(batch_size)  # warm-up (allocator, kernels)
            seconds = step(batch_size)
            ok = True
        except torch.cuda.OutOfMemoryError:
            seconds, ok = None, False
        model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
        print(json.dumps({"probe": args.checkpointing, "batch": batch_size, "fits": ok, "peak_gib": peak,
                          "s_per_sample": seconds / batch_size if seconds else None, "cap": args.max}), flush=True)
        return ok

    low, high = 0, None
    size = args.start
    while size <= args.max:  # doubling
        if not fits(size):
            high = size
            break
        low, size = size, size * 2
    if high is not None and low:  # bisection to within 1/8 of the last size that fitted
        while high - low > max(1, low // 8):
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
    del reserve


def parse_args(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("_prepare", "_probe"):
        parser = argparse.ArgumentParser()
        parser.add_argument("command")
        parser.add_argument("--config", required=True)
        parser.add_argument("--world")
        parser.add_argument("--teacher")
        parser.add_argument("--images", type=int, default=1024)
        parser.add_argument("--image-size", type=int, default=288)
        parser.add_argument("--checkpointing", choices=("on", "off"), default="off")
        parser.add_argument("--start", type=int, default=32)
        parser.add_argument("--max", type=int, default=1024)
        parser.add_argument("overrides", nargs="*")
        return parser.parse_intermixed_args(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where the table goes (default: $OUT, else ./gpu_check_out)")
    parser.add_argument("--work", default=None, help="scratch for data, teacher, runs (default: OUT/work)")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all phases together")
    parser.add_argument("--phases", default=None, help=f"comma-separated subset of {','.join(PHASE_LIMITS)}")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: exercises every phase and the table")
    args = parser.parse_args(argv)
    args.command = "check"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == "_prepare":
        return prepare(args)
    if args.command == "_probe":
        return probe(args)
    return check(args)


if __name__ == "__main__":
    main()
