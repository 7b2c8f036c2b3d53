"""The CUDA benchmark suite: blocks, text-to-image sampling and training FLOP utilisation.

Usage:
    python benchmarks/cuda_suite.py --device cuda --out benchmarks/results/cuda_suite_h200.json
    python benchmarks/cuda_suite.py --device cuda --out FILE.json --compile   # + torch.compile
    python benchmarks/cuda_suite.py --device cpu --out benchmarks/results/cuda_suite_cpu.json
    python benchmarks/cuda_suite.py --out /tmp/smoke.json --quick             # tiny sizes, seconds

It runs on CUDA when there is a GPU (``--device auto``, the default) and on the CPU, at a
reduced size, otherwise. What is timed (median wall-clock, CUDA synchronised around calls):

* **blocks**: 4-layer affine, spline and convolutional (checkerboard) affine coupling flows,
  forward and inverse with log-det under ``torch.no_grad()``, each against its *floor* (its
  conditioner networks alone on the same input), in float32 and under bf16 autocast, eager,
  and with ``--compile`` also under ``torch.compile`` (the kinds of ``--compile-kinds``, in
  the device's working precision: bf16 on CUDA, float32 on the CPU; a compiled flow is
  compared with the compiled floor). The affine/spline flows and their floors are those of
  ``benchmarks/blocks.py``;
* **TarFlow**: the inverse of one 256-token ``tarflow`` block, token by token with a KV cache
  against block Jacobi, in both precisions (``benchmarks/blocks.py``'s measurement);
* **sampling**: images/s of a text-to-image preset's NTM stage at ``T = 4`` against its
  flow-matching stage with 50 Euler steps (the same predictor backbone; the NTM is
  :meth:`~trajflow_t2i.model.TextToImage.finetune` of the FM model). The weights are
  untrained: the cost of a sampler does not depend on what its weights have learned;
* **training**: one optimisation step of each stage (``fm`` pretraining, ``ntm`` finetuning)
  of the ``small`` and ``base`` presets as ``trajflow.train`` runs it (autocast in the
  recipe's precision, backward, clipping, AdamW, EMA): seconds, images/s and model FLOP
  utilisation. Model FLOPs of the forward and backward are counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; the
  optimizer's elementwise work is not counted), and MFU is the achieved FLOP/s over the peak
  FLOP/s of a large matmul measured in the same run (bf16 on CUDA, float32 on the CPU; its
  fastest call, measured before and after the training steps, the higher kept).

Targets (for a GPU; recorded with a note when measured on the CPU): Jacobi inverse ≥ 3×
faster than the KV cache for a 256-token TarFlow; compiled spline coupling ≤ 1.3× its
conditioner floor; training MFU ≥ 40 % for ``base``; and, from the text-to-image issue,
NTM sampling at ``T = 4`` ≥ 5× faster per image than FM at 50 steps.

Results go to ``--out`` (JSON with the hardware fingerprint, records and targets), markdown
tables on stdout, and a PNG chart with the same stem.

(Not ``benchmarks/cuda.py``: the scripts' folder is on the import path when they run, and a
``cuda.py`` there would shadow NVIDIA's ``cuda`` package, which ``import torch`` imports.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter

# Run as a script: benchmarks/ is not a package, so its shared helpers come from its folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import blocks
from _common import (
    Target,
    fingerprint,
    markdown_table,
    pyplot,
    resolve_devices,
    synchronize,
    timeit,
    timeit_interleaved,
    write_json,
)

from trajflow import BLOCKS, Sequential
from trajflow.testing import perturb_parameters
from trajflow.train import update_ema
from trajflow_t2i.data import make_split
from trajflow_t2i.model import TextToImage
from trajflow_t2i.presets import StageConfig, preset

PRECISIONS = ("float32", "bf16")
COUPLINGS = ("affine", "spline", "conv")
#: NTM sampling steps and FM Euler steps compared (the paper's few-step claim).
NTM_STEPS, FM_STEPS = 4, 50
#: The targets (for a GPU).
JACOBI_SPEEDUP, SPLINE_COMPILED_LIMIT, BASE_MFU, SAMPLING_SPEEDUP = 3.0, 1.3, 0.40, 5.0
CPU_NOTE = "measured on a CPU at a reduced size; the target is for a GPU"


@dataclasses.dataclass(frozen=True)
class Suite:
    """Problem sizes of one run.

    Attributes:
        blocks: Sizes of the affine/spline flows and the TarFlow block (``blocks.Sizes``).
        conv_batch: Images per call of the convolutional coupling flow.
        conv_channels: Their channels (e.g. a squeezed RGB image: 12).
        conv_side: Their side.
        conv_hidden: Hidden channels of every conditioner CNN.
        sample_presets: Text-to-image presets whose sampling is timed.
        sample_batch: Prompts (images) per sampling call.
        train_presets: Presets whose training step is timed.
        train_batch: Images per training step; None for the preset's own batch size.
        peak_size: Side of the square matmul that measures the device's peak FLOP/s.
    """

    blocks: blocks.Sizes
    conv_batch: int
    conv_channels: int
    conv_side: int
    conv_hidden: int
    sample_presets: tuple[str, ...]
    sample_batch: int
    train_presets: tuple[str, ...]
    train_batch: int | None
    peak_size: int


CUDA = Suite(
    blocks=blocks.Sizes(
        batch=65536,
        features=64,
        hidden=(256, 256),
        tar_batch=64,
        tar_tokens=256,
        tar_features=12,
        tar_dim=256,
        tar_layers=4,
        tar_heads=8,
        jacobi_blocks=(16, 64, 256),
    ),
    conv_batch=256,
    conv_channels=12,
    conv_side=32,
    conv_hidden=128,
    sample_presets=("small", "base"),
    sample_batch=64,
    train_presets=("small", "base"),
    train_batch=None,
    peak_size=8192,
)
CPU = Suite(
    blocks=blocks.Sizes(
        batch=4096,
        features=64,
        hidden=(256, 256),
        tar_batch=4,
        tar_tokens=256,
        tar_features=12,
        tar_dim=64,
        tar_layers=2,
        tar_heads=4,
        jacobi_blocks=(16, 64, 256),
    ),
    conv_batch=16,
    conv_channels=12,
    conv_side=16,
    conv_hidden=64,
    sample_presets=("small",),
    sample_batch=8,
    train_presets=("small", "base"),
    train_batch=2,
    peak_size=2048,
)
QUICK = Suite(
    blocks=dataclasses.replace(blocks.QUICK, jacobi_blocks=(4, 16)),
    conv_batch=2,
    conv_channels=4,
    conv_side=4,
    conv_hidden=4,
    sample_presets=("tiny",),
    sample_batch=2,
    train_presets=("tiny",),
    train_batch=2,
    peak_size=128,
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to measure.

    Attributes:
        warmup: Untimed calls first (one more for compiled code, which compiles on its first).
        repeats: Timed rounds of the blocks and the sampling.
        train_repeats: Timed training steps per preset and stage (they are the slow part).
        compile: Also time compiled coupling flows.
        compile_kinds: Which coupling kinds to compile.
    """

    warmup: int = 2
    repeats: int = 10
    train_repeats: int = 5
    compile: bool = False
    compile_kinds: tuple[str, ...] = ("spline",)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision == "bf16"``; nothing for float32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def working_precision(device: torch.device) -> str:
    """The precision of training (and of compiled blocks) here: bf16 on CUDA, float32 on CPU.

    ``trajflow_t2i``'s recipe autocasts to bf16 on CUDA only; on CPUs without bf16 matmul
    units it would be slower, not faster.
    """
    return "bf16" if device.type == "cuda" else "float32"


