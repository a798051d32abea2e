"""Which group sizes a graph's linears can take, for each target that reads their integers, in one
place: MatMulNBits (any width; a ragged last group is padded), onnxruntime's QMoE (experts in whole
groups), a compressed-tensors checkpoint (every linear in whole groups) and a quantized head (a group
no wider than its input). The scheme alone (a power of two of at least 16) is ``QuantScheme``'s."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .analysis import output_head, quantizable_linears
from .numerics import n_groups

MIN_GROUP = 16  # MatMulNBits' narrowest block


@dataclass(frozen=True)
class GroupFit:
    """A group size against the quantized linears of one graph: their input widths, rows and
    expert counts, read once."""

    group_size: int
    widths: dict[str, int]  # quantized linear -> its input width
    rows: dict[str, int]  # its rows, every expert's included
    experts: dict[str, int]  # an expert bank -> its experts
    head: tuple[str, int] | None  # the linear writing the logits and its input width

    @classmethod
    def of(cls, gm, group_size: int) -> "GroupFit":
        sites = {name: gm.linears[name] for name in quantizable_linears(gm)}
        head = output_head(gm)
        return cls(group_size, {n: s.in_features for n, s in sites.items()},
                   {n: s.out_features * max(1, s.experts) for n, s in sites.items()},
                   {n: s.experts for n, s in sites.items() if s.experts},
                   (head, gm.linears[head].in_features) if head is not None else None)

    def divisor(self, widths=None) -> int | None:
        """The widest group narrower than this one that divides every width (default: every
        quantized linear's), at least ``MIN_GROUP``; None when there is none."""
        widths = list((self.widths if widths is None else widths).values())
        return next((g for g in (self.group_size >> k for k in range(1, 8))
                     if g >= MIN_GROUP and all(w % g == 0 for w in widths)), None)

    def refusal(self) -> str | None:
        """MatMulNBits takes any width, but a group wider than every input makes each row one
        padded block: a file larger than the float one."""
        if self.widths and all(w < self.group_size for w in self.widths.values()):
            widest = max(self.widths, key=self.widths.get)
            return (f"group size {self.group_size} (`group_size`) is wider than every quantized layer's input "
                    f"(the widest, {widest}, has {self.widths[widest]}): choose at most {self.widths[widest]}")
        return None

    def warnings(self) -> list[str]:
        """Inputs narrower than the group (each row one padded block), and inputs not a multiple
        of it: MatMulNBits pads each row's last group (SmolLM2's 576-wide inputs at group 128: 4.5
        groups written as 5), naming the group size that divides them all."""
        group, widths = self.group_size, self.widths
        narrow = sorted(n for n, w in widths.items() if w < group)
        said = [f"{len(narrow)} linears have inputs narrower than the group size {group} (e.g. {narrow[0]}, "
                f"{widths[narrow[0]]}): each of their rows is one padded block"] if narrow else []
        ragged = sorted(n for n, w in widths.items() if w > group and w % group)
        if ragged:
            padded = {n: n_groups(w, group) * group for n, w in widths.items()}
            written = sum(self.rows[n] * padded[n] for n in widths)
            padding = sum(self.rows[n] * (padded[n] - widths[n]) for n in widths)
            divides = self.divisor()
            said.append(f"{len(ragged)} linears' inputs are not a multiple of the group size {group} (e.g. "
                        f"{ragged[0]}, {widths[ragged[0]]}): MatMulNBits pads each row's last group, "
                        f"{padding / written:.1%} of the int4 integers written"
                        + (f"; `group_size={divides}` divides every input" if divides else ""))
        return said

    def expert_refusal(self, sizes: dict[str, int]) -> str | None:
        """onnxruntime's QMoE quantizes experts in whole groups: each of ``sizes`` (the experts'
        widths by their config names) a multiple of the group size."""
        for key, size in sizes.items():
            if size % self.group_size:
                fits = math.gcd(*sizes.values(), self.group_size)
                hint = f", e.g. {fits}" if fits >= MIN_GROUP else ""
                return (f"{key} {size} is not a multiple of the group size {self.group_size} (onnxruntime's QMoE "
                        f"quantizes experts in whole blocks; choose a group size that divides both sizes{hint})")
        return None

    def whole_groups_refusal(self, modules: dict[str, str]) -> str | None:
        """A target that stores every linear in whole groups (a compressed-tensors checkpoint):
        the first linear that is not, by its module name (``modules``: linear -> module)."""
        for name, width in self.widths.items():
            if width % self.group_size:
                return (f"`export_hf`: {modules[name]} has {width} inputs, not a whole number of groups of "
                        f"{self.group_size} (choose a group size that divides every linear's inputs)")
        return None

    def head_refusal(self, group: int) -> str | None:
        """A quantized head's ``group`` may not be wider than its input: each row would be one
        padded block, a head larger than at the group that fits."""
        if self.head is not None and group > self.head[1]:
            head, width = self.head
            return (f"`lm_head_group_size={group}` is wider than the head's input ({head}: {width}): choose at "
                    f"most {width} (each row would be one padded block)")
        return None
