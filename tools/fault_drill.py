"""Fault drill: inject the faults a long multi-GPU run meets, relaunch, and check the result on data.

    python tools/fault_drill.py                       # 1 trial per fault (a few minutes on 2 CPU cores)
    python tools/fault_drill.py --trials 5 --seed 1   # more trials, random steps and save moments
    python tools/fault_drill.py --faults kill_save,elastic --keep /tmp/drill

Every run is EPIC-METER (tiny, shapes world, uniform masking, so two DeepSpeed engines: VLM and generator) on 2
CPU ranks started like `srun` starts them (one process per rank, RANK/WORLD_SIZE in the environment: no launcher
that would tear the others down when one dies). One uninterrupted reference run is compared with every trial:

  samples lost / repeated   the sample keys of every global micro-batch (train.record_samples) against the
                            reference's, as multisets; a trial also needs them in the same order
  max loss diff             max |loss - reference loss| over every step (each step must be logged exactly once)

Faults (EPIC_FAULT hooks, epic/faults.py): kill_step (SIGKILL of the whole job after a random step), kill_save
(SIGKILL inside save_checkpoint at a random one of its four moments), kill_rank (SIGKILL of rank 1 only: rank 0
must exit through the collective timeout), stall_rank (rank 1 hangs), corrupt_ckpt (one of four damages to the
newest checkpoint: the relaunch must fall back to the previous one), enospc (a full disk during a save), nan_vlm /
nan_gen (k non-finite losses in one engine: skipped, counted, the other engine trains on), nan_stop
(max_nonfinite_steps in a row: save and stop), corrupt_data (1% and 10% corrupt samples: exact counts per reason),
elastic (2 -> 1 -> 2 ranks).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "epic" / "pretrain.py"
STEPS, SAVE_EVERY, MAX_NONFINITE = 8, 2, 3
SAVE_POINTS = ("save_begin", "save_between", "save_before_complete", "save_before_latest")
DAMAGES = ("truncated engine file", "missing rank file", "garbage trainer_state.json", "COMPLETE present, a file missing",
           "rank 1 file garbled, same size")  # the last one only fails on rank 1, when it loads
FAULTS = ("kill_step", "kill_save", "kill_rank", "stall_rank", "corrupt_ckpt", "enospc", "nan_vlm", "nan_gen",
          "nan_stop", "corrupt_data", "elastic")
LOSS_TOLERANCE = {"same_world": 1e-6, "elastic": 1e-4}  # elastic: other summation order of the same gradients


# ------------------------------------------------------------------------------------------------------ runs
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_args(world: Path, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--ds_config", "ds_configs/cpu_zero2.json", "--config", "epic_shapes_tiny", f"data.root={world}",
            f"run.dir={run_dir}", "epic.masking=uniform", "epic.log_saliency_every=0", "data.micro_batch_size=4",
            "train.global_batch_size=16", "data.num_workers=0", "data.streams=4", "train.log_every=1",
            "train.deterministic=true", f"train.max_steps={steps}", f"train.save_every={SAVE_EVERY}",
            "train.keep_last=10", "train.record_samples=true", f"train.max_nonfinite_steps={MAX_NONFINITE}",
            "epic.generator.lr=1e-3", *extra]


@dataclass
class Launch:
    codes: list[int]
    stdout: list[str]
    stderr: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c == 0 for c in self.codes)

    def last_error(self) -> str:
        lines = [line for err in self.stderr for line in err.strip().splitlines() if "[WARNING]" not in line]
        return lines[-1] if lines else ""

    def result(self) -> dict:
        """The JSON line rank 0 prints at the end of a run."""
        for line in reversed(self.stdout[0].strip().splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"no final JSON line (exit codes {self.codes}):\n{self.stderr[0][-3000:]}")


def launch(args: list[str], ranks: int = 2, fault: str = "", timeout_s: float = 900, env_extra=None,
           kill_others_after: Optional[float] = None) -> Launch:
    """One process per rank, as srun starts them. kill_others_after: once any rank has exited, SIGKILL the rest
    after this many seconds (what Slurm does to a job step whose task failed)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    env.pop("EPIC_FAULT", None)
    if fault:
        env["EPIC_FAULT"] = fault
    env.update(env_extra or {})
    start = time.time()
    procs, files = [], []
    for rank in range(ranks):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, str(PRETRAIN), *args], cwd=ROOT, stdout=out, stderr=err,
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank),
                                               LOCAL_WORLD_SIZE=str(ranks))))
    first_exit = None
    while any(p.poll() is None for p in procs):
        now = time.time()
        if first_exit is None and any(p.poll() is not None for p in procs):
            first_exit = now
        late = kill_others_after is not None and first_exit is not None and now - first_exit > kill_others_after
        if late or now - start > timeout_s:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    outs, errs = [], []
    for out, err in files:
        out.seek(0), err.seek(0)
        outs.append(out.read()), errs.append(err.read())
    return Launch([p.returncode for p in procs], outs, errs, time.time() - start)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def per_step(run_dir: Path, key: str) -> dict[int, list]:
    """step -> the values logged for it (a list, so that a step logged twice shows)."""
    out = collections.defaultdict(list)
    for row in metrics(run_dir):
        if key in row:
            out[row["step"]].append(row[key])
    return dict(out)