def recipe_precision(model: TextToImage, device: torch.device) -> str:
    """The precision ``trajflow_t2i`` trains ``model`` in: bf16 on CUDA if its config says so."""
    return working_precision(device) if model.config.train.bf16 else "float32"


# ---------------------------------------------------------------------------------------------
# Blocks: couplings against their floors, and the TarFlow inverses.


def build_conv(suite: Suite) -> Sequential:
    """4 checkerboard ``conv_affine_coupling`` layers, alternating parity, off the identity."""
    flow = Sequential(
        *(
            BLOCKS.build(
                "conv_affine_coupling",
                channels=suite.conv_channels,
                mask="checkerboard",
                parity=i % 2 == 1,
                hidden_channels=suite.conv_hidden,
            )
            for i in range(suite.blocks.layers)
        )
    )
    return perturb_parameters(flow, scale=0.05, seed=0)


def conv_floor(flow: Sequential) -> blocks.Contender:
    """The conditioner CNNs of ``flow`` alone, each on the whole input (no masking)."""
    conditioners = nn.ModuleList(block.conditioner for block in flow)

    def run(x: Tensor) -> list[Tensor]:
        return [cnn(x) for cnn in conditioners]

    return blocks.Contender(blocks.FLOOR, "conv", run, None, None)


def coupling_setup(
    kind: str, suite: Suite, device: torch.device
) -> tuple[Sequential, blocks.Contender, Tensor]:
    """The flow of ``kind``, its floor and an input batch, on ``device``."""
    generator = torch.Generator().manual_seed(0)
    if kind == "conv":
        flow = build_conv(suite).to(device)
        side = suite.conv_side
        shape: tuple[int, ...] = (suite.conv_batch, suite.conv_channels, side, side)
        floor = conv_floor(flow)
    else:
        flow = blocks.build_trajflow(kind, suite.blocks).to(device)
        shape = (suite.blocks.batch, suite.blocks.features)
        floor = blocks.floor_contender(flow)
    return flow, floor, torch.randn(shape, generator=generator).to(device)


