"""Krizhevsky's "one weird trick" (arXiv:1404.5997): data parallelism for the conv trunk, model
parallelism for the fully connected classifier.

Usage (under torchrun, after torch.distributed.init_process_group):
    from tools.imagenet.models import build_model
    from tools.imagenet.owt import wrap_owt
    model = build_model("alexnetowtbn", 1000)          # on the CPU: only the shards reach the GPU
    owt = wrap_owt(model, device=torch.device("cuda", local_rank))
    opt = torch.optim.SGD(owt.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss = F.cross_entropy(owt(local_images), local_labels)   # local batch, exactly as under DDP
    loss.backward(); opt.step()
    ckpt = {"model": owt.full_state_dict(), "optimizer": owt.full_optimizer_state(opt)}

How a step runs on rank r of W (N = global batch, B_r = rank r's part):
  1. trunk (features + adaptive pool) on the local B_r images, wrapped in DDP: its gradients are
     averaged over ranks as under `--parallel ddp`, and its BatchNorm2d layers use per-rank batch
     statistics, as DDP (and the seed's DataParallelTable) do;
  2. element-wise layers before the first Linear (Dropout) run on the local features, then the
     features of the whole global batch are all-gathered (rows, in rank order);
  3. every Linear is column-parallel: rank r holds a contiguous slice of its output neurons (rows of
     the weight, of the bias, and of a following BatchNorm1d) and computes them for all N samples;
     the element-wise layers after it (BatchNorm1d over all N samples, ReLU, the next Dropout) run
     on that slice, then the slices are all-gathered (columns) to form the next Linear's input;
  4. the last Linear's logit slices go back with one all-to-all, so rank r gets the full logits of
     its own B_r samples.
Backward mirrors it: the gathers become reduce-scatters and the all-to-all is reversed.
Every rank calls backward on the mean loss of its own samples; the classifier then receives the
gradient of the sum over ranks, so it is scaled by 1/W where it enters (the logits), and by W where
it leaves (the features) so that DDP's averaging in the trunk stays right. The result equals DDP:
the gradient of the mean over ranks of the local mean losses (the global mean loss when batches
are even). Single-process semantics of the whole batch hold in the classifier (BatchNorm1d sees all
N samples, as in the seed, whose classifier ran on one GPU). Dropout masks are drawn by the rank
that owns each slice, before the gather, so every rank sees the same dropped activations.

Bytes per step (see `comm_breakdown`): AlexNet (alexnetowt), N=256 over 2 GPUs, bf16 activations:
ddp all-reduces 61.1 M fp32 gradients, 244 MB sent per rank; owt sends 19 MB per rank (9.9 MB
trunk gradients, 4.7 MB features, 4.2 MB hidden activations, 0.26 MB logits, forward + backward).
"""
import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# torch 2.14 renames the tensor collectives (the old names warn); torch 2.11 only has the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Layers that act on each activation on its own, so they can run on a column slice.
_ELEMENTWISE = (nn.Dropout, nn.ReLU, nn.ReLU6, nn.Threshold, nn.LeakyReLU, nn.ELU, nn.GELU,
                nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Identity)


def split_sizes(n, world_size):
    """Contiguous near-equal split of n items over ranks (earlier ranks get the remainder)."""
    return [n // world_size + (1 if i < n % world_size else 0) for i in range(world_size)]


def _pad_to(x, dim, size):
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim)


def _gather_tensor(x, dim, sizes, group):
    """All-gather x (size sizes[rank] along dim) from every rank; concatenate along dim."""
    world, m = len(sizes), max(sizes)
    xp = _pad_to(x, dim, m).contiguous()
    out = xp.new_empty((world * xp.shape[0],) + tuple(xp.shape[1:]))
    _all_gather(out, xp, group=group)
    out = out.view((world,) + tuple(xp.shape))
    if dim == 0 and len(set(sizes)) == 1:
        return out.view((-1,) + tuple(xp.shape[1:]))
    return torch.cat([out[i].narrow(dim, 0, s) for i, s in enumerate(sizes)], dim)


