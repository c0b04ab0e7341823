"""Run the lora_fx benchmark: ``python benchmarks/bench.py --help`` (the code is lora_fx.bench)."""

import sys

from lora_fx.bench import main

if __name__ == "__main__":
    sys.exit(main())