def compiled(contender: blocks.Contender) -> blocks.Contender:
    """``contender`` with its forward and inverse under ``torch.compile``."""
    inverse = None if contender.inverse is None else torch.compile(contender.inverse)
    return dataclasses.replace(
        contender,
        library=contender.library + "+compile",
        forward=torch.compile(contender.forward),
        inverse=inverse,
        train=None,
    )


def coupling_records(
    suite: Suite, device: torch.device, settings: Settings
) -> list[dict[str, Any]]:
    """Forward and inverse of each coupling kind and its floor, per precision and mode.

    The calls of one kind and precision are interleaved in every repeat, so each ratio to the
    floor is measured under the same load. A compiled flow is compared with the compiled
    floor, an eager one with the eager floor.
    """
    records = []
    for kind in COUPLINGS:
        flow, floor, x = coupling_setup(kind, suite, device)
        ours = blocks.Contender("trajflow", kind, flow, flow.inverse, None)
        for precision in PRECISIONS:
            pairs = [(floor, ours)]
            if (
                settings.compile
                and kind in settings.compile_kinds
                and precision == working_precision(device)
            ):
                torch._dynamo.reset()  # a fresh cache: no recompile limit from earlier kinds
                pairs.append((compiled(floor), compiled(ours)))
            calls = []
            for mode, pair in zip(("eager", "compile"), pairs, strict=False):
                for contender in pair:
                    for op, fn in blocks.operations(contender, x, train=False).items():
                        calls.append((mode, contender.library, op, _under(device, precision, fn)))
            warmup = settings.warmup + (len(pairs) > 1)
            seconds = timeit_interleaved([c[3] for c in calls], warmup, settings.repeats)
            floors = {
                mode: value
                for (mode, library, _, _), value in zip(calls, seconds, strict=True)
                if library.startswith(blocks.FLOOR)
            }
            for (mode, library, op, _), value in zip(calls, seconds, strict=True):
                records.append(
                    {
                        "section": "blocks",
                        "block": kind,
                        "library": library.removesuffix("+compile"),
                        "op": op,
                        "mode": mode,
                        "precision": precision,
                        "device": str(device),
                        "batch": x.shape[0],
                        "seconds": value,
                        "samples_per_s": x.shape[0] / value,
                        "ratio_to_floor": value / floors[mode],
                    }
                )
    return records


