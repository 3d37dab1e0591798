"""Run by tests/test_owt.py under `torchrun --nproc-per-node 2` (gloo, CPU): checks that one-weird-
trick training matches single-process training of the whole batch. Prints "OWT OK <arch>" per arch.

    torchrun --nproc-per-node 2 tests/owt_worker.py alexnetowt alexnetowtbn overfeat

Dropout is set to p=0 (the models stay in train mode, so BatchNorm uses batch statistics): masks
are random per rank and cannot match a single process. BatchNorm2d in the trunk uses each rank's
own batch statistics, as under DDP, so the reference runs the trunk once per rank's chunk and keeps
the running statistics of rank 0's chunk (DDP broadcasts rank 0's buffers).
"""
import copy
import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.imagenet.models import build_model  # noqa: E402
from tools.imagenet.owt import wrap_owt  # noqa: E402

NUM_CLASSES = 7      # odd: the last layer splits 4 + 3 over two ranks
LOCAL_BATCH = 3
SIZE = 64
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
TOL = 1e-4  # float32: largest difference relative to the tensor's largest magnitude
# Per arch: (SGD steps, also check the round trips and uneven eval batches). The second step
# uses momentum buffers and, for alexnetowtbn, DDP's broadcast of rank 0's BatchNorm2d buffers.
PLAN = {"alexnetowt": (1, False), "alexnetowtbn": (2, True), "overfeat": (1, False)}


def close(a, b, what):
    """a == b up to TOL times b's largest magnitude (summation order differs across ranks)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.dtype in (torch.int64, torch.int32):
        assert torch.equal(a, b), what
        return
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    # The floor covers parameters whose gradient is only rounding noise (a conv bias before BN).
    assert err <= TOL * scale + 1e-5, f"{what}: max difference {err:.3g} (scale {scale:.3g})"


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def reference_step(ref, opt, x_chunks, y):
    """Single process, whole batch; trunk per chunk (DDP's per-rank BatchNorm2d statistics)."""
    if any(isinstance(m, nn.BatchNorm2d) for m in ref.features.modules()):
        feats = [ref.features(x_chunks[0])]  # updates the running stats: rank 0's chunk
        for x in x_chunks[1:]:  # the other ranks' stats go to throwaway copies
            scratch = {n: b.clone() for n, b in ref.features.named_buffers()}
            feats.append(torch.func.functional_call(ref.features, scratch, (x,)))
        feats = [torch.flatten(ref.avgpool(f), 1) for f in feats]
        logits = ref.classifier(torch.cat(feats))
    else:
        logits = ref(torch.cat(x_chunks))  # no trunk BN: exactly the whole-batch forward
    loss = F.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def check(arch, rank, world):
    torch.manual_seed(rank)  # different on each rank: wrap_owt must take rank 0's weights
    model = no_dropout(build_model(arch, NUM_CLASSES, init="kaiming"))
    if rank == 0:
        full0 = copy.deepcopy(model.state_dict())
    ref = copy.deepcopy(model) if rank == 0 else None
    owt = wrap_owt(model)
    del model
    owt.train()
    opt = torch.optim.SGD(owt.parameters(), **SGD)
    ref_opt = torch.optim.SGD(ref.parameters(), **SGD) if rank == 0 else None

    gen = torch.Generator().manual_seed(123)
    steps, full_checks = PLAN[arch]
    for step in range(steps):
        x = torch.randn(world * LOCAL_BATCH, 3, SIZE, SIZE, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (world * LOCAL_BATCH,), generator=gen)
        chunks = list(x.split(LOCAL_BATCH))
        logits = owt(chunks[rank])
        assert logits.shape == (LOCAL_BATCH, NUM_CLASSES), logits.shape
        loss = F.cross_entropy(logits, y[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH])
        opt.zero_grad()
        loss.backward()
        opt.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_loss /= world
        if rank == 0:
            ref_loss = reference_step(ref, ref_opt, chunks, y)
            close(global_loss, ref_loss, f"{arch} loss at step {step}")
            print(f"{arch} step {step}: owt loss {global_loss.item():.6f} "
                  f"single {ref_loss.item():.6f}", flush=True)

    sd = owt.full_state_dict()
    # The optimizer mapping does not depend on the arch: gather it (slow on gloo) only once.
    osd = owt.full_optimizer_state(opt) if full_checks else None
    if rank == 0:
        ref_sd = ref.state_dict()
        assert list(sd) == list(ref_sd), "full_state_dict keys differ from the plain model's"
        for k in ref_sd:
            close(sd[k], ref_sd[k], f"{arch} {k}")
        # The weights did move: the comparison is not between two untouched copies.
        assert not torch.allclose(sd["classifier.1.weight"], full0["classifier.1.weight"])
    if rank == 0 and full_checks:
        ref_osd = ref_opt.state_dict()
        assert osd["param_groups"] == ref_osd["param_groups"]
        assert sorted(osd["state"]) == sorted(ref_osd["state"])
        for i, entry in ref_osd["state"].items():
            close(osd["state"][i]["momentum_buffer"], entry["momentum_buffer"],
                  f"{arch} momentum {i}")
        # The single-model layout loads into a plain optimizer over the plain model.
        torch.optim.SGD(ref.parameters(), **SGD).load_state_dict(osd)

    if not full_checks:
        dist.barrier()
        if rank == 0:
            print(f"OWT OK {arch}", flush=True)
        return
    # Round trips: owt -> single layout -> a fresh owt gives back the same shards.
    torch.manual_seed(100 + rank)
    owt2 = wrap_owt(no_dropout(build_model(arch, NUM_CLASSES)))
    opt2 = torch.optim.SGD(owt2.parameters(), **SGD)
    owt2.load_full_state_dict(sd)
    owt2.load_full_optimizer_state(opt2, osd)
    sd2 = owt2.full_state_dict()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), f"{arch} {k} changed in the round trip"
    for (n1, t1), (n2, t2) in zip(owt.classifier.state_dict().items(),
                                  owt2.classifier.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), f"{arch} shard {n1} differs after the round trip"
    for p1, p2 in zip(owt.parameters(), owt2.parameters()):
        torch.testing.assert_close(opt.state[p1]["momentum_buffer"], opt2.state[p2]["momentum_buffer"],
                                   rtol=0, atol=0)
    del owt2, opt2

    # Eval with uneven local batches (2 and 4 samples): logits equal the plain model's.
    owt.eval()
    x = torch.randn(6, 3, SIZE, SIZE, generator=gen)
    lo, hi = (0, 2) if rank == 0 else (2, 6)
    with torch.no_grad():
        out = owt(x[lo:hi])
        if rank == 0:
            ref.eval()
            close(out, ref(x)[lo:hi], f"{arch} eval logits")
    dist.barrier()
    if rank == 0:
        print(f"OWT OK {arch}", flush=True)


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for arch in sys.argv[1:]:
        check(arch, rank, world)
        gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
