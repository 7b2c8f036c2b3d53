"""A mutation check of the numerics: small deliberate bugs, one at a time, against the tests.

Each mutant replaces one exact snippet of a core module (the replacement must match once),
runs the tests that should catch it, and restores the file. A mutant *survives* when those
tests still pass: either the tests miss a real bug or the mutant is equivalent; review every
survivor. Outside CI (it runs the chosen tests once per mutant, a few minutes):

    python benchmarks/mutants.py               # all mutants
    python benchmarks/mutants.py --only ema    # those whose name contains "ema"

The list holds the mutants a review of the core found surviving once (AdamW weight decay, the
EMA on skipped steps, prompt dropout, the Jacobi dispatch and threshold, the δ head's ``t_in``)
and classic numerics slips (signs, dropped terms). Add one whenever a bug slips through.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One deliberate bug: in ``path``, ``before`` becomes ``after``; ``tests`` should fail."""

    name: str
    path: str
    before: str
    after: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "adamw weight decay forced to 0",
        "trajflow/train.py",
        "weight_decay=config.weight_decay",
        "weight_decay=0.0",
        ("tests/test_train.py",),
    ),
    Mutant(
        "gradient clipping removed",
        "trajflow/distributed.py",
        "norm = nn.utils.clip_grad_norm_(parameters, clip)",
        "norm = nn.utils.clip_grad_norm_(parameters, float('inf'))",
        ("tests/test_train.py",),
    ),
    Mutant(
        "ema lerp towards the wrong end",
        "trajflow/train.py",
        "average.lerp_(parameter.detach(), 1 - decay)",
        "average.lerp_(parameter.detach(), decay)",
        ("tests/test_train.py",),
    ),
    Mutant(
        "prompt dropout inverted in NTM",
        "trajflow/ntm.py",
        "drop = (torch.rand(batch, generator=generator) < self.cfg_dropout)",
        "drop = (torch.rand(batch, generator=generator) >= self.cfg_dropout)",
        ("tests/test_ntm.py",),
    ),
    Mutant(
        "prompt dropout inverted in FM",
        "trajflow/flow_matching.py",
        "drop = (torch.rand(batch, generator=generator) < self.cfg_dropout)",
        "drop = (torch.rand(batch, generator=generator) >= self.cfg_dropout)",
        ("tests/test_flow_matching.py",),
    ),
    Mutant(
        "pairwise estimate without the factor T",
        "trajflow/ntm.py",
        "return top + steps * term, aux",
        "return top + term, aux",
        ("tests/test_ntm.py",),
    ),
    Mutant(
        "posterior log-std without δ",
        "trajflow/ntm.py",
        "0.5 * torch.log(c2) + delta",
        "0.5 * torch.log(c2) + 0 * delta",
        ("tests/test_ntm.py",),
    ),
    Mutant(
        "x0 regression target not detached",
        "trajflow/ntm.py",
        "((u_out.detach() - mean) / b)",
        "((u_out - mean) / b)",
        ("tests/test_ntm_x0_mse.py",),
    ),
    Mutant(
        "x0 regression error not scaled by 1/B",
        "trajflow/ntm.py",
        "((u_out.detach() - mean) / b)",
        "((u_out.detach() - mean) / 1)",
        ("tests/test_ntm_x0_mse.py",),
    ),
    Mutant(
        "tarflow log-det sign",
        "trajflow/blocks/tarflow.py",
        "logdet = -log_scale.sum(dim=(1, 2))",
        "logdet = log_scale.sum(dim=(1, 2))",
        ("tests/blocks/test_properties.py", "tests/blocks/test_tarflow.py"),
    ),
    Mutant(
        "jacobi dispatch ignored",
        "trajflow/blocks/tarflow.py",
        'if self.inverse_method == "jacobi":',
        'if self.inverse_method == "never":',
        ("tests/blocks/test_tarflow.py",),
    ),
    Mutant(
        "jacobi threshold 30x too loose",
        "trajflow/blocks/tarflow.py",
        "converged = (change < tol)",
        "converged = (change < 30 * tol)",
        ("tests/blocks/test_tarflow.py",),
    ),
    Mutant(
        "jacobi ignores how far the window's first token moved (the old rule)",
        "trajflow/blocks/tarflow.py",
        "converged = (change < tol).int().cummin(dim=0).values",
        "converged = torch.cat([change[:1] * 0, change[1:]]).lt(tol).int().cummin(dim=0).values",
        ("tests/blocks/test_tarflow.py",),
    ),
    # Reviewed survivor, left out: counting every token that moved less than tol rather than
    # the leading run, ``(change < tol).int()``. In these blocks a token's change grows along
    # the window, so both counts agree and no test tells them apart.
    Mutant(
        "mlp δ head without t_in",
        "trajflow/predictors.py",
        "delta = self.delta_head(torch.cat([h, time.to(h.dtype), target_time.to(h.dtype)]",
        "delta = self.delta_head(torch.cat([h, 0 * time.to(h.dtype), target_time.to(h.dtype)]",
        ("tests/test_predictors.py",),
    ),
)


def run(mutant: Mutant, python: str) -> dict:
    """Applies ``mutant``, runs its tests, restores the file; returns the outcome."""
    path = ROOT / mutant.path
    original = path.read_text()
    if original.count(mutant.before) != 1:
        return {"name": mutant.name, "outcome": "stale: snippet not found exactly once"}
    began = time.perf_counter()
    try:
        path.write_text(original.replace(mutant.before, mutant.after))
        done = subprocess.run(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=1800,
        )
    finally:
        path.write_text(original)
    outcome = "killed" if done.returncode != 0 else "SURVIVED"
    return {"name": mutant.name, "outcome": outcome, "seconds": round(time.perf_counter() - began)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--out", help="also write the outcomes as JSON")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if not chosen:
        parser.error(f"no mutant name contains {args.only!r}")
    results = []
    for mutant in chosen:
        result = run(mutant, sys.executable)
        results.append(result)
        print(f"{result['outcome']:9} {mutant.name}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    survivors = [r for r in results if r["outcome"] != "killed"]
    print(f"{len(results) - len(survivors)} of {len(results)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
