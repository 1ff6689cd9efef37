"""One gloo rank of tests/test_xvlm.py::test_contrastive_gathers_across_ranks_like_x_vlm (kept apart from the test
module so that the spawned ranks import only torch and the loss, not the models)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from epic.objectives.xvlm import contrastive_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    image = F.normalize(torch.randn(2 * world, 8), dim=-1)[2 * rank:2 * rank + 2].clone().requires_grad_(True)
    text = F.normalize(torch.randn(2 * world, 8), dim=-1)[2 * rank:2 * rank + 2].clone().requires_grad_(True)
    loss = contrastive_loss(image, text, torch.tensor(0.07))
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": image.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
