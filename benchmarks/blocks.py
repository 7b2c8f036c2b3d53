"""Throughput of trajflow's coupling flows against zuko, nflows and a conditioner floor.

Usage:
    python benchmarks/blocks.py --out benchmarks/results/blocks_cpu.json
    python benchmarks/blocks.py --out /tmp/smoke.json --quick       # tiny sizes, seconds
    python benchmarks/blocks.py --out FILE.json --compile --threads 1 --device cuda

What is timed (median wall-clock, inference under ``torch.no_grad()``):

* 4-layer affine and spline coupling flows on ``(B, D)`` vectors, forward with log-det and
  inverse with log-det, for trajflow, zuko and nflows built with the same split (the first
  ``D // 2`` features kept, halves alternating layer by layer), the same conditioner widths
  and SiLU activations, 8 bins and linear tails for the splines;
* the FLOOR: the same four conditioner MLPs run alone on the kept half of the input, so
  ``ratio_to_floor`` says how much the coupling machinery adds on top of the matmuls;
* a training step (forward, Gaussian NLL, backward) of each flow against the floor's;
* the inverse of a TarFlow block, token by token with a KV cache against block Jacobi
  (default tolerance), with the largest difference between the two;
* with ``--compile``, trajflow's flows under ``torch.compile`` too (against the eager floor).

zuko's inverse log-det is what ``transform.inv.call_and_ladj`` costs: zuko computes the
inverse, then runs the forward again for the log-det. nflows' conditioners are plain MLPs
(not its ``ResidualNet``) with trajflow's widths, so every library does the same matmuls.

Results go to ``--out`` (JSON with a fingerprint, the records and the PASS/MISS targets),
a markdown table on stdout, and a PNG chart with the same stem.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Run as a script: benchmarks/ is not a package, so its shared helpers come from its folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Target,
    fingerprint,
    markdown_table,
    pyplot,
    resolve_devices,
    timeit_interleaved,
    write_json,
)

from trajflow import BLOCKS, Sequential
from trajflow.nn import MLP
from trajflow.testing import perturb_parameters

FLOOR = "floor"
KINDS = ("affine", "spline")
#: Largest ratio to the floor that counts as a PASS, per coupling kind.
FLOOR_LIMITS = {"affine": 1.2, "spline": 1.5}
#: Smallest Jacobi speedup over the token-by-token inverse that counts as a PASS.
JACOBI_SPEEDUP = 3.0

Flow = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run.

    Attributes:
        batch: Samples per call of the coupling flows.
        features: ``D`` of the coupling flows.
        hidden: Hidden widths of every conditioner MLP.
        bins: Spline bins.
        layers: Coupling layers per flow.
        tar_batch: Sequences per call of the TarFlow block.
        tar_tokens: Tokens per sequence.
        tar_features: Channels per token.
        tar_dim: Transformer width.
        tar_layers: Transformer layers.
        tar_heads: Attention heads.
        jacobi_blocks: Jacobi block sizes to time.
    """

    batch: int = 4096
    features: int = 64
    hidden: tuple[int, ...] = (256, 256)
    bins: int = 8
    layers: int = 4
    tar_batch: int = 64
    tar_tokens: int = 64
    tar_features: int = 16
    tar_dim: int = 64
    tar_layers: int = 4
    tar_heads: int = 4
    jacobi_blocks: tuple[int, ...] = (16, 64)


FULL = Sizes()
QUICK = Sizes(
    batch=256,
    features=16,
    hidden=(32, 32),
    bins=4,
    tar_batch=4,
    tar_tokens=16,
    tar_features=4,
    tar_dim=16,
    tar_layers=2,
    tar_heads=2,
    jacobi_blocks=(8, 16),
)


