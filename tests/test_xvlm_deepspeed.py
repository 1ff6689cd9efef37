"""X-VLM's recipe under a real DeepSpeed ZeRO-2 bf16 engine on 2 CPU ranks (gloo, forked from this process): caption
and region steps interleave by step (XVLMObjective, region batches from the shapes world's boxes through the
resumable region loader), and a run saved at step k (engine checkpoint + each rank's objective state, i.e. its region
loader's position) and resumed in fresh engines gives the same losses step by step, across both
kinds of step, and the same final weights as the uninterrupted run, on each rank."""
import os
import random

import torch
from launch import free_port

from epic.data.region_loader import build_region_loader
from epic.data.synthetic import shard_spec
from epic.data.xvlm_masking import mask_batch
from epic.models.xvlm import XVLM, XVLMConfig
from epic.objectives.xvlm import XVLMObjective

BATCH, STEPS, SAVE_AT = 4, 6, 3  # steps 0..5: caption, region, caption | region, caption, region
DS_CONFIG = {"train_batch_size": 2 * BATCH, "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                   "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
             "bf16": {"enabled": True}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
             "wall_clock_breakdown": False}


def caption_batches(rank):
    g = torch.Generator().manual_seed(11 + rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, 2000, (BATCH, 12), generator=g)
        ids[:, 0] = 0
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        mlm_ids, mlm_labels = mask_batch(ids, mask == 0, random.Random(int(ids[0, 1])), 4, 2000)
        out.append({"pixel_values": torch.randn(BATCH, 3, 64, 64, generator=g), "input_ids": ids,
                    "attention_mask": mask, "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels})
    return out


def engine_and_objective(seed, shapes_world, rank, world):
    import deepspeed

    torch.manual_seed(seed)
    model = XVLM(XVLMConfig.tiny(vocab_size=2000, pad_token_id=1))
    spec = model.param_groups_spec()
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for n in spec[g][kind]], "weight_decay": wd, "lr": 1e-3 * (1 if g == "backbone" else 2)}
              for g in spec for kind, wd in (("decay", 0.01), ("no_decay", 0.0)) if spec[g][kind]]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups), config=DS_CONFIG)
    loader = build_region_loader(shard_spec(shapes_world, "train"), shapes_world / "tokenizer", image_size=64, grid=8,
                                 max_text_len=12, batch_size=BATCH, max_images=2, max_regions=3, hflip=False,
                                 seed=3, rank=rank, world_size=world)
    return engine, XVLMObjective(loader, iter_perc=0.5)


def step(engine, objective, batch, index):
    out = objective.losses(engine.module, batch, torch.Generator().manual_seed(100 + index), index)
    engine.backward(out["loss"])
    engine.step()
    return [float(out["region_step"]), float(out["loss"].detach()), float(out["itm"]), float(out["mlm"])]


def _rank(rank, world, port, out_dir, shapes_world):
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    data = caption_batches(rank)
    engine, objective = engine_and_objective(0, shapes_world, rank, world)
    losses = [step(engine, objective, data[i], i) for i in range(SAVE_AT)]
    engine.save_checkpoint(os.path.join(out_dir, "ckpt"), tag="k")
    # the objective's state is per rank (each rank's region stream): DeepSpeed's client_state keeps rank 0's only,
    # so it goes to a per-rank file, as the trainer's rank state does
    torch.save({"objective": objective.state_dict(), "rng": torch.get_rng_state()},  # dropout draws: global RNG
               os.path.join(out_dir, f"objective_rank{rank}.pt"))
    losses += [step(engine, objective, data[i], i) for i in range(SAVE_AT, STEPS)]
    final = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    engine2, objective2 = engine_and_objective(1, shapes_world, rank, world)  # other weights: all from the checkpoint
    path, _ = engine2.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="k")
    rank_state = torch.load(os.path.join(out_dir, f"objective_rank{rank}.pt"), weights_only=False)
    objective2.load_state_dict(rank_state["objective"])
    torch.set_rng_state(rank_state["rng"])
    again = [step(engine2, objective2, data[i], i) for i in range(SAVE_AT, STEPS)]
    resumed = {k: v.detach().float().clone() for k, v in engine2.module.state_dict().items()}
    torch.save({"losses": losses, "again": again, "final": final, "resumed": resumed, "loaded": path is not None},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_xvlm_two_rank_zero2_resumes_exactly_across_region_and_caption_steps(tmp_path, shapes_world):
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_rank, args=(2, port, str(tmp_path), shapes_world), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert r["loaded"]
        assert [kind for kind, *_ in r["losses"]] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
        assert r["again"] == r["losses"][SAVE_AT:]  # resumed == uninterrupted, region and caption steps alike
        for key, value in r["resumed"].items():
            assert torch.equal(value, r["final"][key]), key
    assert r0["losses"] != r1["losses"]  # the ranks read different data ...
    for key, value in r0["final"].items():
        assert torch.equal(value, r1["final"][key]), key  # ... and hold the same weights