def recorded_samples(run_dir: Path) -> list[dict]:
    from epic.engine.logger import read_samples

    return read_samples(str(run_dir))


def tensorboard_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    """The steps of one scalar as TensorBoard shows it (purged events already dropped by its reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def checkpoint_step(path: Optional[Path]) -> int:
    return int(path.name.split("_")[1]) if path is not None else 0


# ---------------------------------------------------------------------------------------------- comparison
@dataclass
class Outcome:
    survived: bool
    lost: int = 0
    repeated: int = 0
    loss_diff: float = 0.0
    note: str = ""


def compare(run_dir: Path, reference: Path, tolerance: float, loss_key: str = "train/loss") -> Outcome:
    """The whole run (all its launches) against the reference: samples by global micro-batch, losses by step, and
    exactly one value per step in metrics.jsonl and in TensorBoard."""
    ref_rows, rows = recorded_samples(reference), recorded_samples(run_dir)
    ref_keys = collections.Counter(k for r in ref_rows for k in r["keys"])
    keys = collections.Counter(k for r in rows for k in r["keys"])
    lost, repeated = sum((ref_keys - keys).values()), sum((keys - ref_keys).values())
    same_order = [(r["j"], r["keys"]) for r in rows] == [(r["j"], r["keys"]) for r in ref_rows]
    ref_losses, losses = per_step(reference, loss_key), per_step(run_dir, loss_key)
    once = sorted(losses) == sorted(ref_losses) and all(len(v) == 1 for v in losses.values())
    tb_once = tensorboard_steps(run_dir) == sorted(ref_losses)
    diff = max((abs(losses[s][0] - ref_losses[s][0]) for s in ref_losses if s in losses), default=float("inf"))
    notes = [n for n, bad in (("samples out of order", not same_order),
                              ("metrics.jsonl: a step logged twice or missing", not once),
                              ("TensorBoard: a step twice or missing", not tb_once),
                              (f"loss diff {diff:.2e} > {tolerance:g}", diff > tolerance)) if bad]
    return Outcome(lost == 0 and repeated == 0 and same_order and once and tb_once and diff <= tolerance, lost,
                   repeated, diff, "; ".join(notes))


def fail(note: str, **kw) -> Outcome:
    return Outcome(False, note=note, **kw)


# ---------------------------------------------------------------------------------------------------- trials
@dataclass
class Drill:
    """The trials. Each starts from a copy of the reference run cut at its newest checkpoint before the fault (what
    the run would have been up to there), so that only the part that matters is computed again."""
    world: Path
    workdir: Path
    rng: random.Random
    steps: int = STEPS
    reference: Optional[Path] = None
    counter: int = 0
    timeout_s: float = 20.0  # collective timeout for the rank faults

    def args(self, run: Path, *extra: str, world: Optional[Path] = None) -> list[str]:
        return base_args(world or self.world, run, *extra, steps=self.steps)

    def save_steps(self) -> list[int]:
        return list(range(SAVE_EVERY, self.steps, SAVE_EVERY))

    def make_reference(self) -> Path:
        run = self.workdir / f"reference_{self.steps}"
        if not (run / "checkpoints" / f"step_{self.steps:08d}" / "COMPLETE").is_file():
            shutil.rmtree(run, ignore_errors=True)
            done = launch(self.args(run))
            if not done.ok:
                raise RuntimeError(f"the reference run failed ({done.codes}):\n{done.stderr[0][-4000:]}")
        self.reference = run
        return run

    def start_from_reference(self, name: str, before_step: int) -> Path:
        """A new run dir holding the reference up to its newest checkpoint below `before_step` (none: empty)."""
        self.counter += 1
        run = self.workdir / f"{self.counter:03d}_{name}"
        shutil.rmtree(run, ignore_errors=True)
        keep = max([s for s in self.save_steps() if s < before_step], default=0)
        if keep:
            shutil.copytree(self.reference, run, ignore=shutil.ignore_patterns("*_universal*"))
            for path in (run / "checkpoints").glob("step_*"):
                if checkpoint_step(path) > keep:
                    shutil.rmtree(path)
            (run / "checkpoints" / "latest").write_text(f"step_{keep:08d}\n")
        return run

    def relaunch_and_compare(self, run: Path, tolerance=LOSS_TOLERANCE["same_world"], ranks: int = 2) -> Outcome:
        done = launch(self.args(run), ranks=ranks)
        if not done.ok:
            return fail(f"relaunch exit {done.codes}: {done.last_error()}")
        return compare(run, self.reference, tolerance)

    # SIGKILL of the whole job ------------------------------------------------------------------------------
    def kill_step(self, step: Optional[int] = None) -> Outcome:
        step = step or self.rng.randint(1, self.steps - 1)
        run = self.start_from_reference(f"kill_step{step}", step)
        first = launch(self.args(run), fault=f"kill:step:{step}", kill_others_after=30)
        if any(c != -signal.SIGKILL for c in first.codes):
            return fail(f"the injected kill did not happen (exit {first.codes})")
        return self.relaunch_and_compare(run)

    def kill_save(self, point: Optional[str] = None, step: Optional[int] = None) -> Outcome:
        step = step or self.rng.choice(self.save_steps())
        point = point or self.rng.choice(SAVE_POINTS)
        run = self.start_from_reference(f"kill_{point}_{step}", step)
        first = self.kill_inside_save(run, point, step)
        return first if first is not None else self.relaunch_and_compare(run)

    def kill_inside_save(self, run: Path, point: str, step: int) -> Optional[Outcome]:
        """SIGKILL at `point` of the save of `step`; None when the newest complete checkpoint is then as it must be
        (the one being written once COMPLETE exists, else the previous one)."""
        first = launch(self.args(run), fault=f"kill:{point}:{step}", kill_others_after=30)
        if -signal.SIGKILL not in first.codes:
            return fail(f"the injected kill did not happen (exit {first.codes})")
        from epic.engine.checkpoint import find_checkpoint, verify_checkpoint

        found = find_checkpoint(run)
        expected = step if point == "save_before_latest" else step - SAVE_EVERY
        if checkpoint_step(found) != expected or (found is not None and verify_checkpoint(found) is not None):
            return fail(f"after a kill at {point} of step {step} the newest complete checkpoint is step "
                        f"{checkpoint_step(found)}, expected {expected}")
        return None

    # one rank dies or hangs -----------------------------------------------------------------------------------
    def rank_fault(self, run: Path, kind: str, step: int) -> Optional[Outcome]:
        """Rank 1 is killed / hangs after `step`; rank 0 must stop through the collective timeout, naming rank 1.
        The hung rank is killed by the "scheduler" once rank 0 has given up, as Slurm does to a failed step."""
        env = {"EPIC_COLLECTIVE_TIMEOUT_S": str(self.timeout_s)}
        first = launch(self.args(run), fault=f"{kind}:step:{step}:1", env_extra=env, kill_others_after=5)
        if first.codes[0] != 3:
            return fail(f"rank 0 did not stop through the collective timeout (exit {first.codes}): "
                        f"{first.last_error()}")
        said = "rank 1 (last started step" in first.stderr[0] and (
            "died" if kind == "kill" else "hangs") in first.stderr[0]
        if not said:
            return fail("rank 0's message does not name rank 1: " + first.stderr[0].strip()[-300:])
        return None

    def _rank_trial(self, kind: str) -> Outcome:
        step = self.rng.randint(1, self.steps - 1)
        run = self.start_from_reference(f"{kind}_rank1_{step}", step)
        first = self.rank_fault(run, kind, step)
        return first if first is not None else self.relaunch_and_compare(run)

    def kill_rank(self) -> Outcome:
        return self._rank_trial("kill")

    def stall_rank(self) -> Outcome:
        return self._rank_trial("stall")

    # a damaged newest checkpoint ---------------------------------------------------------------------------
    def damaged_newest_resumes_previous(self, run: Path, damage: str) -> Outcome:
        from epic.engine.checkpoint import find_checkpoint

        newest = find_checkpoint(run)
        damage_checkpoint(newest, damage, rank=self.rng.randrange(2))
        done = launch(self.args(run))
        if not done.ok:
            return fail(f"relaunch exit {done.codes}: {done.last_error()}")
        start = done.result()["start_step"]
        if start != checkpoint_step(newest) - SAVE_EVERY:
            return fail(f"resumed at step {start}, expected the previous checkpoint's step "
                        f"{checkpoint_step(newest) - SAVE_EVERY}")
        return compare(run, self.reference, LOSS_TOLERANCE["same_world"])

    def corrupt_ckpt(self, damage: Optional[str] = None) -> Outcome:
        damage = damage or self.rng.choice(DAMAGES)
        newest = self.rng.choice(self.save_steps()[1:])
        run = self.start_from_reference("corrupt_" + damage.split()[0] + f"_{newest}", newest + 1)
        outcome = self.damaged_newest_resumes_previous(run, damage)
        outcome.note = (outcome.note + f"; {damage} at step {newest}").lstrip("; ")
        return outcome

    # a full disk -------------------------------------------------------------------------------------------
    def full_disk(self, run: Path, step: int) -> Optional[Outcome]:
        first = launch(self.args(run), fault=f"enospc:save_engines:{step}")
        if first.codes != [1, 1]:
            return fail(f"a full disk should stop every rank with exit 1, got {first.codes}: {first.last_error()}")
        from epic.engine.checkpoint import find_checkpoint, verify_checkpoint

        latest = (run / "checkpoints" / "latest").read_text().strip()
        previous = max(s for s in self.save_steps() + [self.steps] if s < step)
        if latest != f"step_{previous:08d}" or verify_checkpoint(find_checkpoint(run)) is not None:
            return fail(f"latest names {latest} after the failed save of step {step}")
        if (run / "checkpoints" / f"step_{step:08d}").exists():
            return fail("the partial checkpoint was left behind")
        return None

    def enospc(self) -> Outcome:
        step = self.rng.choice(self.save_steps()[1:] + [self.steps])
        run = self.start_from_reference(f"enospc_{step}", step - 1)
        first = self.full_disk(run, step)
        return first if first is not None else self.relaunch_and_compare(run)

    # non-finite losses -------------------------------------------------------------------------------------
    def nan_engine(self, engine: str, step: int, k: int) -> Outcome:
        """k steps with a non-finite loss in one engine (k < max_nonfinite_steps): skipped and counted, the other
        engine trains on."""
        run = self.start_from_reference(f"nan_{engine}_{step}x{k}", step)
        done = launch(self.args(run), fault=f"nan:{engine}:{step}:{k}")
        if not done.ok:
            return fail(f"exit {done.codes}: {done.last_error()}")
        other, other_key = ("generator", "train/loss_gen") if engine == "vlm" else ("vlm", "train/loss")
        last = {r["step"]: r for r in metrics(run)}[self.steps]
        counted = last[f"train/nonfinite_steps_{engine}"], last[f"train/nonfinite_steps_{other}"]
        if counted != (float(k), 0.0):
            return fail(f"non-finite steps counted {counted}, expected ({k}, 0)")
        if engine == "vlm" and last["train/skipped_steps"] != k:
            return fail(f"the VLM skipped {last['train/skipped_steps']} steps, expected {k}")
        ref, mine = per_step(self.reference, other_key), per_step(run, other_key)
        if engine == "vlm":  # the generator does not read the VLM (uniform masking, unconditioned): identical
            diff = max(abs(mine[s][0] - ref[s][0]) for s in ref)
        else:  # the VLM is the same up to the first bad step (same generator so far), and trains on after it
            diff = max(abs(mine[s][0] - ref[s][0]) for s in range(1, step + 1))
            if not all(abs(v[0]) < float("inf") for v in mine.values()):
                return fail("the VLM loss went non-finite")
        return Outcome(diff <= LOSS_TOLERANCE["same_world"], 0, 0, diff,
                       f"steps {step}-{step + k - 1} skipped for {engine}, the other engine trained on")

    def nan_vlm(self) -> Outcome:
        k = self.rng.randint(1, MAX_NONFINITE - 1)
        return self.nan_engine("vlm", self.rng.randint(2, self.steps - k), k)

    def nan_gen(self) -> Outcome:
        k = self.rng.randint(1, MAX_NONFINITE - 1)
        return self.nan_engine("generator", self.rng.randint(2, self.steps - k), k)

    def nan_stop_trial(self, engine: str, first_bad: int) -> Outcome:
        """max_nonfinite_steps in a row (from `first_bad`, one after a save): the run saves and stops, exit 1; the
        engine's weights in that checkpoint are those of step first_bad - 1."""
        run = self.start_from_reference(f"nan_stop_{engine}_{first_bad}", first_bad)
        done = launch(self.args(run), fault=f"nan:{engine}:{first_bad}:{self.steps}")
        stop = first_bad + MAX_NONFINITE - 1
        try:
            result = done.result()
        except RuntimeError as err:
            return fail(str(err)[:300])
        if done.codes != [1, 1] or not result["stopped_nonfinite"] or result["final_step"] != stop:
            return fail(f"expected exit 1 at step {stop}, got {done.codes} {result}")
        from epic.engine.checkpoint import read_module_state_dict

        ckpts = run / "checkpoints"
        good = read_module_state_dict(ckpts / f"step_{first_bad - 1:08d}", engine)
        last = read_module_state_dict(ckpts / f"step_{stop:08d}", engine)
        if any(not (good[n] == last[n]).all() for n in good):
            return fail(f"the stop checkpoint's {engine} weights are not those of step {first_bad - 1}")
        return Outcome(True, note=f"{engine}: stopped at step {stop}, weights = step {first_bad - 1}")

    def nan_stop(self) -> Outcome:
        first_bad = self.rng.choice([s + 1 for s in self.save_steps() if s + MAX_NONFINITE <= self.steps])
        return self.nan_stop_trial(self.rng.choice(("vlm", "generator")), first_bad)

    # corrupt samples ---------------------------------------------------------------------------------------
    def corrupt_data(self, rate: float) -> Outcome:
        world = self.workdir / f"world_corrupt_{int(rate * 100)}"
        if not world.is_dir():
            make_corrupt_world(self.world, world, rate, random.Random(round(rate * 1000)))
        self.counter += 1
        run = self.workdir / f"{self.counter:03d}_corrupt_data_{int(rate * 100)}"
        shutil.rmtree(run, ignore_errors=True)
        done = launch(self.args(run, world=world))
        if not done.ok:
            return fail(f"exit {done.codes}: {done.last_error()}")
        expected = expected_skips(world, run)
        last = metrics(run)[-1]
        logged = {k.split("/skipped_")[1]: int(v) for k, v in last.items() if k.startswith("data/skipped_") and v}
        if logged != expected:
            return fail(f"skip counts {logged}, expected {expected}")
        sequence = recorded_samples(run)
        dropped = set(json.loads((world / "corruption.json").read_text())["skipped_keys"])
        trained_bad = {k for r in sequence for k in r["keys"]} & dropped
        if trained_bad or len(sequence) != self.steps * 4:
            return fail(f"skipped samples in the batches: {sorted(trained_bad)[:5]}")
        return Outcome(True, note=" ".join(f"{k}={v}" for k, v in sorted(expected.items())))

    # elastic -----------------------------------------------------------------------------------------------
    def elastic_trial(self, a: int, b: int) -> Outcome:
        """2 ranks to step a (the reference's checkpoint), 1 rank to step b, 2 ranks to the end."""
        run = self.start_from_reference(f"elastic_2to1at{a}_1to2at{b}", a + 1)
        for ranks, stop in ((1, b), (2, 0)):
            extra = [f"train.stop_at_step={stop}"] if stop else []
            done = launch(self.args(run, *extra), ranks=ranks)
            if not done.ok:
                return fail(f"the {ranks}-rank part exit {done.codes}: {done.last_error()}")
        outcome = compare(run, self.reference, LOSS_TOLERANCE["elastic"])
        outcome.note = (outcome.note + f"; 2 ranks to step {a}, 1 to {b}, 2 to {self.steps}").lstrip("; ")
        return outcome

    def elastic(self) -> Outcome:
        a = self.rng.choice(self.save_steps()[:-1])
        return self.elastic_trial(a, self.rng.choice([s for s in self.save_steps() if s > a]))


