"""Match: the scaling groups of every decoder layer, derived from the graph or read from a user's
Quark config, as one record that compile, infer-config, check-config and tools/arch_table.py share."""
from __future__ import annotations

from dataclasses import dataclass, field

from .core.analysis import example_values, output_head
from .core.ir import GraphModel
from .core.records import ScalingGroup, SkippedGroup, to_quark_config
from .passes.channel_flow import find_groups
from .passes.check_config import derive_groups, resolve_config
from .verify import Verification, verify_groups

VERIFY_TOLERANCE = 1e-4  # relative logit deviation of an exact group: measured 2e-7 .. 8e-7


@dataclass(frozen=True)
class Match:
    """What matching found. ``per_layer[i]``: the groups of decoder layer i; ``faults``: why a
    user's config does not fit (empty for derived groups); ``deviation``: the largest relative
    logit deviation after folding random scales along every group, and how many parameters
    those folds changed (None: not verified)."""

    prefix: str
    per_layer: list[list[ScalingGroup]]
    skipped: list[SkippedGroup] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    quark: dict = field(default_factory=dict)  # the config as awq_config.json holds it
    verification: Verification | None = None

    @property
    def n_groups(self) -> int:
        return sum(len(groups) for groups in self.per_layer)

    def to_json(self) -> dict:
        """The decoder-layer prefix, groups per layer, and layer 0's groups whole (the goldens)."""
        return {"decoder_layers": self.prefix, "groups_per_layer": [len(groups) for groups in self.per_layer],
                "layer0": [g.to_json() for g in (self.per_layer[0] if self.per_layer else [])]}

    def for_search(self) -> tuple[list[list[ScalingGroup]], list[str]]:
        """The groups the search may use, and the warnings when it may use none: groups that
        failed verification are dropped whole (a wrong fold would change the model)."""
        if not any(self.per_layer):
            reasons = "; ".join(sorted({s.reason for s in self.skipped})[:3]) or "no linear reads a scalable tensor"
            return self.per_layer, [f"no scaling group found, compiling with plain RTN and clipping: {reasons}"]
        if self.verification is not None and not self.verification.deviation <= VERIFY_TOLERANCE:
            return [[] for _ in self.per_layer], [
                f"derived groups failed verification (logit deviation {self.verification.deviation:.1e} > "
                f"{VERIFY_TOLERANCE:.0e}): "
                "compiling with plain RTN and clipping; please report this architecture"]
        return self.per_layer, []


def match(gm: GraphModel, config: dict | None = None, *, verify: bool = False, progress=None) -> Match:
    """Derive the groups (``config`` None) or resolve a Quark config against the graph; with
    ``verify``, fold random scales along every group and measure the logits (see ``verify_groups``).
    ``progress``: bars over the passes over the weights (a large checkpoint's, from disk)."""
    example = example_values(gm, progress=progress)
    if config is None:
        prefix, per_layer, skipped = derive_groups(gm, example)
        quark = to_quark_config(per_layer[0] if per_layer else [], prefix, len(per_layer))
        faults = []
    else:
        per_layer, faults = resolve_config(gm, config, example)
        prefix, skipped, quark = config["model_decoder_layers"], [], dict(config)
    verification = verify_groups(gm, per_layer, progress=progress) if verify and not faults else None
    return Match(prefix, per_layer, skipped, faults, quark, verification)


def head_group(gm: GraphModel) -> ScalingGroup | None:
    """The scaling group of the head (the linear that writes the logits) and the norm before it,
    found by the channel flow like any other, for the head's own search; None when no source
    before the head can carry a scale."""
    head = output_head(gm)
    if head is None:
        return None
    groups, _ = find_groups(gm, [head], shared_weights=True)  # its search scales a copy of a tied head
    return groups[0] if groups else None