def _reduce_scatter_tensor(g, dim, sizes, rank, group):
    """Inverse of _gather_tensor for gradients: sum over ranks, keep this rank's part."""
    m = max(sizes)
    if dim == 0:
        same = len(set(sizes)) == 1
        stacked = g if same else torch.cat([_pad_to(c, 0, m) for c in g.split(sizes, 0)], 0)
    else:
        stacked = torch.stack([_pad_to(c, dim, m) for c in g.split(sizes, dim)]).flatten(0, 1)
    stacked = stacked.contiguous()
    chunk_shape = list(g.shape)
    chunk_shape[dim] = m
    out = g.new_empty(chunk_shape)
    _reduce_scatter(out, stacked, op=dist.ReduceOp.SUM, group=group)
    return out.narrow(dim, 0, sizes[rank])


class _Gather(torch.autograd.Function):
    """All-gather along dim; backward reduce-scatters, scaled by grad_scale."""

    @staticmethod
    def forward(ctx, x, dim, sizes, rank, group, grad_scale):
        ctx.args = (dim, sizes, rank, group, grad_scale)
        return _gather_tensor(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, g):
        dim, sizes, rank, group, grad_scale = ctx.args
        gx = _reduce_scatter_tensor(g, dim, sizes, rank, group)
        if grad_scale != 1:
            gx = gx * grad_scale
        return gx, None, None, None, None, None


def _all_to_all_blocks(blocks, rm, cm, group):
    """Send blocks[q] (at most rm x cm) to rank q; return what each rank q sent here, padded."""
    send = blocks[0].new_zeros(len(blocks), rm, cm)
    for q, blk in enumerate(blocks):
        send[q, :blk.shape[0], :blk.shape[1]] = blk
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


class _LogitsToOwners(torch.autograd.Function):
    """Column-sliced logits of the global batch -> full logits of this rank's samples."""

    @staticmethod
    def forward(ctx, z, rows, cols, rank, group, grad_scale):
        # z: all N rows (rank order) x this rank's cols[rank] logits. Rank q gets its rows.
        ctx.args = (rows, cols, rank, group, grad_scale)
        recv = _all_to_all_blocks(z.split(rows, 0), max(rows), max(cols), group)
        return torch.cat([recv[q, :rows[rank], :c] for q, c in enumerate(cols)], 1)

    @staticmethod
    def backward(ctx, g):
        rows, cols, rank, group, grad_scale = ctx.args
        # Reverse: each column slice of this rank's logits' gradient goes back to its owner.
        recv = _all_to_all_blocks(g.split(cols, 1), max(rows), max(cols), group)
        gz = torch.cat([recv[q, :r, :cols[rank]] for q, r in enumerate(rows)], 0)
        if grad_scale != 1:
            gz = gz * grad_scale
        return gz, None, None, None, None, None


class _Trunk(nn.Module):
    """features -> adaptive pool -> flatten; state_dict keys as in the plain model."""

    def __init__(self, features, avgpool):
        super().__init__()
        self.features = features
        self.avgpool = avgpool

    def forward(self, x):
        return torch.flatten(self.avgpool(self.features(x)), 1)


def _slice_module(module, start, size):
    """A copy of a Linear / BatchNorm1d keeping output neurons [start, start+size)."""
    if isinstance(module, nn.Linear):
        part = nn.Linear(module.in_features, size, bias=module.bias is not None,
                         device=module.weight.device, dtype=module.weight.dtype)
    else:
        part = nn.BatchNorm1d(size, eps=module.eps, momentum=module.momentum, affine=module.affine,
                              track_running_stats=module.track_running_stats,
                              device=module.running_mean.device if module.track_running_stats
                              else None,
                              dtype=module.running_mean.dtype if module.track_running_stats
                              else None)
    with torch.no_grad():
        for name, t in list(module.named_parameters(recurse=False)) + \
                list(module.named_buffers(recurse=False)):
            target = getattr(part, name)
            if t.dim() == 0:
                target.copy_(t)
            else:
                target.copy_(t[start:start + size])
    return part