@dataclasses.dataclass
class Contender:
    """One flow under test: what to time, each a function of the input batch.

    Attributes:
        library: Who implements it (``trajflow``, ``zuko``, ``nflows``, or ``floor``).
        kind: ``affine`` or ``spline``.
        forward: Data to latent with log-det (for the floor: the conditioners alone).
        inverse: Latent to data with log-det; None for the floor, which has no direction.
        train: A training step (forward and backward); None to skip it.
    """

    library: str
    kind: str
    forward: Callable[[Tensor], object]
    inverse: Callable[[Tensor], object] | None
    train: Callable[[Tensor], None] | None


# ---------------------------------------------------------------------------------------------
# The contenders.


def kept_first(layer: int) -> bool:
    """Whether coupling layer ``layer`` keeps the first half (trajflow's ``parity=False``)."""
    return layer % 2 == 0


def build_trajflow(kind: str, sizes: Sizes) -> Sequential:
    """trajflow's flow: ``layers`` couplings alternating parity, perturbed off the identity."""
    name = f"{kind}_coupling"
    extra = {"bins": sizes.bins} if kind == "spline" else {}
    flow = Sequential(
        *(
            BLOCKS.build(
                name,
                features=sizes.features,
                hidden_features=sizes.hidden,
                parity=not kept_first(i),
                **extra,
            )
            for i in range(sizes.layers)
        )
    )
    return perturb_parameters(flow, scale=0.05, seed=0)


def nll_step(module: nn.Module, flow: Flow) -> Callable[[Tensor], None]:
    """A training step of ``flow``: Gaussian negative log-likelihood, then its backward."""

    def step(x: Tensor) -> None:
        module.zero_grad(set_to_none=True)
        z, logdet = flow(x)
        loss = 0.5 * z.pow(2).sum(dim=-1).mean() - logdet.mean()
        loss.backward()

    return step


def trajflow_contenders(
    kind: str, sizes: Sizes, device: torch.device, compile: bool
) -> tuple[Sequential, list[Contender]]:
    """trajflow's flow, and its contenders: eager, and under ``torch.compile`` if ``compile``."""
    flow = build_trajflow(kind, sizes).to(device)
    ours = [Contender("trajflow", kind, flow, flow.inverse, nll_step(flow, flow))]
    if compile:
        forward, inverse = torch.compile(flow), torch.compile(flow.inverse)
        ours.append(Contender("trajflow+compile", kind, forward, inverse, None))
    return flow, ours


def floor_contender(flow: Sequential) -> Contender:
    """The conditioners of ``flow`` alone, each applied to the kept half of the same input.

    Its training step is their forward and a backward from unit output gradients.
    """
    conditioners = nn.ModuleList(block.conditioner for block in flow)
    kept = flow[0].kept

    def run(x: Tensor) -> list[Tensor]:
        return [mlp(x[:, :kept]) for mlp in conditioners]

    def train(x: Tensor) -> None:
        conditioners.zero_grad(set_to_none=True)
        outputs = run(x)
        ones = [torch.ones((), device=x.device).expand_as(out) for out in outputs]
        torch.autograd.backward(outputs, ones)

    kind = flow[0].registered_name.removesuffix("_coupling")
    return Contender(FLOOR, kind, run, None, train)


def zuko_contender(kind: str, sizes: Sizes, device: torch.device) -> Contender:
    """zuko's coupling transforms (RealNVP's for affine, NSF's spline) with the same split."""
    from zuko.flows.coupling import GeneralCouplingTransform
    from zuko.transforms import ComposedTransform, MonotonicAffineTransform, MonotonicRQSTransform

    d, kept = sizes.features, sizes.features // 2
    if kind == "affine":
        univariate, shapes = MonotonicAffineTransform, [(), ()]
    else:
        bins = sizes.bins
        univariate, shapes = MonotonicRQSTransform, [(bins,), (bins,), (bins - 1,)]
    lazy = nn.ModuleList()
    for i in range(sizes.layers):
        # zuko's mask marks the *kept* (constant) features.
        index = torch.arange(d)
        mask = index < kept if kept_first(i) else index >= d - kept
        lazy.append(
            GeneralCouplingTransform(
                features=d,
                mask=mask,
                univariate=univariate,
                shapes=shapes,
                hidden_features=sizes.hidden,
                activation=nn.SiLU,
            )
        )
    lazy = lazy.to(device)
    transform = ComposedTransform(*(layer() for layer in lazy))
    forward, inverse = transform.call_and_ladj, transform.inv.call_and_ladj
    return Contender("zuko", kind, forward, inverse, nll_step(lazy, forward))