def _under(device: torch.device, precision: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        with autocast(device, precision):
            return fn()

    return call


def tarflow_records(suite: Suite, device: torch.device, settings: Settings) -> list[dict]:
    """``blocks.py``'s TarFlow inverses (KV cache vs Jacobi), in each precision."""
    records = []
    timing = blocks.Settings(warmup=settings.warmup, repeats=settings.repeats, train=False)
    for precision in PRECISIONS:
        with autocast(device, precision):
            found = blocks.tarflow_records(suite.blocks, device, timing)
        for record in found:
            records.append(
                {
                    "section": "tarflow",
                    "precision": precision,
                    "tokens": suite.blocks.tar_tokens,
                    "dim": suite.blocks.tar_dim,
                    **record,
                }
            )
    return records


# ---------------------------------------------------------------------------------------------
# Text-to-image: sampling, and training steps with their FLOP utilisation.


def prompts_of(name: str, count: int) -> list[str]:
    """``count`` captions of the preset's held-out test split."""
    config = preset(name)
    split = make_split(config.data.name, "test", n=count, seed=1, size=config.data.image_size)
    return list(split.captions)


def build_pair(name: str, device: torch.device) -> tuple[TextToImage, TextToImage]:
    """A preset's FM stage and the NTM finetuned from it (untrained weights), on ``device``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fm = TextToImage(preset(name), stage="fm")
        ntm = TextToImage.finetune(fm)
    return fm.to(device).eval(), ntm.to(device).eval()


def sampling_records(suite: Suite, device: torch.device, settings: Settings) -> list[dict]:
    """Images/s of NTM at ``T = 4`` and of FM with 50 Euler steps, interleaved, per preset."""
    precision = working_precision(device)
    records = []
    for name in suite.sample_presets:
        fm, ntm = build_pair(name, device)
        prompts = prompts_of(name, suite.sample_batch)

        def run(model: TextToImage, steps: int, prompts: list[str]) -> Callable[[], Tensor]:
            def call() -> Tensor:
                with autocast(device, precision):
                    generator = torch.Generator().manual_seed(0)
                    return model.generate(prompts, steps=steps, generator=generator)

            return call

        # FM at 50 steps costs about 12x the NTM: fewer rounds keep the suite short.
        repeats = max(1, min(settings.repeats, 3))
        seconds = timeit_interleaved(
            [run(ntm, NTM_STEPS, prompts), run(fm, FM_STEPS, prompts)],
            min(settings.warmup, 1),
            repeats,
        )
        for (sampler, steps, model), value in zip(
            [("ntm", NTM_STEPS, ntm), ("fm_euler", FM_STEPS, fm)], seconds, strict=True
        ):
            records.append(
                {
                    "section": "sampling",
                    "preset": name,
                    "sampler": sampler,
                    "steps": steps,
                    "precision": precision,
                    "device": str(device),
                    "batch": len(prompts),
                    "parameters": model.parameter_count()["total"],
                    "seconds": value,
                    "images_per_s": len(prompts) / value,
                    "ms_per_image": 1e3 * value / len(prompts),
                    "speedup_vs_fm": seconds[1] / value,
                }
            )
    return records


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad, query, key, value)


#: The CPU's fused attention kernels, which ``FlopCounterMode`` does not know by default
#: (it counts the CUDA ones): same formulas, so attention is counted on every device.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` (matmuls, convolutions, attention; forward and
    backward), counted by ``torch.utils.flop_counter.FlopCounterMode``.

    A multiply-add counts 2. Causal attention is counted as full attention, as the counter
    does (and most MFU reports).

    Example:
        >>> count_flops(lambda: torch.ones(2, 3) @ torch.ones(3, 4))
        48
    """
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()


def peak_flops(device: torch.device, size: int, precision: str, settings: Settings) -> float:
    """Measured FLOP/s of a ``size × size`` matmul in ``precision``: the MFU denominator.

    A peak is the best the device does, so this is the fastest of the timed calls, not the
    median: other load can only slow a call down, and a lower peak would flatter the MFU.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    timeit(lambda: a @ b, warmup=max(0, settings.warmup - 1), repeats=1)
    seconds = min(timeit(lambda: a @ b, warmup=0, repeats=1) for _ in range(settings.repeats))
    return 2 * size**3 / seconds


def add_mfu(records: list[dict[str, Any]], peak: float) -> None:
    """Adds the achieved FLOP/s, the peak and their ratio (MFU) to every training record."""
    for record in records:
        if record["section"] == "training":
            achieved = record["flops_per_step"] / record["seconds"]
            record.update(achieved_flops_per_s=achieved, peak_flops_per_s=peak, mfu=achieved / peak)


def training_step(
    model: TextToImage, stage: StageConfig, batch: tuple[Tensor, ...]
) -> tuple[Callable[[], None], Callable[[], int | None]]:
    """One optimisation step as ``trajflow.train`` runs it, and its forward+backward alone
    (which returns the NTM's drawn ``T``, None for flow matching).

    The loss draws from a generator seeded the same way at every call, so every step does
    the same work (the same ``T`` and times), which the FLOP count then describes exactly.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=stage.lr, betas=(0.9, 0.95), weight_decay=stage.weight_decay
    )
    ema = None if stage.ema_decay is None else copy.deepcopy(model).requires_grad_(False)
    device = batch[1].device
    precision = recipe_precision(model, device)

    def forward_backward() -> int | None:
        generator = torch.Generator().manual_seed(0)
        with autocast(device, precision):
            result = model.loss(*batch, generator=generator)
        result.loss.float().backward()
        return getattr(result, "steps", None)  # the NTM's T drawn for the batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        if stage.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, stage.grad_clip)
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, stage.ema_decay)

    return step, forward_backward


