"""The learner's vocabulary-parallel losses at tp=2 (gloo, two spawned ranks) against the same
formulas on the whole vocabulary: values and gradients with respect to the logits.

* `token_logprobs` with `entropy_grad=True` (an entropy bonus): the entropy and its gradient.
  Summing a vocabulary-sharded DTensor and reducing it with full_tensor() gave gradients off by
  ~0.25 here; the entropy is now computed on the shards with explicit reductions.
* `token_kl` (distill.loss=kd): KL(teacher || student) and its gradient into the student only.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _rank(rank: int, port: int, out_dir: str) -> None:
    try:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from learners import parallel

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        student, teacher = torch.randn(6, 10) * 2, torch.randn(6, 10) * 2
        targets = torch.randint(0, 10, (6,))
        weights = torch.rand(6)  # a non-uniform upstream gradient

        s = distribute_tensor(student.clone(), mesh, [Shard(1)]).requires_grad_()
        logprobs, entropy = parallel.token_logprobs(s, targets, entropy_grad=True)
        parallel.backward(((entropy + logprobs) * weights).sum(), True)
        s_kl = distribute_tensor(student.clone(), mesh, [Shard(1)]).requires_grad_()
        t_kl = distribute_tensor(teacher.clone(), mesh, [Shard(1)])
        kl = parallel.token_kl(s_kl, t_kl)
        parallel.backward((kl * weights).sum(), True)
        result = {"logprobs": logprobs.detach(), "entropy": entropy.detach(),
                  "grad": s.grad.full_tensor(), "kl": kl.detach(),
                  "kl_grad": s_kl.grad.full_tensor()}
        # Neither rank tears gloo down while the other is still finishing the last collective
        # (rank 1 once died with SIGABRT in teardown), as the other spawned-rank tests do.
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            torch.save(result, Path(out_dir) / "result.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def test_entropy_and_kl_gradients_at_tp2_equal_the_whole_vocabulary(tmp_path):
    from rlsys.weight_sync import find_free_port

    mp.spawn(_rank, args=(find_free_port(), str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "result.pt")

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10) * 2, torch.randn(6, 10) * 2
    targets = torch.randint(0, 10, (6,))
    weights = torch.rand(6)
    z = student.clone().requires_grad_()
    logp = torch.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    logprobs = logp.gather(-1, targets[:, None]).squeeze(-1)
    ((entropy + logprobs) * weights).sum().backward()
    z_kl = student.clone().requires_grad_()
    logp_t = torch.log_softmax(teacher, -1)
    kl = (logp_t.exp() * (logp_t - torch.log_softmax(z_kl, -1))).sum(-1)
    (kl * weights).sum().backward()

    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got["logprobs"], logprobs.detach(), **tol)
    torch.testing.assert_close(got["entropy"], entropy.detach(), **tol)
    torch.testing.assert_close(got["grad"], z.grad, **tol)
    torch.testing.assert_close(got["kl"], kl.detach(), **tol)
    torch.testing.assert_close(got["kl_grad"], z_kl.grad, **tol)