class _PlainNet(nn.Module):
    """An MLP with nflows' conditioner signature ``net(inputs, context)``."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int]):
        super().__init__()
        self.mlp = MLP(in_features, out_features, tuple(hidden), activation=nn.SiLU)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        return self.mlp(inputs)


def nflows_contender(kind: str, sizes: Sizes, device: torch.device) -> Contender:
    """nflows' coupling transforms with plain-MLP conditioners and linear spline tails."""
    from nflows.transforms import CompositeTransform
    from nflows.transforms.coupling import (
        AffineCouplingTransform,
        PiecewiseRationalQuadraticCouplingTransform,
    )

    d, kept = sizes.features, sizes.features // 2
    create_net = functools.partial(_PlainNet, hidden=sizes.hidden)
    layers = []
    for i in range(sizes.layers):
        # nflows' mask marks the *transformed* features.
        index = torch.arange(d)
        mask = (index >= kept if kept_first(i) else index < d - kept).int()
        if kind == "affine":
            layers.append(AffineCouplingTransform(mask, create_net))
        else:
            layers.append(
                PiecewiseRationalQuadraticCouplingTransform(
                    mask, create_net, num_bins=sizes.bins, tails="linear", tail_bound=5.0
                )
            )
    flow = CompositeTransform(layers).to(device)
    return Contender("nflows", kind, flow, flow.inverse, nll_step(flow, flow))


def contenders(kind: str, sizes: Sizes, device: torch.device, compile: bool) -> list[Contender]:
    """The floor, trajflow (and compiled), zuko and nflows for one coupling kind."""
    flow, ours = trajflow_contenders(kind, sizes, device, compile)
    return [
        floor_contender(flow),
        *ours,
        zuko_contender(kind, sizes, device),
        nflows_contender(kind, sizes, device),
    ]


# ---------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to measure.

    Attributes:
        warmup: Untimed calls of everything first.
        repeats: Timed rounds; each round calls every function once (interleaved).
        train: Also time a training step of each flow.
        compile: Also time trajflow's flows under ``torch.compile``.
    """

    warmup: int = 2
    repeats: int = 10
    train: bool = True
    compile: bool = False


def operations(contender: Contender, x: Tensor, train: bool) -> dict[str, Callable[[], object]]:
    """The timed calls of ``contender``: no-grad forward and inverse, and a training step."""

    def inference(fn: Callable[[Tensor], object]) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return fn(x)

        return call

    ops = {"forward": inference(contender.forward)}
    if contender.inverse is not None:
        ops["inverse"] = inference(contender.inverse)
    if train and contender.train is not None:
        ops["train_step"] = functools.partial(contender.train, x)
    return ops


def coupling_records(
    sizes: Sizes, device: torch.device, settings: Settings
) -> list[dict[str, Any]]:
    """Times every contender of both coupling kinds on ``device``; one record per operation.

    The calls of one kind are interleaved within each repeat, so the ratios to the floor
    are measured under the same machine load. The floor of the forward and the inverse is
    the conditioners' no-grad forward; that of the training step, their forward and backward.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sizes.batch, sizes.features, generator=generator).to(device)
    records = []
    for kind in KINDS:
        calls = [
            (contender.library, op, fn)
            for contender in contenders(kind, sizes, device, settings.compile)
            for op, fn in operations(contender, x, settings.train).items()
        ]
        fns = [fn for _, _, fn in calls]
        seconds = timeit_interleaved(fns, settings.warmup, settings.repeats)
        floor = {
            op: value
            for (library, op, _), value in zip(calls, seconds, strict=True)
            if library == FLOOR
        }
        for (library, op, _), value in zip(calls, seconds, strict=True):
            reference = floor["train_step" if op == "train_step" else "forward"]
            records.append(
                {
                    "library": library,
                    "flow": kind,
                    "op": op,
                    "device": str(device),
                    "dtype": str(x.dtype).removeprefix("torch."),
                    "batch": sizes.batch,
                    "seconds": value,
                    "samples_per_s": sizes.batch / value,
                    "ratio_to_floor": value / reference,
                }
            )
    return records