class OWTModel(nn.Module):
    """A model whose trunk is data parallel (DDP) and whose classifier is split over the ranks.

    forward(local_x) -> local_logits. Build it with `wrap_owt`."""

    def __init__(self, model, device=None, process_group=None, even_batches=False):
        super().__init__()
        for attr in ("features", "avgpool", "classifier"):
            if not hasattr(model, attr):
                raise ValueError(f"owt needs a model with .features, .avgpool and .classifier "
                                 f"(the seed's archs, torchvision alexnet/vgg); {type(model).__name__} "
                                 f"has no .{attr}")
        if not isinstance(model.classifier, nn.Sequential):
            raise ValueError("owt needs model.classifier to be an nn.Sequential")
        full_sd = model.state_dict()
        stray = [k for k in full_sd if k.split(".")[0] not in ("features", "avgpool", "classifier")]
        if stray:
            raise ValueError(f"owt: parameters outside features/avgpool/classifier: {stray[:3]}")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)
        self.even_batches = even_batches
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self._full_keys = list(full_sd)
        self._full_param_names = [n for n, _ in model.named_parameters()]
        self._spec = _comm_spec(model)

        trunk = _Trunk(model.features, model.avgpool).to(self.device)
        ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        self.trunk = DistributedDataParallel(trunk, process_group=process_group, **ddp_kwargs)
        self.classifier, self._plan, self._sharded = self._shard(model.classifier)

        names = self.full_param_names()
        if names != self._full_param_names:
            raise AssertionError(f"owt parameter order differs from the model's: {names[:5]}...")

    # ----- construction -------------------------------------------------------------------
    def _shard(self, classifier):
        """Sequential with the classifier's indices, Linear/BatchNorm1d cut to this rank's slice.

        plan: (prelude indices, [(indices of one Linear block, out_features split)...])."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        layers = list(classifier)
        linear_at = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
        if not linear_at:
            raise ValueError("owt: the classifier has no nn.Linear")
        prelude = list(range(linear_at[0]))
        blocks, new_layers, sharded = [], [], {}
        for i, m in enumerate(layers):
            if isinstance(m, nn.Linear):
                blocks.append(([i], split_sizes(m.out_features, self.world)))
            elif isinstance(m, _ELEMENTWISE):
                if blocks:
                    blocks[-1][0].append(i)
            elif isinstance(m, nn.BatchNorm1d) and blocks \
                    and m.num_features == layers[blocks[-1][0][0]].out_features:
                blocks[-1][0].append(i)  # per-feature: runs on the slice, stats over all N
            else:
                raise ValueError(f"owt cannot split classifier layer {i} ({type(m).__name__}): "
                                 f"only Linear, BatchNorm1d after a Linear, and element-wise "
                                 f"layers ({', '.join(t.__name__ for t in _ELEMENTWISE)})")
        for i, m in enumerate(layers):
            if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
                sizes = split_sizes(m.weight.shape[0] if isinstance(m, nn.Linear)
                                    else m.num_features, self.world)
                # Every rank takes its slice of rank 0's weights, so all agree on one model.
                full = copy.deepcopy(m).to(self.device)
                with torch.no_grad():
                    for t in list(full.parameters()) + list(full.buffers()):
                        dist.broadcast(t, src, group=self.group)
                part = _slice_module(full, sum(sizes[:self.rank]), sizes[self.rank])
                sharded[i] = sizes
                new_layers.append(part)
            else:
                new_layers.append(copy.deepcopy(m).to(self.device))
        return nn.Sequential(*new_layers), (prelude, blocks), sharded

    # ----- forward ------------------------------------------------------------------------
    def forward(self, x):
        f = self.trunk(x)
        prelude, blocks = self._plan
        for i in prelude:
            f = self.classifier[i](f)
        if self.even_batches:
            rows = [f.shape[0]] * self.world
        else:
            n = torch.tensor([f.shape[0]], device=f.device, dtype=torch.int64)
            all_n = n.new_empty(self.world)
            _all_gather(all_n, n, group=self.group)
            rows = all_n.tolist()
        h = _Gather.apply(f, 0, rows, self.rank, self.group, float(self.world))
        for b, (indices, cols) in enumerate(blocks):
            for i in indices:
                h = self.classifier[i](h)
            if b + 1 < len(blocks):
                h = _Gather.apply(h, 1, cols, self.rank, self.group, 1.0)
        return _LogitsToOwners.apply(h, rows, cols, self.rank, self.group, 1.0 / self.world)

    # ----- single-model layout ------------------------------------------------------------
    def _local_state(self):
        """This rank's tensors under the plain model's keys (sharded ones are slices)."""
        sd = dict(self.trunk.module.state_dict())
        sd.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        return sd

    def _is_sharded_key(self, key):
        parts = key.split(".")
        return parts[0] == "classifier" and int(parts[1]) in self._sharded \
            and parts[-1] != "num_batches_tracked"

    def _sizes_for_key(self, key):
        return self._sharded[int(key.split(".")[1])]

    def full_param_names(self):
        """Plain-model names of self.parameters(), in order."""
        names = [n for n, _ in self.trunk.module.named_parameters()]
        return names + [f"classifier.{n}" for n, _ in self.classifier.named_parameters()]

    def full_state_dict(self):
        """The plain model's state_dict (same keys and shapes), assembled on every rank.

        Collective: every rank must call it. Trunk parameters are equal on all ranks (DDP); trunk
        buffers (BatchNorm2d running stats, per rank under DDP) are rank 0's on every rank."""
        local = self._local_state()
        trunk_buffers = {n for n, _ in self.trunk.module.named_buffers()}
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        out = {}
        for key in self._full_keys:
            t = local[key].detach()
            if self._is_sharded_key(key):
                t = _gather_tensor(t, 0, self._sizes_for_key(key), self.group)
            else:
                t = t.clone()
                if key in trunk_buffers:  # per-rank BatchNorm2d stats: rank 0's, as DDP uses
                    dist.broadcast(t, src, group=self.group)
            out[key] = t
        return out

    def load_full_state_dict(self, state_dict):
        """Load a plain-model state_dict (every rank passes the same one); no communication."""
        missing = set(self._full_keys) - set(state_dict)
        unexpected = set(state_dict) - set(self._full_keys)
        if missing or unexpected:
            raise KeyError(f"state_dict does not fit this model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        local = self._local_state()
        with torch.no_grad():
            for key in self._full_keys:
                src = state_dict[key]
                if self._is_sharded_key(key):
                    sizes = self._sizes_for_key(key)
                    src = src[sum(sizes[:self.rank]):sum(sizes[:self.rank + 1])]
                if src.shape != local[key].shape:
                    raise ValueError(f"{key}: checkpoint shape {tuple(state_dict[key].shape)} does "
                                     f"not fit the model's")
                local[key].copy_(src)

    def _param_keys(self, optimizer):
        """Plain-model name of each optimizer parameter, in the optimizer's index order."""
        name_of = {id(p): n for p, n in zip(self.parameters(), self.full_param_names())}
        keys = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in name_of:
                    raise ValueError("the optimizer holds a parameter that is not this OWTModel's")
                keys.append(name_of[id(p)])
        return keys

    def full_optimizer_state(self, optimizer):
        """optimizer.state_dict() as an optimizer over the plain model would have it.

        Collective. Indices are the optimizer's own (same param groups over the plain model's
        parameters in the same order give the same indices); per-parameter tensors of sharded
        parameters (SGD's momentum_buffer) are gathered to full size."""
        sd = optimizer.state_dict()
        keys = self._param_keys(optimizer)
        state = {}
        for idx, key in enumerate(keys):
            entry = sd["state"].get(idx)
            if entry is None:
                continue
            state[idx] = {}
            for name, v in entry.items():
                if self._is_sharded_key(key) and torch.is_tensor(v) and v.dim() > 0:
                    v = _gather_tensor(v, 0, self._sizes_for_key(key), self.group)
                state[idx][name] = v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
        return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}

    def load_full_optimizer_state(self, optimizer, state):
        """Load a plain-model optimizer state_dict (from either ddp or owt) into this optimizer."""
        keys = self._param_keys(optimizer)
        local = {}
        for idx, entry in state["state"].items():
            idx = int(idx)
            key = keys[idx]
            local[idx] = {}
            for name, v in entry.items():
                if self._is_sharded_key(key) and torch.is_tensor(v) and v.dim() > 0:
                    sizes = self._sizes_for_key(key)
                    v = v[sum(sizes[:self.rank]):sum(sizes[:self.rank + 1])]
                local[idx][name] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
        optimizer.load_state_dict({"state": local,
                                   "param_groups": copy.deepcopy(state["param_groups"])})


