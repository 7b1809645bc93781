"""The gate-evasion term of an attacker who knows the defender's LoRD: besides the attack's own
objective, push the LoRD's learned gate down on the perturbed image, so that the defense does not
switch its branch B' on for it (the gate decides, per feature, how much of B' is added).

:class:`GatePenalty` is the recorder of a gate-recording clone (``patch.recording_gates``) and the
``penalty`` of ``lord_ops.attacks.run_attack``: it records only during the attack's own forward passes
(:meth:`GatePenalty.arm` wraps the noise predictor), so a surrogate's training steps in between leave
nothing, and reads ``weight x`` the mean gate (0..1) over every LoRD layer whose gate is live and every
feature (token / pixel) of the last pass.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


class GatePenalty:
    """``weight x`` the mean learned gate of the forward pass just made (a differentiable scalar)."""

    keeps_graph = True  # patch.LoRDInjection hands over the gates with their autograd graph

    def __init__(self, weight: float):
        if not weight > 0:
            raise ValueError(f"the gate-evasion weight must be > 0, got {weight}")
        self.weight = float(weight)
        self._records: list = []
        self._armed = False
        self.history: list[float] = []  # the mean gate of every pass read (for the report)

    def append(self, item) -> None:
        if self._armed:
            self._records.append(item[1])

    def arm(self, predict: Callable) -> Callable:
        """``predict`` with recording on during each call (the attack's objective passes)."""
        def armed(*args, **kwargs):
            self._records.clear()
            self._armed = True
            try:
                return predict(*args, **kwargs)
            finally:
                self._armed = False
        return armed

    def summary(self) -> dict:
        """The weight and the mean gate (0..1) of the attack's first and last pass read (its report)."""
        gates = self.history
        return {"weight": self.weight, "passes": len(gates), "mean_gate_first_pass": gates[0] if gates else None,
                "mean_gate_last_pass": gates[-1] if gates else None}

    def __call__(self) -> torch.Tensor:
        live = [g for g in self._records if g.requires_grad]
        self._records.clear()
        if not live:
            raise RuntimeError("gate evasion: the last forward pass recorded no live LoRD gate (is the LoRD "
                               "applied to the attacked MODEL, with its learned gate?)")
        mean = torch.stack([g.float().mean() for g in live]).mean()
        self.history.append(float(mean.detach()))
        return self.weight * mean


@contextlib.contextmanager
def evading_gates(model_patcher, weight: float):
    """Yield ``(clone, penalty)``: a clone of ``model_patcher`` (which must carry a LoRD) whose gates
    ``penalty`` (a :class:`GatePenalty`) reads; attack the clone with ``penalty.arm(predict)`` and pass
    ``penalty`` to ``run_attack``."""
    from .patch import recording_gates

    penalty = GatePenalty(weight)
    with recording_gates(model_patcher, penalty) as (clone, _):
        yield clone, penalty
