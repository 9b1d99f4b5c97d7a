"""The cube's training step on a GPU, captured whole in CUDA graphs (issue 11).

At batch 32 an eager step is ~13 ms of Python and kernel launches for a few ms of GPU work.
`GraphedCubeStep` records the whole step (forward, loss, backward, grad clipping, AdamW)
once per lattice step count and replays it with one launch. The maths is
`cube.train.loop.train_epoch`'s inner loop: `cube_loss` with a `LossConfig`, clipping to
`OptimConfig.grad_clip`, autocast per `OptimConfig.precision`, AdamW with the
hyperparameters and LR schedule of `make_optimizer`.

What a graph needs, and how it is met here:
- Fixed shapes: one batch size per instance; a batch of another size is an error (drop the
  last partial batch).
- Fixed step count: step jitter (T = steps + U{0..steps_jitter}, drawn on the host from the
  CPU generator exactly as `CellularCube.run_lattice` draws it) captures one graph per T
  and replays the drawn one.
- Fixed addresses: parameters, gradients (pre-allocated, zeroed in the graph), AdamW state
  (capturable), the learning rate (a device tensor refilled outside the graph), inputs and
  the loss terms all live outside the graphs. The graphs share one memory pool for their
  temporaries only, so they may replay in any order.
- No host syncs inside: capturable AdamW, clip_grad_norm_ without error_if_nonfinite,
  autocast with cache_enabled=False. fp16 needs a GradScaler, whose inf check syncs: it is
  refused, use bf16.

Capturing needs warm-up iterations, which would train; the parameters and optimiser state
are restored after capture, so the first replayed step starts from the model as given.

Not supported: DistributedDataParallel (one process per GPU trains alone here), and
replacing tensors after the first step (`optimizer.load_state_dict`, `model.to`, an LR
scheduler of your own on `optimizer`, which writes a float rate): every step checks that the
graphs still read the live tensors and raises if not. `model.load_state_dict` copies in place
and is fine; the step's own schedule is `scheduler`, and `restore` loads a checkpoint's.
No silent fallbacks: `capture=True` on a non-CUDA device raises; `capture=False` runs the very
same step eagerly, on any device, for tests and for comparison.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch

from cube.model import CellularCube, LatticeKernel, LatticeStep, lattice_step
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig, make_optimizer, restore_training_state
from cube.train.step import TERMS, run_epoch, train_step


def fast_backends(tf32: bool = True) -> None:
    """Global flags for the GPU fast path; call once, explicitly, before building steps.

    cuDNN autotuning picks conv algorithms per shape (the lattice runs one shape), as XLA
    does. TF32 (10-bit mantissa products, fp32 accumulation) runs fp32 convs and matmuls on
    tensor cores. For the lattice convs this changes nothing: torch already defaults to TF32
    for cuDNN convs, so every GPU run of the project has used it, and JAX defaults to it for
    fp32 convs and dots on GPUs. New here is TF32 for the adapters' matmuls (two E×900
    products). Its effect on retrieval quality has not been measured; tf32=False gives
    strict fp32 everywhere, as the parity tests use.
    """
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


@contextlib.contextmanager
def _capture_context() -> Iterator[None]:
    """Warm-up runs the capturable optimiser uncaptured (torch warns; expected here), and a
    torch.compile that hits dynamo's recompile limit must fail rather than fall back to eager.
    The same settings hold during capture, so nothing a guard sees changes between the two."""
    import torch._dynamo  # loaded by torch.optim already

    strict = (
        {"fail_on_recompile_limit_hit": True} if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit") else {}
    )
    with warnings.catch_warnings(), torch._dynamo.config.patch(**strict):
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        yield


class GraphedCubeStep:
    """Owns the model's optimiser and static buffers; `step(q, a)` is one training step.

    `model` is trained in place (and, with `channels_last`, its conv weights are converted to
    channels_last_3d, as the lattice state is). `steps_per_epoch` and `world_size` set the LR
    schedule exactly as `make_optimizer` does. `kernel` picks how the lattice conv is computed
    (`CellularCube.use_kernel`; None keeps the model's). `compile_step` also fuses each lattice
    step with torch.compile (needs Triton on CUDA). `capture=False` runs the same step eagerly.
    """

    def __init__(
        self, model: CellularCube, loss_cfg: LossConfig, optim_cfg: OptimConfig, batch_size: int,
        steps_per_epoch: int, world_size: int = 1, *, kernel: LatticeKernel | None = None, capture: bool = True,
        compile_step: bool = False, channels_last: bool = True, warmup_iters: int = 2,
    ) -> None:
        if not isinstance(model, CellularCube):
            raise TypeError(f"GraphedCubeStep needs a bare CellularCube (no DDP wrapper), got {type(model).__name__}")
        if optim_cfg.precision == "fp16":
            raise NotImplementedError("precision=fp16 needs a GradScaler, whose inf check syncs with the host "
                                      "and cannot live in a CUDA graph; use precision=bf16 (or train_epoch)")
        self.device = model.q_mean.device
        if capture and self.device.type != "cuda":
            raise ValueError(f"capture=True needs the model on a CUDA device, it is on {self.device}; "
                             "pass capture=False to run the same step eagerly, or use cube.train.loop.train_epoch")
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (InfoNCE needs negatives), got {batch_size}")
        self.model, self.loss_cfg, self.optim_cfg = model.train(), loss_cfg, optim_cfg
        self.capture, self.warmup_iters = capture, warmup_iters
        if kernel is not None:
            model.use_kernel(kernel)
        if channels_last:
            model.to(memory_format=torch.channels_last_3d)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.steps_per_epoch = steps_per_epoch
        self._make_optimizer(steps_per_epoch, world_size)
        self._lattice_step: LatticeStep = (
            torch.compile(lattice_step, dynamic=False, fullgraph=True) if compile_step else lattice_step
        )
        cfg = model.cfg
        self.step_counts = tuple(range(cfg.steps, cfg.steps + (cfg.steps_jitter if cfg.lattice else 0) + 1))
        self._q = torch.zeros(batch_size, model.embed_dim, device=self.device)
        self._a = torch.zeros_like(self._q)
        self._out = torch.zeros(len(TERMS), device=self.device)  # the step's loss terms, written in the graph
        self._last = self._out.clone()
        with torch.no_grad():
            for p in self._params:  # static gradients: backward accumulates into them in place
                p.grad = torch.zeros_like(p)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._bound: tuple = ()

    def _make_optimizer(self, steps_per_epoch: int, world_size: int) -> None:
        """AdamW with make_optimizer's hyperparameters and schedule, but a device-tensor LR."""
        reference, sched = make_optimizer(self.model, self.optim_cfg, steps_per_epoch, world_size)
        # The schedule lives on an optimiser that never steps: the scheduler writes a float rate into its
        # optimiser's groups, which would cut the graphs off the rate tensor. It is stepped with
        # every step, gives the rate the device tensor carries, and its state is what checkpoints
        # hold, the same as train_epoch's.
        self.scheduler = sched
        reference.zero_grad(set_to_none=True)
        reference.step()  # a no-op (no gradients), so that the scheduler sees its optimiser step before it does
        d = reference.defaults
        cuda = self.device.type == "cuda"
        self.lr_tensor = torch.tensor(self.lr, device=self.device)
        self.optimizer = torch.optim.AdamW(
            self._params, lr=self.lr_tensor, betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
            amsgrad=d["amsgrad"], foreach=cuda, capturable=cuda)

    @property
    def batch_size(self) -> int:
        return self._q.shape[0]

    @property
    def lr(self) -> float:
        """The rate the next step uses (what `sched.get_last_lr()` reports after train_epoch)."""
        return self.scheduler.get_last_lr()[0]

    @property
    def steps_taken(self) -> int:
        return self.scheduler.last_epoch

    @property
    def terms(self) -> dict[str, torch.Tensor]:
        """The last step's loss terms and gradient norm (device tensors, not overwritten later)."""
        return dict(zip(TERMS, self._last.unbind()))

    def _body(self, steps: int) -> None:
        """The whole training step on the static buffers (cube.train.step.train_step, with T =
        `steps` and the possibly compiled lattice step); captured as-is by `_capture`."""
        terms = train_step(self.model, self.model, self._q, self._a, self.optimizer, self._params, self.loss_cfg,
                           self.optim_cfg, steps, step_fn=self._lattice_step, autocast_cache=False)
        with torch.no_grad():
            self._out.copy_(torch.stack([terms[k].detach().float() for k in TERMS]))

    def step(self, q: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step on raw (question, answer) embeddings (B, E); returns the loss terms
        and gradient norm as fresh device tensors (no host sync). The first call captures the graphs."""
        if q.shape != self._q.shape or a.shape != self._a.shape:
            raise ValueError(f"this step was built for batches of shape {tuple(self._q.shape)}, got {tuple(q.shape)} "
                             f"and {tuple(a.shape)}; drop the last partial batch (drop_last=True)")
        self.model.train()  # scoring between epochs leaves it in eval mode (no fire mask, no jitter)
        self._q.copy_(q, non_blocking=True)
        self._a.copy_(a, non_blocking=True)
        steps = self.model.draw_steps()
        self.lr_tensor.fill_(self.lr)
        if not self.capture:
            self._body(steps)
        else:
            if not self._graphs:
                self._capture()
            self._check_bound()
            self._graphs[steps].replay()
        self.scheduler.step()
        self._last = self._out.clone()
        return self.terms

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Continue from a checkpoint's training state (`cube.train.optim.training_state`'s format,
        from this step or from train_epoch's optimiser); only before the first step."""
        if self._graphs:
            raise RuntimeError("restore() must come before the first step: the graphs already read the old state")
        restore_training_state(self.optimizer, self.scheduler, tensors, meta)
        for group in self.optimizer.param_groups:  # load_state_dict wrote the saved float rate
            group["lr"] = self.lr_tensor
        # The cosine continues from its optimiser's current rate (torch's chainable form): give the
        # schedule's own optimiser the saved rate too.
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.lr_tensor.fill_(self.lr)

    def run_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int = 0) -> dict[str, float]:
        """`train_epoch`'s report (mean loss terms, mean grad norm, samples/s, lr) for the
        graphed step (cube.train.step.run_epoch, which also stops a diverged run)."""
        peak = self.scheduler.optimizer.param_groups[0]["initial_lr"]
        out = run_epoch(self.step, batches, self.device, epoch, self.steps_per_epoch, peak, self.optim_cfg)
        return {**out, "lr": self.lr}

    # --- capture -----------------------------------------------------------------------

    def _capture(self) -> None:
        """Warm up on a side stream (cuDNN autotuning, lazy AdamW state, torch.compile), capture
        one graph per step count into a shared pool, then undo the warm-up's training."""
        saved = self._snapshot()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with _capture_context():
                with torch.cuda.stream(stream):
                    for steps in self.step_counts:
                        for _ in range(self.warmup_iters):
                            self._body(steps)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                pool, graphs = torch.cuda.graph_pool_handle(), {}
                for steps in self.step_counts:
                    graphs[steps] = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graphs[steps], pool=pool, stream=stream):
                        self._body(steps)
        finally:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._restore(saved)
        self._graphs = graphs  # only once all are captured: a failed capture leaves none half-set
        self._bound = self._pointers()

    def _snapshot(self) -> tuple[list[torch.Tensor], dict[torch.Tensor, dict[str, torch.Tensor]]]:
        params = [p.detach().clone() for p in self._params]
        state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in self.optimizer.state.items()}
        return params, state

    @torch.no_grad()
    def _restore(self, saved: tuple[list[torch.Tensor], dict[torch.Tensor, dict[str, torch.Tensor]]]) -> None:
        """Parameters back to their values, AdamW state back to its values or, where warm-up
        created it, to a fresh AdamW's (step 0, zero moments), all in place."""
        params, state = saved
        for p, value in zip(self._params, params):
            p.copy_(value)
            p.grad.zero_()
        for p, s in self.optimizer.state.items():
            for k, v in s.items():
                if not torch.is_tensor(v):
                    continue
                if p in state:
                    v.copy_(state[p][k])
                else:
                    v.zero_()

    def _pointers(self) -> tuple:
        """Addresses the graphs read; any change means a tensor was replaced behind them."""
        ptrs = [self.lr_tensor.data_ptr()] + [g["lr"] is self.lr_tensor for g in self.optimizer.param_groups]
        for p in self._params:
            ptrs += [p.data_ptr(), p.grad.data_ptr() if p.grad is not None else 0]
            ptrs += [v.data_ptr() for v in self.optimizer.state[p].values() if torch.is_tensor(v)]
        return tuple(ptrs)

    def _check_bound(self) -> None:
        if self._pointers() != self._bound:
            raise RuntimeError("a tensor that the captured graphs read was replaced (optimizer.load_state_dict, "
                               "model.to, or an LR scheduler writing a float lr?); build a new GraphedCubeStep")