def _keep_result(results: list, fn: Callable[[], object]) -> None:
    results.append(fn())


def training_records(suite: Suite, device: torch.device, settings: Settings) -> list[dict]:
    """Step time, images/s and FLOPs of both stages of each training preset (see add_mfu)."""
    records = []
    for name in suite.train_presets:
        config = preset(name)
        fm, ntm = build_pair(name, device)
        for stage, model, stage_config in (
            ("fm", fm, config.train.fm),
            ("ntm", ntm, config.train.ntm),
        ):
            batch_size = suite.train_batch or stage_config.batch_size
            data = config.data
            split = make_split(data.name, "train", n=batch_size, seed=0, size=data.image_size)
            ids, mask = model.text_encoder.tokenize(split.captions)
            batch = (split.images.to(device), ids.to(device), mask.to(device))
            model.train()
            step, forward_backward = training_step(model, stage_config, batch)
            drawn: list[int | None] = []
            flops = count_flops(functools.partial(_keep_result, drawn, forward_backward))
            model.zero_grad(set_to_none=True)
            seconds = timeit(
                step, warmup=max(1, min(settings.warmup, 2)), repeats=settings.train_repeats
            )
            records.append(
                {
                    "section": "training",
                    "preset": name,
                    "stage": stage,
                    "precision": recipe_precision(model, device),
                    "device": str(device),
                    "batch": batch_size,
                    "preset_batch": stage_config.batch_size,
                    "parameters": model.parameter_count()["total"],
                    "levels": drawn[0],
                    "flops_per_step": flops,
                    "seconds": seconds,
                    "images_per_s": batch_size / seconds,
                }
            )
            del step, forward_backward
        del fm, ntm
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next preset starts from free memory
    return records


# ---------------------------------------------------------------------------------------------
# Targets, tables, chart.


def evaluate_targets(records: Sequence[dict[str, Any]], device: torch.device) -> list[Target]:
    """The suite's targets, each with a note when the device is not a GPU."""
    on_cpu = device.type != "cuda"
    note = CPU_NOTE if on_cpu else None
    targets = []
    jacobi = [
        r
        for r in records
        if r["section"] == "tarflow" and r["method"] == "jacobi" and r["precision"] == "float32"
    ]
    if jacobi:
        best = max(jacobi, key=lambda r: r["speedup_vs_kv_cache"])
        name = (
            f"tarflow Jacobi (best block: {best['block_size']}) speedup vs KV cache, "
            f"{best['tokens']} tokens, float32 ({device.type})"
        )
        targets.append(
            Target(name, best["speedup_vs_kv_cache"], JACOBI_SPEEDUP, at_most=False, note=note)
        )
    splines = [
        r
        for r in records
        if r["section"] == "blocks" and r["block"] == "spline" and r["library"] == "trajflow"
    ]
    mode = "compile" if any(r["mode"] == "compile" for r in splines) else "eager"
    precision = working_precision(device) if mode == "compile" else "float32"
    for record in splines:
        if record["mode"] == mode and record["precision"] == precision:
            name = f"{mode} spline {record['op']} time / floor, {precision} ({device.type})"
            notes = [n for n in (note,) if n]
            if mode == "eager":
                notes.append("eager: the target is for compiled code, run with --compile")
            targets.append(
                Target(
                    name,
                    record["ratio_to_floor"],
                    SPLINE_COMPILED_LIMIT,
                    note="; ".join(notes) or None,
                )
            )
    for record in records:
        if record["section"] == "training" and record["preset"] == "base":
            name = (
                f"training MFU, base {record['stage']} stage, {record['precision']} ({device.type})"
            )
            targets.append(Target(name, record["mfu"], BASE_MFU, at_most=False, note=note))
        if record["section"] == "sampling" and record["sampler"] == "ntm":
            name = (
                f"sampling speedup per image, {record['preset']} NTM T={NTM_STEPS} vs FM "
                f"{FM_STEPS} Euler steps ({device.type})"
            )
            targets.append(
                Target(name, record["speedup_vs_fm"], SAMPLING_SPEEDUP, at_most=False, note=note)
            )
    return targets