# ------------------------------------------------------------------------------------------ damage helpers
def damage_checkpoint(path: Path, how: str, rank: int = 0) -> None:
    if how == "truncated engine file":
        f = path / "vlm" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "missing rank file":
        (path / f"rank_{rank:05d}.pt").unlink()
    elif how == "garbage trainer_state.json":
        (path / "trainer_state.json").write_text("\x00garbage{")
    elif how == "COMPLETE present, a file missing":
        (path / "generator" / "mp_rank_00_model_states.pt").unlink()
    elif how == "rank 1 file garbled, same size":
        f = path / "rank_00001.pt"
        f.write_bytes(b"\0" * f.stat().st_size)
    else:
        raise ValueError(how)


# Corrupt samples: kind -> the reason the loader must give (None: the sample is fine and trains)
CORRUPTIONS = {"bad_jpeg": "bad_image", "png_as_jpg": None, "cmyk": None, "one_pixel": None, "zero_byte": "empty_file",
               "long_caption": None, "blank_caption": "empty_caption", "non_utf8": "bad_text"}


def _image_bytes(kind: str, original: bytes) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(original)).convert("RGB")
    out = io.BytesIO()
    if kind == "bad_jpeg":
        return original[:10] + b"\x00" * 50  # a JPEG header, then nothing decodable
    if kind == "png_as_jpg":
        image.save(out, format="PNG")
    elif kind == "cmyk":
        image.convert("CMYK").save(out, format="JPEG")
    elif kind == "one_pixel":
        image.resize((1, 1)).save(out, format="JPEG")
    elif kind == "zero_byte":
        return b""
    else:
        return original
    return out.getvalue()