def tarflow_records(sizes: Sizes, device: torch.device, settings: Settings) -> list[dict[str, Any]]:
    """Times the TarFlow inverse: token by token with a KV cache, then block Jacobi.

    Returns no records, with a printed note, if the ``tarflow`` block is not registered.
    """
    if "tarflow" not in BLOCKS:
        print("note: no 'tarflow' block registered; skipping the TarFlow inverse benchmark")
        return []
    block = BLOCKS.build(
        "tarflow",
        features=sizes.tar_features,
        tokens=sizes.tar_tokens,
        dim=sizes.tar_dim,
        layers=sizes.tar_layers,
        heads=sizes.tar_heads,
    )
    block = perturb_parameters(block, scale=0.02, seed=0).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    shape = (sizes.tar_batch, sizes.tar_tokens, sizes.tar_features)
    z = torch.randn(shape, generator=generator).to(device)
    base = {
        "library": "trajflow",
        "flow": "tarflow",
        "op": "inverse",
        "device": str(device),
        "batch": sizes.tar_batch,
        "jacobi_tol": block.jacobi_tol,
    }

    with torch.no_grad():
        reference, _ = block.inverse_kv_cache(z)
        solves = {
            size: block.inverse_jacobi(z, block_size=size, return_iterations=True)
            for size in sizes.jacobi_blocks
        }

    def run(size: int | None) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                if size is None:
                    return block.inverse_kv_cache(z)
                return block.inverse_jacobi(z, block_size=size)

        return call

    fns = [run(None), *map(run, sizes.jacobi_blocks)]
    seconds = timeit_interleaved(fns, settings.warmup, settings.repeats)
    records = [_tar_record(base, "kv_cache", None, seconds[0], seconds[0])]
    for size, value in zip(sizes.jacobi_blocks, seconds[1:], strict=True):
        x, _, iterations = solves[size]
        record = _tar_record(base, "jacobi", size, value, seconds[0])
        record["iterations"] = iterations
        record["max_abs_diff"] = (x - reference).abs().max().item()
        records.append(record)
    return records


def _tar_record(
    base: dict[str, Any], method: str, block_size: int | None, seconds: float, cache_seconds: float
) -> dict[str, Any]:
    return {
        **base,
        "method": method,
        "block_size": block_size,
        "seconds": seconds,
        "samples_per_s": base["batch"] / seconds,
        "speedup_vs_kv_cache": cache_seconds / seconds,
    }


# ---------------------------------------------------------------------------------------------
# Targets, table, chart.


def evaluate_targets(records: Sequence[dict[str, Any]]) -> list[Target]:
    """The issue's targets: coupling time against the floor, Jacobi speedup over the cache."""
    targets = []
    for record in records:
        device, library = record["device"], record["library"]
        if library.startswith("trajflow") and record["flow"] in FLOOR_LIMITS:
            if record["op"] in ("forward", "inverse"):
                name = f"{library} {record['flow']} {record['op']} time / floor ({device})"
                targets.append(Target(name, record["ratio_to_floor"], FLOOR_LIMITS[record["flow"]]))
        elif record["flow"] == "tarflow" and record["method"] == "jacobi":
            name = f"tarflow Jacobi (block {record['block_size']}) speedup vs KV cache ({device})"
            targets.append(
                Target(name, record["speedup_vs_kv_cache"], JACOBI_SPEEDUP, at_most=False)
            )
    return targets