# fmt: off
BLOCK_COLUMNS = ["block", "op", "library", "mode", "precision", "ms", "samples_per_s",
                 "ratio_to_floor"]
TARFLOW_COLUMNS = ["precision", "tokens", "method", "block_size", "ms", "speedup_vs_kv_cache",
                   "max_abs_diff", "iterations"]
SAMPLING_COLUMNS = ["preset", "sampler", "steps", "precision", "batch", "ms_per_image",
                    "images_per_s", "speedup_vs_fm"]
TRAINING_COLUMNS = ["preset", "stage", "levels", "precision", "batch", "ms", "images_per_s",
                    "gflops_per_step", "achieved_tflops", "mfu"]
# fmt: on


def tables(records: Sequence[dict[str, Any]]) -> str:
    """The records as markdown tables, one per section."""
    rows = []
    for r in records:
        row = {**r, "ms": 1e3 * r["seconds"]}
        if r["section"] == "training":
            row["gflops_per_step"] = r["flops_per_step"] / 1e9
            row["achieved_tflops"] = r["achieved_flops_per_s"] / 1e12
        rows.append(row)
    parts = []
    for section, columns in (
        ("blocks", BLOCK_COLUMNS),
        ("tarflow", TARFLOW_COLUMNS),
        ("sampling", SAMPLING_COLUMNS),
        ("training", TRAINING_COLUMNS),
    ):
        chosen = [r for r in rows if r["section"] == section]
        if chosen:
            parts.append(markdown_table(chosen, columns))
    return "\n\n".join(parts)


