"""ALBEF under a real DeepSpeed ZeRO-2 bf16 engine on 2 CPU ranks (gloo, forked from this process): the momentum
copies and queues stay fp32 buffers outside the optimizer and its partitions, every rank holds the same queues
(filled with both ranks' features), and a run saved at step k and resumed from the DeepSpeed checkpoint gives the
same losses, queues, momentum weights and step count as the uninterrupted run, on each rank."""
import os

import torch
from launch import free_port

from epic.models.albef import ALBEF, ALBEFConfig
from epic.objectives.albef_losses import albef_losses

BATCH, STEPS, SAVE_AT = 4, 5, 2
DS_CONFIG = {"train_batch_size": 2 * BATCH, "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                   "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
             "bf16": {"enabled": True}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def batches(rank):
    g = torch.Generator().manual_seed(7 + rank)  # every rank reads its own data
    out = []
    for _ in range(STEPS):
        ids = torch.randint(5, 64, (BATCH, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0
        labels = torch.full_like(ids, -100)
        labels[:, 3] = ids[:, 3]
        mlm_ids = ids.clone()
        mlm_ids[:, 3] = 4
        out.append({"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g).to(torch.bfloat16),
                    "input_ids": ids, "attention_mask": mask, "mlm_input_ids": mlm_ids, "mlm_labels": labels})
    return out


def engine_for(seed):
    import deepspeed

    torch.manual_seed(seed)
    model = ALBEF(ALBEFConfig.tiny(queue_size=12, alpha_ramp_steps=3))  # the queue wraps within the run
    spec = model.param_groups_spec()
    named = dict(model.named_parameters())
    groups = [{"params": [named[n] for g in spec.values() for n in g[kind]], "weight_decay": wd}
              for kind, wd in (("decay", 0.02), ("no_decay", 0.0))]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    return engine


def step(engine, batch, index):
    out = albef_losses(engine.module, batch, None, torch.Generator().manual_seed(100 + index))
    engine.backward(out.loss)
    engine.step()
    engine.module.after_optimizer_step()
    return [float(out.loss_ita.detach()), float(out.loss_itm.detach()), float(out.loss_mlm.detach())]


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _rank(rank, world, port, out_dir):
    """One DeepSpeed rank: run STEPS steps saving at SAVE_AT, then resume a fresh engine from that checkpoint."""
    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # bit-identical runs to compare
    deepspeed.init_distributed(dist_backend="gloo")
    data = batches(rank)
    engine = engine_for(0)
    model = engine.module
    report = {
        "dtypes": (model.visual_encoder.blocks[0].attn.qkv.weight.dtype,
                   model.visual_encoder_m.blocks[0].attn.qkv.weight.dtype, model.image_queue.dtype),
        "in_optimizer": sum(p.numel() for group in engine.optimizer.bit16_groups for p in group),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "momentum_in_optimizer": bool({id(t) for n, t in model.named_buffers() if n.split(".")[0].endswith("_m")}
                                      & {id(p) for group in engine.optimizer.bit16_groups for p in group}),
    }
    losses = [step(engine, data[i], i) for i in range(SAVE_AT)]
    engine.save_checkpoint(os.path.join(out_dir, "ckpt"), tag="k")
    losses += [step(engine, data[i], i) for i in range(SAVE_AT, STEPS)]
    final = state(model)
    resumed = engine_for(1)  # other initial weights and queues: everything must come from the checkpoint
    path, _ = resumed.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="k")
    report.update(loaded=path is not None, step_at_load=int(resumed.module.momentum_step),
                  ptr_at_load=int(resumed.module.queue_ptr))
    again = [step(resumed, data[i], i) for i in range(SAVE_AT, STEPS)]
    report.update(losses=losses, again=again, final=final, resumed=state(resumed.module))
    torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_albef_two_rank_zero2_state_and_exact_resume(tmp_path):
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (r0, r1):
        # fp32 momentum weights and queues next to bf16 online weights; no momentum state in the optimizer
        assert r["dtypes"] == (torch.bfloat16, torch.float32, torch.float32)
        assert r["in_optimizer"] == r["trainable"] and not r["momentum_in_optimizer"]
        assert r["loaded"] and r["step_at_load"] == SAVE_AT and r["ptr_at_load"] == (SAVE_AT * 2 * BATCH) % 12
        assert r["again"] == r["losses"][SAVE_AT:]  # resumed == uninterrupted, step by step
        for key, value in r["resumed"].items():
            assert torch.equal(value, r["final"][key]), key
    assert r0["losses"] != r1["losses"]  # the ranks saw different data ...
    for key in ("image_queue", "text_queue", "queue_ptr", "momentum_step", "visual_encoder_m.pos_embed",
                "text_encoder_m.bert.embeddings.word_embeddings.weight", "temp"):
        assert torch.equal(r0["final"][key], r1["final"][key]), key  # ... and hold the same state
    assert int(r0["final"]["queue_ptr"]) == (STEPS * 2 * BATCH) % 12
