"""The architecture matrix as a table: each transformers family (tiny config, random init) trained
2 steps by the HF Trainer with ``callbacks=[PalettizationTrainerCallback()]`` alone (default
arguments, no other call), exported and reloaded (the same run as tests/test_architectures.py,
CI sample and nightly tail alike).

    python benchmarks/architectures.py [--families gpt2 t5 ...]

Prints: palettized share of the linear-like weight parameters and of all parameters (elements),
whole-model bits per weight,
whether the .aimodel was written (else the first line of why not), reload max abs diff, seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from model_zoo import FAMILIES, run_family

    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="*", default=FAMILIES)
    args = parser.parse_args()
    rows = ["| family | model class | palettized: linear-like weights / all parameters "
            "| bits/weight | .aimodel | reload max diff | seconds |", "|---|---|---|---|---|---|---|"]
    for name in args.families:
        with tempfile.TemporaryDirectory() as out:
            facts = run_family(name, Path(out))
        aimodel = "yes" if "coreai" in facts["written"] else f"no: {facts['errors'].get('coreai')}"
        rows.append(f"| {name} | {facts['model']} | {facts['palettized_share']:.1%} / "
                    f"{facts['share_of_all_parameters']:.1%} "
                    f"| {facts['bits_per_weight']:.2f} | {aimodel} | {facts['reload_max_diff']:.1e} "
                    f"| {facts['seconds']:.1f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