def _caption(kind: str, original: str) -> str:
    if kind == "long_caption":
        return ((original + " ") * (20_000 // max(1, len(original)) + 1))[:20_000]  # 20k characters
    if kind == "blank_caption":
        return "  \t \n"
    return original


def _caption_member(kind: str, ext: str, data: bytes) -> bytes:
    """The .json or .txt member of a sample with its caption corrupted as `kind` says."""
    if kind not in ("long_caption", "blank_caption", "non_utf8"):
        return data
    if ext == "txt":
        text = data.decode()
        return "caf\xe9 ".encode("latin-1") + data if kind == "non_utf8" else _caption(kind, text).encode()
    meta = json.loads(data)
    if kind == "non_utf8":
        return json.dumps(meta, ensure_ascii=False).replace('"caption"', '"caf\xe9", "caption"', 1).encode("latin-1",
                                                                                                          "replace")
    captions = meta["caption"] if isinstance(meta["caption"], list) else [meta["caption"]]
    meta["caption"] = [_caption(kind, c) for c in captions]
    meta.pop("content_words", None)  # one flag per word: no longer matching
    return json.dumps(meta).encode()


def make_corrupt_world(clean: Path, out: Path, rate: float, rng: random.Random) -> None:
    """A copy of a shapes world with `rate` of the training samples corrupted (kinds cycled) and the last train
    shard truncated mid-stream; corruption.json lists what was done (key -> kind) for the expected counts."""
    shutil.copytree(clean, out)
    shards = sorted((out / "train").glob("*.tar"))
    kinds = list(CORRUPTIONS)
    done, skipped_keys, truncated = {}, [], {}
    counter = 0
    for shard in shards:
        members = []
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                members.append((info.name, tar.extractfile(info).read()))
        samples = collections.OrderedDict()
        for name, data in members:
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
        for key, parts in samples.items():
            if rng.random() >= rate:
                continue
            kind = kinds[counter % len(kinds)]
            counter += 1
            image_ext = next(e for e in parts if e in ("jpg", "png", "jpeg", "webp"))
            parts[image_ext] = _image_bytes(kind, parts[image_ext])
            for ext in ("json", "txt"):  # the loader reads the json caption first, the txt one without it
                if ext in parts:
                    parts[ext] = _caption_member(kind, ext, parts[ext])
            done[key] = kind
            if CORRUPTIONS[kind]:
                skipped_keys.append(key)
        with tarfile.open(shard, "w") as tar:
            for key, parts in samples.items():
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    last = shards[-1]  # truncate the last shard inside the image of one of its first samples
    data = last.read_bytes()
    with tarfile.open(last) as tar:
        members = tar.getmembers()
    images = [m for m in members if m.name.split(".", 1)[1] in ("jpg", "png", "jpeg", "webp")]
    cut_member = images[len(images) // 8]  # early: streams reach the cut within a short drill
    last.write_bytes(data[: cut_member.offset_data + max(1, cut_member.size // 2)])
    truncated = {"shard": last.name, "cut_in": cut_member.name}
    (out / "corruption.json").write_text(json.dumps({"rate": rate, "kinds": done, "skipped_keys": skipped_keys,
                                                     "truncated": truncated}, indent=1))


def expected_skips(world: Path, run: Path) -> dict[str, int]:
    """The skips the run must have counted: every raw sample its streams read (from the final checkpoint's data
    positions: fully read shard visits and the read part of the open ones), by the reason of its corruption."""
    import torch

    from epic.data.loader import shard_for_visit
    from epic.engine.checkpoint import find_checkpoint, read_trainer_state

    info = json.loads((world / "corruption.json").read_text())
    shards = sorted((world / "train").glob("*.tar"))
    keys_of = {}
    for shard in shards:
        from epic.data.shards import iter_raw_samples

        keys_of[shard.name] = [raw["__key__"] for raw in iter_raw_samples(str(shard), collections.Counter())]
    ckpt = find_checkpoint(run)
    state = read_trainer_state(ckpt)
    seed = state["config"]["run"]["seed"]
    counts = collections.Counter()
    for rank in range(state["world_size"]):
        data = torch.load(ckpt / f"rank_{rank:05d}.pt", weights_only=False)["data"]
        streams = data["streams"]
        for stream, position in data["positions"].items():
            source = position["sources"][0]
            open_visits = {visit: offset for visit, offset in source["slots"]}
            for visit in range(source["next_visit"]):
                shard = shards[shard_for_visit(0, len(shards), seed, int(stream), streams, visit)].name
                keys = keys_of[shard]
                read = keys[: open_visits[visit]] if visit in open_visits else keys
                if visit not in open_visits and shard == info["truncated"]["shard"]:
                    counts["truncated_tar"] += 1
                for key in read:
                    reason = CORRUPTIONS.get(info["kinds"].get(key, ""), None)
                    if reason:
                        counts[reason] += 1
    return dict(counts)


# -------------------------------------------------------------------------------------------------- report
@dataclass
class Row:
    fault: str
    trials: int = 0
    survived: int = 0
    lost: int = 0
    repeated: int = 0
    loss_diff: float = 0.0
    notes: list = field(default_factory=list)


def run_drill(world: Path, workdir: Path, faults, trials: int, seed: int, log=print) -> list[Row]:
    drill = Drill(world, workdir, random.Random(seed))
    drill.make_reference()
    rows = []
    for fault in faults:
        variants = [("corrupt_data_1%", lambda: drill.corrupt_data(0.01)),
                    ("corrupt_data_10%", lambda: drill.corrupt_data(0.10))] if fault == "corrupt_data" else [
                   (fault, getattr(drill, fault))]
        for name, trial in variants:
            row = Row(name)
            for _ in range(trials if not name.startswith("corrupt_data") else 1):
                outcome = trial()
                row.trials += 1
                row.survived += outcome.survived
                row.lost += outcome.lost
                row.repeated += outcome.repeated
                row.loss_diff = max(row.loss_diff, outcome.loss_diff)
                if outcome.note:
                    row.notes.append(outcome.note)
                log(f"{name}: {'survived' if outcome.survived else 'FAILED'} {outcome.note}")
            rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| fault | trials | survived | samples lost | samples repeated | max loss diff |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.fault} | {r.trials} | {r.survived} | {r.lost} | {r.repeated} | {r.loss_diff:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1, help="trials per fault (random steps / moments)")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {FAULTS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {FAULTS}")
    sys.path.insert(0, str(ROOT))
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="fault_drill_"))
    workdir.mkdir(parents=True, exist_ok=True)
    world = workdir / "world"
    if not world.is_dir():
        from epic.data.synthetic import generate_shapes_world

        generate_shapes_world(world, n_train=256, n_val=32, image_size=64, seed=0, samples_per_shard=64)
    start = time.time()
    rows = run_drill(world, workdir, faults, args.trials, args.seed)
    print(table(rows))
    print(f"({time.time() - start:.0f} s; work folder {workdir})")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.survived == r.trials for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