def wrap_owt(model, device=None, process_group=None, even_batches=False):
    """Split `model` for one-weird-trick training over the ranks of process_group.

    model: a plain model with .features, .avgpool and .classifier (build it on the CPU so the full
    classifier never lands on the GPU; its trunk modules are moved to `device` and reused).
    even_batches=True skips the per-step exchange of local batch sizes (one tiny all-gather and a
    host sync) when every rank is known to pass the same batch size."""
    return OWTModel(model, device=device, process_group=process_group, even_batches=even_batches)


# ----- communication volume ------------------------------------------------------------------
def _comm_spec(model):
    classifier = model.classifier
    linears = [m for m in classifier if isinstance(m, nn.Linear)]
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("classifier."))
    return {"all_params": sum(p.numel() for p in model.parameters()), "trunk_params": trunk,
            "linears": [(m.in_features, m.out_features) for m in linears]}


def comm_breakdown(model, global_batch, world_size, mode, act_bytes=4, grad_bytes=4):
    """Bytes each rank sends per step (it receives as many), by collective, for ring algorithms.

    An all-reduce of S bytes sends 2(W-1)/W*S per rank, an all-gather or reduce-scatter of a
    result of S bytes (W-1)/W*S, an all-to-all of a local buffer of S bytes (W-1)/W*S.
    ddp: all-reduce of every gradient. owt: all-reduce of the trunk's gradients; forward
    all-gather of the features and of each hidden layer's activations (and their reduce-scatters
    in backward); the logits' all-to-all forward and backward. act_bytes=2 for bf16 autocast."""
    spec = model._spec if isinstance(model, OWTModel) else _comm_spec(model)
    w = world_size
    frac = (w - 1) / w
    if mode == "ddp":
        return {"grad_allreduce": int(2 * frac * spec["all_params"] * grad_bytes)}
    if mode != "owt":
        raise ValueError(f"mode must be 'ddp' or 'owt', not {mode!r}")
    n = global_batch
    linears = spec["linears"]
    out = {"trunk_grad_allreduce": int(2 * frac * spec["trunk_params"] * grad_bytes),
           "features_gather_fwd_bwd": int(2 * frac * n * linears[0][0] * act_bytes)}
    hidden = sum(o for _, o in linears[:-1])
    out["hidden_gather_fwd_bwd"] = int(2 * frac * n * hidden * act_bytes)
    out["logits_alltoall_fwd_bwd"] = int(2 * frac * n * linears[-1][1] / w * act_bytes)
    return out


def bytes_per_step(model, global_batch, world_size, mode, act_bytes=4, grad_bytes=4):
    """Total bytes each rank sends per training step under mode 'ddp' or 'owt' (see comm_breakdown)."""
    return sum(comm_breakdown(model, global_batch, world_size, mode, act_bytes, grad_bytes).values())
