"""The training step as one CUDA graph: forward, loss, backward (with DDP's gradient all-reduces)
and the SGD step captured once and replayed for every batch.

Why: fed by the GPU data path, the host issues AlexNet's ~300 kernels per step beside the decode
and fetch threads of its own process, and the GPU waits for it (bench/NOTES-gpu.md, phases 6-7).
A replay is one call, whatever the step holds.

    step = GraphedStep(model, optimizer, torch.bfloat16, batch_size=256)
    logits, loss = step(x, y)          # eager for the first WARMUP steps, then replays

What a graph fixes at capture, and how this class keeps it right:
- the input's address: every batch is copied into static buffers. A shorter batch (an undecodable
  image dropped) fills the rest with repeats of its own images, weighted 0 in the loss (the
  BatchNorm statistics of that one batch see the repeats);
- the optimizer's LR and weight decay: a change of either (a new epoch of the regime) captures
  again; schedules that change the LR every step (cosine) cannot use graphs;
- the gradient tensors: zeroed inside the graph (never set to None), so the captured backward
  always writes the same ones.
DDP: constructed on the stream the capture uses (tools.train's work stream), at least 11 eager
steps before the capture, NCCL's asynchronous error handling off (PyTorch's CUDA graph notes).
"""
import os

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

WARMUP = 11  # eager steps before the capture: DDP needs 11; they also let cuDNN autotune


def before_process_group():
    """Call before init_process_group: DDP's captured all-reduces need NCCL's asynchronous error
    handling off (PyTorch's CUDA graph notes)."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


def weighted_loss(logits, y, weights):
    """Mean cross-entropy over the samples with weight 1 (padding has weight 0)."""
    return (F.cross_entropy(logits, y, reduction="none") * weights).sum() / weights.sum()


class GraphedStep:
    """Callable (x, y) -> (logits, loss) that trains one step. capture=False runs the same static
    buffers eagerly (what the CPU tests exercise)."""

    def __init__(self, model, optimizer, amp_dtype, batch_size, capture=True):
        self.model, self.optimizer, self.amp_dtype = model, optimizer, amp_dtype
        self.batch, self.capture = batch_size, capture
        self.graph, self.key, self.outputs, self.steps = None, None, None, 0
        self.captures = self.replays = 0
        self.x = self.y = self.w = None
        if isinstance(model, DistributedDataParallel):
            # DDP times its first 10 iterations and every 100th with CUDA events: not in a capture
            model._set_ddp_runtime_logging_sample_rate(2**31 - 1)

    def _buffers(self, x, y):
        fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        self.x = torch.empty((self.batch, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
        self.y = torch.zeros(self.batch, dtype=y.dtype, device=y.device)
        self.w = torch.ones(self.batch, dtype=torch.float32, device=y.device)

    def _load(self, x, y):
        n = len(y)
        if n > self.batch or n == 0:
            raise ValueError(f"a batch of {n} images for a step of {self.batch}")
        if self.x is None:
            self._buffers(x, y)
        self.x[:n].copy_(x)
        self.y[:n].copy_(y)
        if n < self.batch:
            repeat = torch.arange(n, self.batch, device=y.device) % n
            self.x[n:].copy_(x[repeat])
            self.y[n:].copy_(y[repeat])
        self.w[:n].fill_(1)
        self.w[n:].fill_(0)
        return n

    def _train(self):
        self.optimizer.zero_grad(set_to_none=False)
        with torch.autocast(self.x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=False):
            logits = self.model(self.x)
            loss = weighted_loss(logits, self.y, self.w)
        loss.backward()
        self.optimizer.step()
        return logits, loss

    def _capture(self):
        self.graph = self.outputs = None  # the old graph's memory goes before the new one's
        graph = torch.cuda.CUDAGraph()
        # on the current stream: DDP's gradient hooks belong to the stream it was built on; other
        # threads (the data path's decoders) keep using CUDA meanwhile: thread_local
        with torch.cuda.graph(graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"):
            self.outputs = self._train()
        self.graph, self.captures = graph, self.captures + 1

    def __call__(self, x, y):
        n = self._load(x, y)
        self.steps += 1
        if not self.capture or self.steps <= WARMUP:
            logits, loss = self._train()
            return logits[:n], loss
        key = [(g["lr"], g["weight_decay"], g["momentum"]) for g in self.optimizer.param_groups]
        if self.graph is None or key != self.key:
            self._capture()
            self.key = key
        self.graph.replay()
        self.replays += 1
        logits, loss = self.outputs
        return logits[:n], loss