TABLE_COLUMNS = ["device", "flow", "op", "library", "ms", "samples_per_s", "ratio_to_floor"]
TARFLOW_COLUMNS = [
    "device",
    "method",
    "block_size",
    "ms",
    "samples_per_s",
    "speedup_vs_kv_cache",
    "max_abs_diff",
    "iterations",
]


def print_tables(records: Sequence[dict[str, Any]]) -> None:
    """Prints the coupling and TarFlow records as markdown tables."""
    rows = [{**r, "ms": 1e3 * r["seconds"]} for r in records]
    couplings = [r for r in rows if r["flow"] in KINDS]
    tarflow = [r for r in rows if r["flow"] == "tarflow"]
    print(markdown_table(couplings, TABLE_COLUMNS))
    if tarflow:
        print()
        print(markdown_table(tarflow, TARFLOW_COLUMNS))


def save_chart(path: Path, records: Sequence[dict[str, Any]]) -> bool:
    """Bar charts of time relative to the floor, and of the TarFlow inverses; False without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    devices = sorted({r["device"] for r in records})
    figure, axes = plt.subplots(len(devices), 2, figsize=(13, 5 * len(devices)), squeeze=False)
    for row, device in zip(axes, devices, strict=True):
        couplings = [r for r in records if r["device"] == device and r["flow"] in KINDS]
        couplings = [r for r in couplings if r["library"] != FLOOR]
        labels = [f"{r['flow']} {r['op']} · {r['library']}" for r in couplings]
        row[0].barh(labels, [r["ratio_to_floor"] for r in couplings], color="tab:blue")
        row[0].axvline(1.0, color="black", linewidth=1)
        row[0].invert_yaxis()
        row[0].set_xlabel("time / floor (4 conditioner MLPs alone); lower is better")
        row[0].set_title(f"coupling flows ({device})")
        tarflow = [r for r in records if r["device"] == device and r["flow"] == "tarflow"]
        labels = [
            r["method"] + ("" if r["block_size"] is None else f" (block {r['block_size']})")
            for r in tarflow
        ]
        row[1].barh(labels, [1e3 * r["seconds"] for r in tarflow], color="tab:orange")
        row[1].invert_yaxis()
        row[1].set_xlabel("ms per batch; lower is better")
        row[1].set_title(f"TarFlow inverse ({device})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------
# Entry point.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (CPU + CUDA if any)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--no-train", action="store_true", help="skip the training steps")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd flows")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, writes the JSON and the chart, prints the table and the verdicts."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Inputs to the softmax are not scaled down")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    settings = Settings(
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        repeats=args.repeats if args.repeats is not None else (2 if args.quick else 10),
        train=not args.no_train,
        compile=args.compile,
    )
    devices = resolve_devices(args.device)
    torch.manual_seed(0)

    records = []
    for device in devices:
        records += coupling_records(sizes, device, settings)
        records += tarflow_records(sizes, device, settings)
    targets = evaluate_targets(records)

    payload = {
        "benchmark": "blocks",
        "fingerprint": fingerprint(devices),
        "sizes": dataclasses.asdict(sizes),
        "settings": dataclasses.asdict(settings),
        "records": records,
        "targets": [target.as_dict() for target in targets],
    }
    path = write_json(args.out, payload)
    print_tables(records)
    print()
    for target in targets:
        print(target.line())
    chart = path.with_suffix(".png")
    print(f"\nwrote {path}" + (f" and {chart}" if save_chart(chart, records) else ""))
    return payload


if __name__ == "__main__":
    main()
