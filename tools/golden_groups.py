"""Golden scaling groups: the groups derived for decoder layer 0 of each architecture's tiny random
model (``awq_graph.load.tiny_random_model``), written as JSON for tests/test_architectures.py to
compare exactly. Regenerate after a change to the channel flow, and review the diff.

    python tools/golden_groups.py [llama mistral ...]    # default: every architecture that has a golden
    python tools/golden_groups.py --survey               # every type the survey found groups for

tests/test_architectures.py compares a sample in CI (the fused families and the generic-decoder
examples); ``tools/arch_table.py --all`` compares every one (its ``golden`` column).
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


SURVEY = GOLDEN.parents[2] / "tools" / "results" / "arch_survey.json"


def golden_text(data: dict) -> str:
    """The JSON as written: a list of integers on one line, so a channel map reads as a row in the diff."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text) + "\n"


def surveyed_with_groups() -> list[str]:
    """The model types the last survey (tools/results/arch_survey.json) found groups for."""
    return sorted(r["type"] for r in json.loads(SURVEY.read_text())["rows"] if r["status"] == "groups")


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    types = surveyed_with_groups() if argv == ["--survey"] else argv or ARCHITECTURES
    for model_type in types:
        path = GOLDEN / f"{model_type}.json"
        try:
            path.write_text(golden_text(golden(model_type)))
        except Exception as exc:  # one architecture that fails here is reported, not the end of the run
            print(f"{model_type}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
            continue
        print(f"wrote {path.relative_to(GOLDEN.parents[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
