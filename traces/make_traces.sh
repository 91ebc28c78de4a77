#!/usr/bin/env bash
# Regenerate the shipped synthetic traces (deterministic: fixed windows, seeds and presets).
# Arrivals and sizes: Azure LLM inference trace 2023 (conversation), CC-BY 4.0 -- see azure/ATTRIBUTION.md.
set -euo pipefail
cd "$(dirname "$0")"
CSV=azure/azure-llm-2023-conv.csv
spec-trace synth --requests $CSV --start-s 0    --duration-s 600 --time-scale 1 --profile h100-llama3-8b-eagle      --seed 0 --explore 0.3 --out h100-llama3-8b-eagle.azure-x1.jsonl.gz
spec-trace synth --requests $CSV --start-s 1800 --duration-s 600 --time-scale 2 --profile h100-llama3-8b-eagle      --seed 3 --explore 0.3 --out h100-llama3-8b-eagle.azure-x2.jsonl.gz
spec-trace synth --requests $CSV --start-s 600  --duration-s 600 --time-scale 4 --profile h100-llama3-8b-eagle      --seed 1 --explore 0.3 --out h100-llama3-8b-eagle.azure-x4.jsonl.gz
spec-trace synth --requests $CSV --start-s 1200 --duration-s 600 --time-scale 1 --profile h100-llama3-8b-tree-drift --seed 2 --explore 0.3 --out h100-llama3-8b-tree-drift.azure-x1.jsonl.gz
spec-trace validate .
