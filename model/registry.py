"""The model registry: every trained adapter is a ModelVersion row; exactly one (or none) is active.

Statuses: candidate (trained, not judged) -> active (serving) | refused (lost the gate);
active -> retired (replaced, or rolled back). Workers read ``active_adapter`` before each answer, so a
promotion or a rollback takes effect without a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InputError
from core.schema import ModelStatus, ModelVersion, utcnow

# The gate metric and which direction is better.
LOWER_IS_BETTER = {"val_loss": True, "rouge1": False, "rouge2": False, "rougeL": False}
DEFAULT_GATE_METRIC = "val_loss"
DEFAULT_GATE_MARGIN = 0.01


@dataclass(frozen=True)
class Gate:
    """A candidate is promoted only if it beats the reference by ``margin`` on ``metric``."""

    metric: str = DEFAULT_GATE_METRIC
    margin: float = DEFAULT_GATE_MARGIN

    def __post_init__(self) -> None:
        if self.metric not in LOWER_IS_BETTER:
            raise InputError(f"gate metric is one of {', '.join(LOWER_IS_BETTER)}, not {self.metric!r}")
        if self.margin < 0:
            raise InputError("the gate margin cannot be negative")

    def passes(self, candidate: float | None, reference: float | None) -> tuple[bool, str]:
        """(passed, why) for a candidate's and the reference's score on the gate metric."""
        if candidate is None or not math.isfinite(candidate):
            return False, f"candidate has no finite {self.metric}"
        if reference is None or not math.isfinite(reference):
            return False, f"reference has no finite {self.metric}"
        gain = reference - candidate if LOWER_IS_BETTER[self.metric] else candidate - reference
        verdict = gain >= self.margin
        word = "beats" if verdict else "does not beat"
        return verdict, (
            f"candidate {self.metric} {candidate:.4f} {word} reference {reference:.4f} "
            f"by the margin {self.margin:g} (gain {gain:+.4f})"
        )


def get(*, session: Session, name: str) -> ModelVersion:
    version = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
    if version is None:
        raise InputError(f"there is no model version {name!r} (see `supportbot models list`)")
    return version


def list_versions(*, session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def active(*, session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.active).order_by(ModelVersion.id.desc())
    ).first()


def active_adapter(*, session: Session) -> tuple[str, str] | None:
    """(adapter path, version name) of the adapter that should serve now; None means the bare base."""
    version = active(session=session)
    if version is None or not version.adapter_path:
        return None
    return version.adapter_path, version.name


def register_candidate(
    *,
    session: Session,
    name: str,
    base_model: str,
    adapter_path: Path,
    dataset_hash: str | None,
    config: dict[str, Any],
    metrics: dict[str, Any],
) -> ModelVersion:
    if not (adapter_path / "adapter_config.json").is_file():
        raise InputError(f"{adapter_path} is not a LoRA adapter folder (no adapter_config.json)")
    version = ModelVersion(
        name=name,
        base_model=base_model,
        adapter_path=str(adapter_path),
        dataset_hash=dataset_hash,
        config=config,
        metrics=metrics,
        status=ModelStatus.candidate,
    )
    session.add(version)
    session.flush()
    return version


def record_gate(*, session: Session, name: str, passed: bool, report: dict[str, Any]) -> ModelVersion:
    """Store the gate's verdict: the candidate becomes active (the old one retired) or refused."""
    version = get(session=session, name=name)
    if version.status not in (ModelStatus.candidate, ModelStatus.refused, ModelStatus.retired):
        raise InputError(f"{name} is {version.status.value}; only a candidate can be promoted")
    version.metrics = {**(version.metrics or {}), "gate": report}
    if not passed:
        version.status = ModelStatus.refused
        session.flush()
        return version
    # Lock the current active row so two promotions at once cannot leave two active versions.
    current = session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.active).with_for_update()
    ).all()
    for old in current:
        old.status = ModelStatus.retired
    version.status = ModelStatus.active
    version.promoted_at = utcnow()
    session.flush()
    return version


def rollback(*, session: Session) -> ModelVersion | None:
    """Retire the active adapter and bring back the one active before it (None: back to the base)."""
    current = active(session=session)
    if current is None:
        raise InputError("no adapter is active; the base model already serves")
    previous = session.scalars(
        select(ModelVersion)
        .where(
            ModelVersion.status == ModelStatus.retired,
            ModelVersion.promoted_at.is_not(None),
            ModelVersion.id != current.id,
        )
        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc())
    ).first()
    current.status = ModelStatus.retired
    # Forget its promotion time, so a second rollback goes further back instead of returning to it.
    current.promoted_at = None
    if previous is not None:
        previous.status = ModelStatus.active
    session.flush()
    return previous


def describe(version: ModelVersion) -> dict[str, Any]:
    metrics = version.metrics or {}
    return {
        "name": version.name,
        "status": version.status.value,
        "base_model": version.base_model,
        "adapter_path": version.adapter_path,
        "dataset_hash": version.dataset_hash,
        "val_loss": metrics.get("val_loss"),
        "gate": metrics.get("gate"),
        "created_at": version.created_at.isoformat(timespec="seconds") if version.created_at else None,
        "promoted_at": version.promoted_at.isoformat(timespec="seconds") if version.promoted_at else None,
    }