def save_chart(path: Path, records: Sequence[dict[str, Any]], device: torch.device) -> bool:
    """Four panels: blocks against their floor, TarFlow inverses, sampling, training MFU.

    Returns False without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
    ours = [r for r in records if r["section"] == "blocks" and r["library"] == "trajflow"]
    labels = [f"{r['block']} {r['op']} · {r['mode']} · {r['precision']}" for r in ours]
    axes[0, 0].barh(labels, [r["ratio_to_floor"] for r in ours], color="tab:blue")
    axes[0, 0].axvline(1.0, color="black", linewidth=1)
    axes[0, 0].axvline(SPLINE_COMPILED_LIMIT, color="tab:red", linestyle="--", linewidth=1)
    axes[0, 0].invert_yaxis()
    axes[0, 0].set(xlabel="time / floor (conditioners alone); lower is better", title="blocks")
    tarflow = [r for r in records if r["section"] == "tarflow"]
    labels = [
        f"{r['method']}" + ("" if r["block_size"] is None else f" ({r['block_size']})")
        + f" · {r['precision']}"
        for r in tarflow
    ]  # fmt: skip
    axes[0, 1].barh(labels, [1e3 * r["seconds"] for r in tarflow], color="tab:orange")
    axes[0, 1].invert_yaxis()
    tokens = tarflow[0]["tokens"] if tarflow else "?"
    axes[0, 1].set(
        xlabel="ms per batch; lower is better", title=f"TarFlow inverse, {tokens} tokens"
    )
    sampling = [r for r in records if r["section"] == "sampling"]
    labels = [f"{r['preset']} {r['sampler']} ({r['steps']} steps)" for r in sampling]
    axes[1, 0].barh(labels, [r["images_per_s"] for r in sampling], color="tab:green")
    axes[1, 0].invert_yaxis()
    axes[1, 0].set(xlabel="images/s; higher is better (untrained weights)", title="sampling")
    training = [r for r in records if r["section"] == "training"]
    labels = [f"{r['preset']} {r['stage']} (batch {r['batch']})" for r in training]
    axes[1, 1].barh(labels, [100 * r["mfu"] for r in training], color="tab:purple")
    axes[1, 1].axvline(100 * BASE_MFU, color="tab:red", linestyle="--", linewidth=1)
    axes[1, 1].invert_yaxis()
    axes[1, 1].set(xlabel="model FLOP utilisation, %", title="training step")
    figure.suptitle(f"trajflow CUDA suite on {device.type}")
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
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cuda", "cpu"),
        help="cuda, cpu, or auto (default): CUDA when available, else the CPU",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd flows")
    parser.add_argument(
        "--compile-kinds",
        nargs="+",
        choices=COUPLINGS,
        default=["spline"],
        help="coupling kinds to compile with --compile (default: spline, the target's)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default 10 on CUDA, 5 on CPU)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2)")
    parser.add_argument("--train-repeats", type=int, default=None, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    for name in ("repeats", "train_repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.out.exists() and args.out.is_dir():
        parser.error(f"--out must be a JSON file path, got the folder {args.out}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the suite, writes the JSON and the chart, prints the tables and the verdicts."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Inputs to the softmax are not scaled down")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    choice = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    (device,) = resolve_devices("cpu" if choice == "auto" else choice)
    suite = QUICK if args.quick else CUDA if device.type == "cuda" else CPU
    quick = args.quick
    settings = Settings(
        warmup=args.warmup if args.warmup is not None else (0 if quick else 2),
        # Fewer rounds on a CPU, where each call takes longer and the suite should stay short.
        repeats=args.repeats or (1 if quick else 10 if device.type == "cuda" else 5),
        train_repeats=args.train_repeats or (1 if quick else 5 if device.type == "cuda" else 2),
        compile=args.compile,
        compile_kinds=tuple(args.compile_kinds),
    )
    torch.manual_seed(0)
    log = functools.partial(print, flush=True)
    began = time.perf_counter()

    log(f"device: {device} ({'quick' if quick else 'full'} sizes)")
    records = coupling_records(suite, device, settings)
    log("blocks: done")
    records += tarflow_records(suite, device, settings)
    log("tarflow: done")
    records += sampling_records(suite, device, settings)
    log("sampling: done")
    # The peak is measured before and after the training steps and the higher one kept: a
    # machine whose load changed during the run cannot then flatter the MFU.
    precision = working_precision(device)
    peaks = [peak_flops(device, suite.peak_size, precision, settings)]
    records += training_records(suite, device, settings)
    peaks.append(peak_flops(device, suite.peak_size, precision, settings))
    peak = max(peaks)
    add_mfu(records, peak)
    log(f"training: done; peak {precision} matmul ({suite.peak_size}²): {peak / 1e12:.4g} TFLOP/s")
    synchronize()
    targets = evaluate_targets(records, device)

    payload = {
        "benchmark": "cuda_suite",
        "device": str(device),
        "quick": quick,
        "fingerprint": fingerprint([device]),
        "sizes": dataclasses.asdict(suite),
        "settings": dataclasses.asdict(settings),
        "peak": {
            "precision": precision,
            "matmul_size": suite.peak_size,
            "flops_per_s": peak,
            "measurements": peaks,
        },
        "wall_seconds": time.perf_counter() - began,
        "weights": "untrained (timing only: the cost of a step does not depend on the weights)",
        "records": records,
        "targets": [target.as_dict() for target in targets],
    }
    path = write_json(args.out, payload)
    log(tables(records))
    log()
    for target in targets:
        log(target.line())
    chart = path.with_suffix(".png")
    log(f"\nwrote {path}" + (f" and {chart}" if save_chart(chart, records, device) else ""))
    return payload


if __name__ == "__main__":
    main()
