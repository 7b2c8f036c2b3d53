"""Finetuning an NTM from a pretrained flow-matching model (the paper's §3.3 recipe).

:meth:`FlowMatchingFinetuning.from_flow_matching` starts an :class:`~trajflow.ntm.NTM` as the
flow-matching model's Gaussian ancestral sampler: the predictor is a trainable copy of the
velocity network, ``δ = 0`` and the transporter is the identity. A frozen copy of the network,
the *teacher*, gives the auxiliary mean-alignment loss ``‖μ_P - μ_FM‖²`` whose weight λ decays
by a cosine. :class:`~trajflow.ntm.NTM` inherits these methods; they use its ``transport``,
``gaussian`` and ``predictor``.

Example:
    >>> import torch
    >>> from trajflow import NTM, PREDICTORS, Sequential
    >>> from trajflow.flow_matching import FlowMatching
    >>> fm = FlowMatching(PREDICTORS.build("mlp", features=2, hidden_features=[16],
    ...                                    target="velocity"))
    >>> transporter = Sequential.from_specs([
    ...     {"name": "affine_coupling", "kwargs": {"features": 2, "time_features": 8}},
    ... ])
    >>> model = NTM.from_flow_matching(fm, transporter, aux_steps=10, mode="pairwise")
    >>> model.teacher is not None, "teacher" in "".join(model.state_dict())
    (True, False)
    >>> model.aux_weight_at(0), model.aux_weight_at(10)
    (2.5, 0.0)
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trajflow.checks import check_count, check_number
from trajflow.core import Block
from trajflow.predictors import Predictor
from trajflow.schedules import ScheduleConfig, posterior_mean_from_velocity

if TYPE_CHECKING:
    from trajflow.ntm import NTM

__all__ = ["FlowMatchingFinetuning"]


class FlowMatchingFinetuning:
    """The teacher, the auxiliary loss and :meth:`from_flow_matching` of an NTM.

    A mixin of :class:`~trajflow.ntm.NTM` (listed before ``nn.Module``): it keeps the teacher
    out of the module tree and implements the auxiliary loss with the host's ``transport``,
    ``gaussian`` and ``predictor``.
    """

    # ----------------------------------------------------------------- the teacher
    # The frozen FM network of a finetuned model is deliberately *not* a submodule: it must
    # stay out of state_dict (checkpoints), parameters() (optimizer, EMA updates) and
    # train()/eval() switching. It follows the model across .to()/.double() through _apply,
    # and copies of the model (the EMA is a deepcopy) share it rather than duplicate it.
    @property
    def teacher(self) -> Predictor | None:
        """The frozen flow-matching network of the auxiliary loss (``None`` if there is none);
        always in eval mode and without gradients, never in ``state_dict``."""
        return self.__dict__.get("_teacher")

    @teacher.setter
    def teacher(self, value: Predictor | None) -> None:
        if value is not None:
            if not isinstance(value, Predictor):
                raise TypeError(f"NTM expected a Predictor teacher, got {type(value).__name__}")
            value.requires_grad_(False).eval()
        self.__dict__["_teacher"] = value

    def __setattr__(self, name: str, value) -> None:
        if name == "teacher":  # nn.Module would register a Module value as a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def __deepcopy__(self, memo: dict) -> NTM:
        if self.teacher is not None:
            memo.setdefault(id(self.teacher), self.teacher)  # shared, not copied
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied

    # ----------------------------------------------------------------- flow-matching init
    @classmethod
    def from_flow_matching(
        cls,
        fm: nn.Module,
        transporter: Block | None = None,
        schedule: ScheduleConfig | None = None,
        no_delta_mean: bool = False,
        aux_weight: float = 2.5,
        aux_steps: int = 1000,
        **kwargs,
    ) -> NTM:
        """Initialises an NTM from a trained :class:`~trajflow.flow_matching.FlowMatching` (§6).

        The predictor is a copy of the velocity network (``x̂_0 = u_t - t v``, ``μ = μ_post``),
        ``δ`` starts at zero and the transporter should start as the identity, so at step 0
        the NTM *is* the FM model's Gaussian ancestral sampler. A frozen copy of the FM network
        (the :attr:`teacher`, kept out of ``state_dict`` and of the EMA) gives the
        mean-alignment loss ``‖μ_P - μ_FM‖²`` with weight ``aux_weight`` cosine-decayed to 0
        over ``aux_steps``.

        To checkpoint the finetuned model, save it with the config of
        :meth:`trajflow.config.ModelConfig.finetuned_from`: loading rebuilds it without the
        teacher (so without the auxiliary loss) but with the same trainable parameters.

        Args:
            fm: The flow-matching model (its ``net`` must have ``target="velocity"``).
            transporter: Identity-initialised transporter (``None``: identity).
            schedule: Trajectory schedule (default: the FM model's).
            no_delta_mean: Keep ``μ_P = μ_post`` exactly: only ``δ`` and the transporter learn.
            aux_weight: λ at step 0. aux_steps: Steps of the cosine decay.
            **kwargs: More :class:`NTM` arguments (``mode``, ``cfg_dropout``, ...).
        """
        net = getattr(fm, "net", None)
        if not isinstance(net, Predictor):
            raise TypeError(
                f"from_flow_matching expected a FlowMatching model (with a Predictor .net), "
                f"got {type(fm).__name__}"
            )
        if net.target != "velocity":
            raise ValueError("from_flow_matching expects a velocity network (target='velocity')")
        schedule = fm.schedule if schedule is None else schedule
        # The predictor is a trainable copy even of a frozen model: an EMA copy (what one
        # usually finetunes from) has requires_grad off, and a predictor copied with it would
        # silently not train.
        predictor = copy.deepcopy(net).requires_grad_(True)
        model = cls(transporter, predictor, schedule, **kwargs)
        teacher = copy.deepcopy(net).requires_grad_(False)
        model.prepare_finetuning(no_delta_mean, aux_weight, aux_steps, teacher=teacher)
        return model

    def prepare_finetuning(
        self,
        no_delta_mean: bool = False,
        aux_weight: float = 2.5,
        aux_steps: int = 1000,
        teacher: Predictor | None = None,
    ) -> None:
        """Makes this (velocity-predictor) NTM a model finetuned from flow matching.

        :meth:`from_flow_matching` calls it with the teacher; rebuilding a finetuned model
        from its :class:`~trajflow.config.ModelConfig` calls it without one, which freezes
        the same parameters (so an optimizer state saved with the model still fits) and
        leaves the auxiliary loss off. To resume with the auxiliary loss, rebuild the model
        with :meth:`from_flow_matching` and load the checkpoint into it.

        Args:
            no_delta_mean: Train only the ``δ`` head of the predictor (and the transporter).
            aux_weight: λ at step 0 (needs a teacher to take effect).
            aux_steps: Steps of the cosine decay of λ.
            teacher: The frozen flow-matching network, or ``None``.
        """
        if self.predictor.target != "velocity":
            raise ValueError(
                "a finetuned NTM needs a velocity predictor (target='velocity'), got "
                f"target={self.predictor.target!r}"
            )
        self.aux_weight = check_number("NTM", "aux_weight", aux_weight, low=0.0)
        self.aux_steps = check_count("NTM", "aux_steps", aux_steps, minimum=0)
        self.no_delta_mean = bool(no_delta_mean)
        if no_delta_mean:
            for name, parameter in self.predictor.named_parameters():
                parameter.requires_grad_(name.startswith("delta_head"))
        self.teacher = teacher

    def aux_weight_at(self, step: int) -> float:
        """λ cosine-decayed from ``aux_weight`` at step 0 to 0 at ``aux_steps``."""
        if self.aux_steps <= 0:
            return self.aux_weight
        progress = min(step / self.aux_steps, 1.0)
        return self.aux_weight * 0.5 * (1 + math.cos(math.pi * progress))

    def _alignment_loss(self, trajectory, times, steps, y, y_mask, drop) -> Tensor:
        """``‖μ_P - μ_FM‖²`` per dimension, ``μ_FM`` from the frozen FM network in x-space."""
        x_in, t_in, t_out = trajectory[:, 1:], times[:, 1:], times[:, :-1]
        u, _ = self.transport(trajectory[:, :-1], times[:, :-1], steps)
        u_in = torch.cat([u[:, 1:], trajectory[:, -1:]], dim=1)
        mean, _ = self.gaussian(u_in, t_in, t_out, steps, y, y_mask, drop)
        return (mean - self._teacher_mean(x_in, t_in, t_out, y, y_mask, drop)).square().mean()

    @torch.no_grad()
    def _teacher_mean(self, x_in, t_in, t_out, y, y_mask, drop) -> Tensor:
        """``μ_FM``: the frozen FM network's posterior mean of levels ``x_in`` ``(B, K, ...)``."""
        velocity, _ = self.teacher(x_in, t_in.to(x_in.dtype), None, None, y, y_mask, drop)
        return posterior_mean_from_velocity(
            x_in.flatten(0, 1), velocity.flatten(0, 1), t_out.flatten(), t_in.flatten()
        ).unflatten(0, x_in.shape[:2])
