"""Golden scaling groups: the groups derived for decoder layer 0 of each architecture's tiny random
model (``awq_graph.load.tiny_random_model``), written as JSON for tests/test_architectures.py to
compare exactly. Regenerate after a change to the channel flow, and review the diff.

    python tools/golden_groups.py [llama mistral ...]    # default: every architecture that has a golden
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

from awq_graph.export import export_model
from awq_graph.load import tiny_random_model
from awq_graph.match import match

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "groups"
ARCHITECTURES = sorted(p.stem for p in GOLDEN.glob("*.json"))


def golden(model_type: str) -> dict:
    """What the test compares (``Match.to_json``)."""
    return {"model_type": model_type, **match(export_model(tiny_random_model(model_type))).to_json()}


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for model_type in argv or ARCHITECTURES:
        path = GOLDEN / f"{model_type}.json"
        text = json.dumps(golden(model_type), indent=1)
        # a list of integers on one line: a channel map reads as a row in the diff
        text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
        path.write_text(text + "\n")
        print(f"wrote {path.relative_to(GOLDEN.parents[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
